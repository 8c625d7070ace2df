"""The demo's panels for the methods that change how an image is generated (FreeU, PAG, StyleAligned,
Attend-and-Excite): each beside a plain `generate` from the same noise, so what differs is the method.
"""
from .demo import captioned_grid

# Prompts of the kind sdlens-tiny was trained on (tiny/scenes.py).
FREEU_PROMPTS = ["a big red circle on the left", "a small blue square at the top", "a yellow star in the center"]
PAG_PROMPTS = ["a big green triangle on the right", "a small yellow star at the bottom", "a big cyan star on the left"]
STYLE_PROMPTS = ["a big red circle on the left on a striped background", "a small square at the top",
                 "a triangle on the right"]
EXCITE_PROMPT, EXCITE_WORDS = "an orange square next to a cyan star", ["square", "star"]


def panels(sd, save, seed, steps, guidance):
    from ..editing import attend_and_excite, freeu, pag_generate, style_aligned
    kw = dict(steps=steps, guidance_scale=guidance, seed=seed, progress=False)
    cfg = f"seed {seed}, {steps} steps, guidance {guidance}"
    out = []

    plain = sd.generate(FREEU_PROMPTS, **kw)
    with freeu(sd):
        made = sd.generate(FREEU_PROMPTS, **kw)
    save(captioned_grid(plain + made, [f"plain: {p}" for p in FREEU_PROMPTS] + ["FreeU"] * 3, cols=3), "freeu.png")
    out.append(dict(title="FreeU", method="freeu(sd) (Si et al. 2024; diffusers' enable_freeu): the decoder's two "
                    "deepest levels scale half their backbone channels up and damp their skips' lowest frequencies",
                    prompt="one per column", settings=cfg + "; b1, b2, s1, s2 = SD 1.5's values of the FreeU README",
                    look="top row plain, bottom row FreeU from the same noise: the same scenes, with the changes FreeU "
                         "makes to contrast and detail (tests/test_freeu.py states and measures its claim on this model).",
                    images=[("freeu.png", "plain (top) | FreeU (bottom)")]))

    plain = sd.generate(PAG_PROMPTS, **kw)
    made = pag_generate(sd, PAG_PROMPTS, **kw)
    save(captioned_grid(plain + made, [f"plain: {p}" for p in PAG_PROMPTS] + ["PAG, scale 3"] * 3, cols=3), "pag.png")
    out.append(dict(title="Perturbed-Attention Guidance", method="pag_generate (Ahn et al. 2024): a third row whose "
                    "middle-block self-attention is the identity, and guidance away from it (scale 3.0)",
                    prompt="one per column", settings=cfg + "; pag_scale 3.0, the middle block (the official 'm0')",
                    look="top row plain, bottom row PAG from the same noise: PAG pushes the sample away from a version "
                         "without spatial self-attention, so shapes should come out more defined.",
                    images=[("pag.png", "plain (top) | PAG (bottom)")]))

    plain = sd.generate(STYLE_PROMPTS, **kw)
    made = style_aligned(sd, STYLE_PROMPTS, **kw)
    save(captioned_grid(plain + made, [f"plain: {p}" for p in STYLE_PROMPTS] + ["StyleAligned"] * 3, cols=3),
         "style_aligned.png")
    out.append(dict(title="StyleAligned", method="style_aligned (Hertz et al. 2024): every image's self-attention also "
                    "reads the first image's keys and values, after AdaIN of its queries and keys to the first's",
                    prompt="one per column; the first is the reference", settings=cfg + "; the official notebook's "
                    "settings (shared attention in every self-attention layer, AdaIN of q and k)",
                    look="top row plain, bottom row StyleAligned from the same noise: the second and third images take "
                         "on the reference's colours and background while keeping their own shapes and places.",
                    images=[("style_aligned.png", "plain (top) | StyleAligned (bottom)")]))

    seeds = [seed, seed + 1, seed + 2]
    plain = [sd.generate(EXCITE_PROMPT, **{**kw, "seed": s})[0] for s in seeds]
    made = [attend_and_excite(sd, EXCITE_PROMPT, EXCITE_WORDS, **{**kw, "seed": s})[0] for s in seeds]
    save(captioned_grid(plain + made, [f"plain, seed {s}" for s in seeds] + [f"Attend-and-Excite, seed {s}" for s in seeds],
                        cols=3), "attend_excite.png")
    out.append(dict(title="Attend-and-Excite", method="attend_and_excite (Chefer et al. 2023): gradient steps on the "
                    "latents raise the weakest chosen word's strongest cross-attention",
                    prompt=f"{EXCITE_PROMPT}; words {', '.join(EXCITE_WORDS)}", settings=cfg + "; diffusers' defaults "
                    "(thresholds {0: 0.05, 10: 0.5, 20: 0.8}, scale factor 20, 25 steps altered)",
                    look="top row plain, bottom row Attend-and-Excite from the same three seeds: where the plain run "
                         "drops one of the two objects, the excited run should show both.",
                    images=[("attend_excite.png", "plain (top) | Attend-and-Excite (bottom)")]))
    return out
