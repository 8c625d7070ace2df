"""`python -m sdlens demo`: a small gallery from the bundled sdlens-tiny model, in seconds on a CPU.

Writes each image, and a captioned grid upscaled for viewing, into a new folder (never into an
existing one), all of them or, if anything fails, none. The editing methods add their panels here.
"""
import os
import time

from PIL import Image, ImageDraw

from ..outputs import Staged

PROMPTS = ["a big red circle on the left", "a small blue square at the top", "a yellow star in the center",
           "a big green triangle on the right", "a purple circle at the bottom on a white background",
           "an orange square next to a cyan star", "a pink triangle above a blue circle", "a big cyan star on the left"]


def free_folder(base):
    """`base` if it does not exist, else base-2, base-3, ...: a demo never overwrites earlier output."""
    if not os.path.exists(base):
        return base
    n = 2
    while os.path.exists(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def captioned_grid(images, captions, cols=4, scale=3):
    w, h = images[0].size
    cw, ch = w * scale, h * scale + 28
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cw, rows * ch), "white")
    d = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cw, (i // cols) * ch
        grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (x, y))
        words, lines = cap.split(), [""]
        for word in words:  # wrap to the cell width (about 6 px per character)
            if len(lines[-1]) + len(word) + 1 > cw // 6:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        d.multiline_text((x + 2, y + h * scale + 1), "\n".join(lines[:2]), fill="black", spacing=1)
    return grid


# (source, target, mode, re-weighting): the Prompt-to-Prompt panels
EDITS = [("a big red circle on the left", "a big blue circle on the left", "replace", None),
         ("a big yellow star in the center", "a big yellow square in the center", "replace", None),
         ("a small green triangle at the top", "a small green triangle at the top on a black background", "refine", None),
         ("a big purple square next to a yellow circle", "a big purple square next to a yellow circle", "reweight",
          {"yellow": -2.0})]  # -1 leaves this model's circle yellow; -2 turns it purple


def run(sd, out, seed=0, steps=50, guidance=7.5):
    if os.path.exists(out):
        raise ValueError(f"{out} exists; the demo writes a new folder (see free_folder)")
    with Staged(out) as staged:
        return _run(sd, staged.save, seed, steps, guidance)


def _run(sd, save, seed, steps, guidance):
    import random

    from ..editing import PromptToPrompt
    from ..editing.features import collect, pca_rgb
    from ..editing.pnp import inversion_latents, translate
    from ..editing.visualize import cross_attention_grid, token_labels
    from ..pipeline import to_pil
    from .scenes import render, scene_from
    t0 = time.time()
    images = sd.generate(PROMPTS, steps=steps, guidance_scale=guidance, seed=seed, progress=False)
    for i, im in enumerate(images):
        save(im, f"generate_{i:02d}.png")
    save(captioned_grid(images, PROMPTS), "generate_grid.png")

    panels, caps = [], []
    for src, tgt, mode, eq in EDITS:
        res = PromptToPrompt(sd, src, [tgt], mode=mode, equalize=eq, steps=steps).run(guidance_scale=guidance, seed=seed)
        a, b = to_pil(res.images)
        panels += [a, b]
        caps += [src, f"{mode}: {tgt}" if not eq else f"reweight {eq}"]
        if mode == "replace" and not panels[:-2]:
            maps = res.store.aggregate(res.store.largest())
            save(cross_attention_grid(res.images[0], maps[0], token_labels(sd.tokenizer, src)), "p2p_attention_source.png")
            save(cross_attention_grid(res.images[1], maps[1], token_labels(sd.tokenizer, tgt)), "p2p_attention_edit.png")
    save(captioned_grid(panels, caps, cols=2), "p2p_grid.png")

    # Plug-and-Play on a rendered ("real") scene, and the shared-basis PCA of its decoder features
    scenes = [scene_from(s, c, "big", p, "gray", "plain", seed=i) for i, (s, c, p) in
              enumerate([("star", "red", "left"), ("circle", "blue", "right"), ("square", "green", "top"),
                         ("triangle", "orange", "center")])]
    reals = [render(sc, random.Random(i)) for i, sc in enumerate(scenes)]
    zs = inversion_latents(sd, reals[0], steps=steps)
    pnp = translate(sd, None, "a big blue star on the left", latents=zs, steps=steps, guidance_scale=guidance)
    save(captioned_grid([reals[0], to_pil(pnp.images)[0]], [scenes[0].caption, "pnp: a big blue star on the left"], cols=2),
         "pnp_grid.png")
    k = steps // 2
    t = zs_timestep(sd, steps, k)
    feats = collect(sd, [inversion_latents(sd, im, steps=steps)[k] for im in reals], t, ["output_blocks.4.0.hook_out"])
    pcs = [to_pil(rgb[None])[0].resize(reals[0].size, 0) for rgb in pca_rgb(feats["output_blocks.4.0.hook_out"])]
    save(captioned_grid(reals + pcs, [sc.caption for sc in scenes] + ["PCA output_blocks.4"] * 4), "features_pca.png")
    return time.time() - t0


def zs_timestep(sd, steps, k):
    """The timestep of the inversion latent z_k (k inversion steps from the clean latent)."""
    from ..schedulers import timesteps
    return list(reversed(timesteps(sd.scheduler, steps)))[max(k - 1, 0)]
