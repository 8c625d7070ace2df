"""Perturbed-Attention Guidance (editing/pag.py) against diffusers' `StableDiffusionPAGPipeline`, the
reference, built from the same components and run from the same initial latents; and a claim on
sdlens-tiny."""
import math
import random

import pytest
import torch

import sdlens
from sdlens.editing.pag import identity, layer_selections, pag_generate

PROMPTS = ["a big red star on the left", "a small blue circle at the top"]


def reference(pipe, layers):
    from diffusers import StableDiffusionPAGPipeline
    pag = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=layers)
    pag.set_progress_bar_config(disable=True)
    return pag


def compare(sd, pipe, latents, guidance_scale, pag_scale, steps, height, width, layers=None, ref_layers="mid"):
    ours = pag_generate(sd, PROMPTS, pag_scale=pag_scale, layers=layers, steps=steps, guidance_scale=guidance_scale,
                        latents=latents, height=height, width=width, output="tensor", progress=False)
    ref = reference(pipe, ref_layers)(PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale,
                                      pag_scale=pag_scale, latents=latents, height=height, width=width,
                                      output_type="pt").images
    plain = sd.generate(PROMPTS, steps=steps, guidance_scale=guidance_scale, latents=latents, height=height,
                        width=width, output="tensor", progress=False)
    diff, moved = (ours - ref).abs().max().item(), (ours - plain).abs().max().item()
    print(f"PAG (w {guidance_scale}, s {pag_scale}) vs diffusers: max |image difference| {diff:.2e} "
          f"(PAG moves the image by {moved:.3f})")
    return diff, moved


# The official README's two settings: with guidance (w 4, s 3) and PAG alone (w 0, s 5).
# Measured max |image difference| (one thread, CPU): tiny 3.7e-6 (w 4, s 3), 5.9e-6 (w 0, s 5); the SD-1.5-topology
# random model 2.4e-6, 2.1e-6; tiny with up + down level 1 layers 2.3e-6.
SETTINGS = [(4.0, 3.0), (0.0, 5.0)]


@pytest.mark.parametrize("guidance_scale,pag_scale", SETTINGS)
def test_matches_diffusers_on_tiny(tiny, tiny_pipe, guidance_scale, pag_scale):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    diff, moved = compare(tiny, tiny_pipe, latents, guidance_scale, pag_scale, 5, 64, 64)
    assert diff < 1e-4 and moved > 0.01


@pytest.mark.parametrize("guidance_scale,pag_scale", SETTINGS)
def test_matches_diffusers_on_sd1_topology(sd1_fixture, guidance_scale, pag_scale):
    sd = sdlens.load(sd1_fixture["folder"])
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(1))
    diff, moved = compare(sd, sd1_fixture["pipe"], latents, guidance_scale, pag_scale, 4, 64, 128)
    assert diff < 1e-4 and moved > 1e-4


def test_chosen_layers_match_diffusers(tiny, tiny_pipe):
    """Every decoder self-attention and the encoder's at level 1: diffusers' regexes "up_blocks" and
    "down_blocks\\.1" (tiny's down_blocks.1 is its level 1)."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    diff, moved = compare(tiny, tiny_pipe, latents, 4.0, 3.0, 4, 64, 64, layers=["up", {"place": "down", "level": 1}],
                          ref_layers=["up_blocks", r"down_blocks\.1"])
    assert diff < 1e-4 and moved > 0.01


def test_default_layer_is_the_middle_self_attention(tiny, sd1_fixture):
    """diffusers' "mid" = official PAG's "m0": the one self-attention of an SD 1/2 middle block."""
    for sd in (tiny, sdlens.load(sd1_fixture["folder"])):
        names = [n for at in layer_selections(sd, None) for n in sd.unet.hook_names(**at)]
        assert names == ["middle_block.1.transformer_blocks.0.attn1.hook_probs"]


def test_pag_scale_0_is_plain_generate(tiny):
    kw = dict(steps=3, seed=4, output="tensor", progress=False)
    for w in (7.5, 1.0):
        assert torch.equal(pag_generate(tiny, PROMPTS, pag_scale=0, guidance_scale=w, **kw),
                           tiny.generate(PROMPTS, guidance_scale=w, **kw))


def test_rows_are_named(tiny):
    seen = []
    fns = {"hook_out": lambda x, hook: seen.append(dict(hook.ctx.rows))}
    with tiny.unet.hooks(fns):
        pag_generate(tiny, PROMPTS, steps=1, guidance_scale=7.5, seed=0, progress=False)
        pag_generate(tiny, PROMPTS[0], steps=1, guidance_scale=1.0, seed=0, progress=False)
    assert seen == [{"uncond": [0, 1], "cond": [2, 3], "perturbed": [4, 5]}, {"cond": [0], "perturbed": [1]}]
    assert all(not tiny.unet.hook_point(n).fns for n in tiny.unet.hook_names())


def test_identity_op():
    probs = torch.rand(3, 2, 5, 5).softmax(-1)
    eye = torch.eye(5).expand(3, 2, 5, 5)
    assert torch.equal(identity(None, probs, None), eye)
    assert torch.equal(identity(None, probs, torch.tensor(1.0)), eye)
    assert torch.equal(identity(None, probs, torch.tensor(0.0)), probs)  # weight 0 leaves it alone


@pytest.mark.parametrize("bad,error,says", [
    (dict(pag_scale=math.nan), ValueError, "pag_scale"), (dict(pag_scale=math.inf), ValueError, "pag_scale"),
    (dict(pag_scale=-1.0), ValueError, "pag_scale"), (dict(pag_scale="3"), TypeError, "pag_scale"),
    (dict(layers="mid"), ValueError, "layers"), (dict(layers=[]), ValueError, "layers"),
    (dict(layers=["middle"]), ValueError, "layers"), (dict(layers=[3]), ValueError, "layers"),
    (dict(layers=[{"kind": "cross_attention"}]), ValueError, "layers"),
    (dict(layers=[{"plac": "up"}]), ValueError, "layers"),
    (dict(layers=[{"place": "up", "block": 99}]), ValueError, "layers"),
    (dict(layers=[{"module": "middle_block.1.transformer_blocks.0.attn2"}]), ValueError, "layers"),
    (dict(denoiser=lambda *a: None), TypeError, "denoiser"),
    (dict(steps=0), ValueError, "steps"),
])
def test_bad_input(tiny, bad, error, says):
    with pytest.raises(error, match=says):
        pag_generate(tiny, "a red star", progress=False, **bad)
    assert all(not tiny.unet.hook_point(n).fns for n in tiny.unet.hook_names())  # detached after a failed call


# ---- the claim on sdlens-tiny ----
# Criterion fixed before the decisive run (no exploratory run of it was made). PAG's claim (Ahn et al.
# 2024: better structure, fewer failed samples, with or without CFG), at the official README's setting
# with guidance: w 4.0, pag_scale 3.0, the default layer (mid). Claim: PAG lowers the palette checker's
# failure rate against a plain generate at the same guidance: over 12 prompts "a big <colour> <shape>
# <position>" drawn by random.Random(0), seeds 0-11, 20 DDIM steps, the same noise for both runs, an
# image fails if any of colour, shape, position is wrong (tiny/checker.py `check`), and PAG's failures
# must be strictly fewer than plain's. 12 pairs, 20 steps: ~28 s on one thread (timed before the run).
# Run at 10 steps since (2026-12-06, measured before the switch with this criterion): the same verdict
# and the same per-prompt failures (PAG 1/12, plain 1/12, both on seed 0).
CLAIM_N, CLAIM_STEPS, CLAIM_W, CLAIM_S = 12, 10, 4.0, 3.0


def claim_prompts(n=CLAIM_N, seed=0):
    from sdlens.tiny.scenes import COLORS, POSITION_PHRASE, SHAPES
    rng = random.Random(seed)
    for i in range(n):
        colour, shape, pos = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITION_PHRASE))
        yield f"a big {colour} {shape} {POSITION_PHRASE[pos]}", colour, shape, pos, i


def fails(img, colour, shape, pos):
    from sdlens.tiny.checker import check
    r = check(img, colour, shape, pos)
    return not (r["color"] and r["shape"] and r["position"])


@pytest.mark.xfail(strict=True, reason="measured false on sdlens-tiny (20 steps; the same at the test's 10): checker failures PAG 1/12, plain 1/12 "
                   "(the same prompt, a pink star); criterion: strictly fewer")
def test_claim_pag_lowers_the_failure_rate(tiny):
    """Decisive run (criterion above, fixed first, 20 steps): FALSE on sdlens-tiny. Both fail on the same one of
    12 (seed 0, "a big pink star on the left") and pass the other 11: at w 4 this model already
    follows these prompts, so there is little failure left for PAG to remove at this sample size.
    strict: a change that makes the claim hold must remove this mark."""
    rows = list(claim_prompts())
    # one batch, each row from its own seed's noise (as one call per seed, 3x faster per image)
    kw = dict(steps=CLAIM_STEPS, guidance_scale=CLAIM_W, seed=[r[-1] for r in rows], progress=False)
    pag, plain = pag_generate(tiny, [r[0] for r in rows], pag_scale=CLAIM_S, **kw), tiny.generate([r[0] for r in rows], **kw)
    failed = {"pag": [fails(img, *r[1:4]) for img, r in zip(pag, rows)],
              "plain": [fails(img, *r[1:4]) for img, r in zip(plain, rows)]}
    print(f"checker failures at w {CLAIM_W}: PAG (s {CLAIM_S}) {sum(failed['pag'])}/{CLAIM_N}, plain "
          f"{sum(failed['plain'])}/{CLAIM_N}; per prompt {failed}")
    assert sum(failed["pag"]) < sum(failed["plain"]), failed


def test_matches_diffusers_on_sdxl_topology(sdxl_fixture):
    """SDXL: "mid" is every self-attention of the middle block's transformer (here 3 deep, 10 on SDXL),
    the added-conditioning row travels with the perturbed copy (measured 5.2e-6)."""
    from diffusers import StableDiffusionXLPAGPipeline
    sd = sdlens.load(sdxl_fixture["folder"])
    assert len([n for at in layer_selections(sd, None) for n in sd.unet.hook_names(**at)]) == 3
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pag_generate(sd, "a cat", steps=3, guidance_scale=5.0, latents=latents, output="tensor", progress=False)
    pag = StableDiffusionXLPAGPipeline(**sdxl_fixture["pipe"].components, pag_applied_layers=["mid"])
    ref = pag("a cat", num_inference_steps=3, guidance_scale=5.0, pag_scale=3.0, latents=latents, height=64, width=64,
              output_type="pt").images
    assert (ours - ref).abs().max() < 1e-4
