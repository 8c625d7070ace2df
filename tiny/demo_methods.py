"""The demo's panels for the methods that change how an image is generated (FreeU, PAG, StyleAligned,
Attend-and-Excite): each beside a plain `generate` from the same noise, so what differs is the method.
"""
from .demo import captioned_grid

# Prompts of the kind sdlens-tiny was trained on (tiny/scenes.py).
FREEU_PROMPTS = ["a big red circle on the left", "a small blue square at the top", "a yellow star in the center"]
PAG_PROMPTS = ["a big green triangle on the right", "a small yellow star at the bottom", "a big cyan star on the left"]
STYLE_PROMPTS = ["a big red circle on the left on a striped background", "a small square at the top",
                 "a triangle on the right"]
# "A and B", the paper's form, which tiny never saw and where it drops objects (tests/test_attend_excite.py)
EXCITE_PROMPT, EXCITE_WORDS = "a red circle and a cyan square", ["circle", "square"]


def plain_above(save, name, prompts, plain, made, label):
    """A grid: the plain images (captioned with their prompts) above the method's, one column per prompt."""
    save(captioned_grid(plain + made, [f"plain: {p}" for p in prompts] + [label] * len(prompts), cols=len(prompts)),
         name)


def panels(sd, save, seed, steps, guidance):
    from ..editing import attend_and_excite, freeu, pag_generate, style_aligned
    kw = dict(steps=steps, guidance_scale=guidance, seed=seed, progress=False)
    cfg = f"seed {seed}, {steps} steps, guidance {guidance}"
    out = []

    plain = sd.generate(FREEU_PROMPTS, **kw)
    with freeu(sd):
        made = sd.generate(FREEU_PROMPTS, **kw)
    plain_above(save, "freeu.png", FREEU_PROMPTS, plain, made, "FreeU")
    out.append(dict(title="FreeU", method="freeu(sd) (Si et al. 2024; diffusers' enable_freeu): the decoder's two "
                    "deepest levels scale half their backbone channels up and damp their skips' lowest frequencies",
                    prompt="one per column", settings=cfg + "; b1, b2, s1, s2 = SD 1.5's values of the FreeU README",
                    look="top row plain, bottom row FreeU from the same noise. SD 1.5's factors are strong for this "
                         "model: backgrounds and small objects change, and our claim (less high-frequency energy) was "
                         "measured false on it (5 of 12; tests/test_freeu.py).",
                    images=[("freeu.png", "plain (top) | FreeU (bottom)")]))

    plain = sd.generate(PAG_PROMPTS, **kw)
    made = pag_generate(sd, PAG_PROMPTS, **kw)
    plain_above(save, "pag.png", PAG_PROMPTS, plain, made, "PAG, scale 3")
    out.append(dict(title="Perturbed-Attention Guidance", method="pag_generate (Ahn et al. 2024): a third row whose "
                    "middle-block self-attention is the identity, and guidance away from it (scale 3.0)",
                    prompt="one per column", settings=cfg + "; pag_scale 3.0, the middle block (the official 'm0')",
                    look="top row plain, bottom row PAG from the same noise: PAG pushes the sample away from a version "
                         "without spatial self-attention. The paper's claim (fewer failed samples) cannot show here: at "
                         "guidance 4 tiny fails 1 of 12 prompts with or without PAG (tests/test_pag.py).",
                    images=[("pag.png", "plain (top) | PAG (bottom)")]))

    plain = sd.generate(STYLE_PROMPTS, **kw)
    made = style_aligned(sd, STYLE_PROMPTS, **kw)
    plain_above(save, "style_aligned.png", STYLE_PROMPTS, plain, made, "StyleAligned")
    out.append(dict(title="StyleAligned", method="style_aligned (Hertz et al. 2024): every image's self-attention also "
                    "reads the first image's keys and values, after AdaIN of its queries and keys to the first's",
                    prompt="one per column; the first is the reference", settings=cfg + "; the official notebook's "
                    "settings (shared attention in every self-attention layer, AdaIN of q and k)",
                    look="top row plain, bottom row StyleAligned from the same noise: the second and third images take "
                         "on the reference's background while keeping their own shapes and places. On 15 images its "
                         "colour statistics came closer to the reference's on average but in 7 of 15 only "
                         "(tests/test_style_aligned.py).",
                    images=[("style_aligned.png", "plain (top) | StyleAligned (bottom)")]))

    seeds = [seed + 2, seed + 3]  # a seed where the circle comes back, one where an object is lost
    plain = [sd.generate(EXCITE_PROMPT, **{**kw, "seed": s})[0] for s in seeds]
    made = [attend_and_excite(sd, EXCITE_PROMPT, EXCITE_WORDS, **{**kw, "seed": s})[0] for s in seeds]
    save(captioned_grid(plain + made, [f"plain, seed {s}" for s in seeds] + [f"Attend-and-Excite, seed {s}" for s in seeds],
                        cols=2), "attend_excite.png")
    out.append(dict(title="Attend-and-Excite", method="attend_and_excite (Chefer et al. 2023): gradient steps on the "
                    "latents raise the weakest chosen word's strongest cross-attention",
                    prompt=f"{EXCITE_PROMPT}; words {', '.join(EXCITE_WORDS)}", settings=cfg + "; diffusers' defaults "
                    "(thresholds {0: 0.05, 10: 0.5, 20: 0.8}, scale factor 20, 25 steps altered)",
                    look="top row plain, bottom row Attend-and-Excite from the same seeds. The paper's claim, that the "
                         "neglected object appears more often, is false on this model (2 of 6 seeds with both objects, "
                         "with or without; tests/test_attend_excite.py): here the words' 8x8 maps reach their "
                         "targets without the object being drawn. Here seed 2 gains the missing circle (merged with the "
                         "square) and seed 3 barely changes.",
                    images=[("attend_excite.png", "plain (top) | Attend-and-Excite (bottom)")]))
    return out


EXPLORE_PROMPT, EXPLORE_STEPS = "a big red circle on the left", 20


def explore_panel(sd, save, seed, guidance):
    """explore.html: the attention explorer for one prompt (20 steps keep it near 1 MB)."""
    from ..explore import build
    from ..outputs import Text
    save(Text(build(sd, EXPLORE_PROMPT, steps=EXPLORE_STEPS, guidance_scale=guidance, seed=seed, progress=False)),
         "explore.html")
    save(sd.generate(EXPLORE_PROMPT, steps=EXPLORE_STEPS, guidance_scale=guidance, seed=seed, progress=False)[0],
         "explore_image.png")
    return dict(title="Attention explorer (explore.html)", method="python -m sdlens explore --prompt ... --out DIR: "
                "one self-contained page, no server", prompt=EXPLORE_PROMPT,
                settings=f"seed {seed}, {EXPLORE_STEPS} steps, guidance {guidance}",
                look="open explore.html: pick a word to see its cross-attention over the image of each step (the "
                     "step's predicted x0), move the step slider, pick a layer or all layers of a resolution, "
                     "switch to self-attention and click a pixel to see where it attends.",
                images=[("explore_image.png", EXPLORE_PROMPT)], small=True)
