"""The papers' claims, tested on sdlens-tiny with the palette checker.

- Inversion: DDIM inversion is exact enough at w = 1; at w = 7.5 only null-text and direct
  inversion reconstruct well (Mokady et al. 2023; Ju et al. 2024).
- Prompt-to-Prompt: swapping a colour word keeps the layout, regenerating from the same seed
  with the new prompt does not (Hertz et al. 2023, Fig. 1-3).
- Plug-and-Play: translating a rendered scene keeps its structure, plain regeneration from the
  same inverted latent does not (Tumanyan et al. 2023, Fig. 2, 7).
"""
import random

import numpy as np
import torch

import sdlens
from sdlens.editing import PromptToPrompt, invert_image
from sdlens.editing.pnp import inversion_latents, translate
from sdlens.editing.words import token_ids
from sdlens.pipeline import to_tensor
from sdlens.tiny.checker import check, mask_iou
from sdlens.tiny.scenes import COLORS, SHAPES, render, scene_from


def psnr(a, b):
    return 10 * torch.log10(1 / ((a - b) ** 2).mean()).item()


def scene(i, color="red", shape="star", position="left"):
    sc = scene_from(shape, color, "big", position, "gray", "plain", seed=i)
    return sc, render(sc, random.Random(i))


def test_ddim_inversion_round_trip_at_w1(tiny):
    sc, img = scene(0)
    inv = invert_image(tiny, img, sc.caption, "ddim", steps=50)
    rec = PromptToPrompt(tiny, sc.caption, [], steps=50).run(guidance_scale=1.0, inversion=inv)
    z0 = inv.latents[0]
    assert ((rec.latents - z0).norm() / z0.norm()).item() < 0.1
    assert psnr(rec.images, to_tensor(img)) > 25


def test_null_text_and_direct_beat_ddim_at_w7_5(tiny):
    """PSNR against the VAE's own reconstruction decode(z_0): the best any inversion can reach, so
    the figure measures the inversion's error and not the tiny VAE's (which caps image PSNR)."""
    values = {}
    sc, img = scene(1, "blue", "circle", "right")
    # 10 steps (was 20; measured with this criterion before the switch: 20 steps gave DDIM 13.7 dB,
    # null-text 51.6, direct 60 (the cap); 10 steps 15.5, 41.5, 60)
    for method in ("ddim", "null-text", "direct"):
        inv = invert_image(tiny, img, sc.caption, method, steps=10, guidance_scale=7.5)
        rec = PromptToPrompt(tiny, sc.caption, [], steps=10).run(guidance_scale=7.5, inversion=inv)
        values[method] = min(psnr(rec.images, tiny.decode_latents(inv.latents[0])), 60.0)
    print(values)
    assert values["null-text"] > values["ddim"] + 3 and values["direct"] > values["ddim"] + 3, values


def test_pnp_translation_keeps_structure(tiny):
    """20 steps (was 50; measured with this criterion before the switch: 50 steps gave IoU PnP 0.66,
    regenerated 0.26, blue 3/3; 20 steps 0.84, 0.26, 3/3)."""
    kept, sdedit, obeyed = [], [], 0
    for i, (shape, pos) in enumerate([("star", "left"), ("square", "top"), ("triangle", "right")]):
        sc, img = scene(10 + i, "red", shape, pos)
        zs = inversion_latents(tiny, img, steps=20)
        res = sdlens.pipeline.to_pil(translate(tiny, None, f"a big blue {shape}", latents=zs, steps=20).images)[0]
        base = sdlens.pipeline.to_pil(translate(tiny, None, f"a big blue {shape}", latents=zs, steps=20,
                                                feature_injection=0.0, attention_injection=0.0).images)[0]
        kept.append(mask_iou(img, res))
        sdedit.append(mask_iou(img, base))
        obeyed += check(res, "blue", shape)["color"]
    print(f"structure IoU: PnP {np.mean(kept):.2f}, regenerated {np.mean(sdedit):.2f}; blue obeyed {obeyed}/3")
    assert np.mean(kept) > 0.5 and np.mean(kept) > np.mean(sdedit) + 0.1, (kept, sdedit)
    assert obeyed >= 2


def colour_swaps(tokenizer, n=16, seed=0):
    """n word swaps drawn by a seeded generator, each with its own sampling seed: any shape, any two
    colours of one token each (a word swap needs equal token counts, and "cyan" is two)."""
    rng = random.Random(seed)
    colours = [c for c in COLORS if len(token_ids(tokenizer, c)) == 3]  # <bos> word <eos>
    article = lambda w: ("an " if w[0] in "aeiou" else "a ") + w
    for i in range(n):
        shape, a, b = rng.choice(SHAPES), *rng.sample(colours, 2)
        yield article(f"big {a} {shape}"), article(f"big {b} {shape}"), b, shape, i


# 12 DDIM steps, not 50: the verdict was fixed at 50 and holds at 20 and at 12 with the same criterion
# (2026-12-06, measured before each switch): at 20 P2P 0.736, regenerated 0.576, gap 0.160 (se 0.052),
# 14/16 ahead, 16/16 obeyed; at 12 0.751, 0.534, gap 0.217 (se 0.072), 14/16, 16/16 (at 10: 15/16 obeyed,
# one from the 90% bar, so not 10).
SWAP_STEPS = 12


def test_p2p_colour_swap_keeps_layout(tiny):
    """Layout: IoU of the foreground masks of the source and the result. On this model regeneration
    from the same seed keeps much of the layout too (IoU about 0.63: the noise places the object),
    and even replacing every attention map for all steps reaches only about 0.77, since the
    target's text values also move the object. So the gap is small; the test asks that it is
    significant: above two standard errors of the paired differences, and P2P ahead in at least
    12 of 16 swaps (sign test p = 0.04). Measured at 50 steps: 0.728 vs 0.634, gap 0.094 (se 0.027), 14/16;
    at 20: 0.736 vs 0.576, gap 0.160 (se 0.052), 14/16; at SWAP_STEPS = 12: 0.751 vs 0.534, gap 0.217 (se 0.072), 14/16."""
    kept, regen, obeyed = [], [], 0
    swaps = list(colour_swaps(tiny.tokenizer))
    # the regenerations in one batch, each row from its own seed's noise (as one call per seed)
    regenerated = tiny.generate([s[1] for s in swaps], steps=SWAP_STEPS, seed=[s[-1] for s in swaps], progress=False)
    for (src, tgt, colour, shape, seed), c in zip(swaps, regenerated):
        a, b = sdlens.pipeline.to_pil(PromptToPrompt(tiny, src, [tgt], steps=SWAP_STEPS).run(seed=seed, progress=False).images)
        kept.append(mask_iou(a, b))
        regen.append(mask_iou(a, c))
        obeyed += check(b, colour, shape)["color"]
    gap = np.array(kept) - np.array(regen)
    se = gap.std(ddof=1) / len(gap) ** 0.5
    print(f"layout IoU: P2P {np.mean(kept):.3f}, regenerated {np.mean(regen):.3f}, gap {gap.mean():.3f} "
          f"(se {se:.3f}), P2P ahead {(gap > 0).sum()}/{len(gap)}; target colour obeyed {obeyed}/{len(gap)}")
    assert obeyed >= 0.9 * len(gap)
    assert np.mean(kept) > 0.5 and gap.mean() > 2 * se and (gap > 0).sum() >= 12, (kept, regen)
