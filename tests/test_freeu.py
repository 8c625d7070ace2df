"""FreeU (editing/freeu.py) against diffusers' `enable_freeu`, the reference, from the same weights and
the same initial latents; and a claim on sdlens-tiny."""
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sdlens
from sdlens.editing.freeu import VALUES, fourier_filter, freeu, freeu_values

PROMPT = "a big red star on the left"
SD15 = dict(b1=1.5, b2=1.6, s1=0.9, s2=0.2)  # ChenyangSi/FreeU README.md:161-173


def with_freeu(pipe, values, **call):
    pipe.enable_freeu(**values)
    try:
        return pipe(output_type="pt", **call).images
    finally:
        pipe.disable_freeu()


def compare(sd, pipe, values, prompt, latents, steps, guidance_scale, height, width):
    with freeu(sd, **values):
        ours = sd.generate(prompt, steps=steps, guidance_scale=guidance_scale, latents=latents, height=height,
                           width=width, output="tensor", progress=False)
    ref = with_freeu(pipe, values, prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                     latents=latents, height=height, width=width)
    plain = sd.generate(prompt, steps=steps, guidance_scale=guidance_scale, latents=latents, height=height,
                        width=width, output="tensor", progress=False)
    diff = (ours - ref).abs().max().item()
    print(f"FreeU vs diffusers: max |image difference| {diff:.2e} (FreeU moves the image by "
          f"{(ours - plain).abs().max().item():.3f})")
    return diff, (ours - plain).abs().max().item()


# Measured (one thread, CPU): tiny w 7.5 3.3e-6, w 1 8.9e-7; the SD-1.5-topology random model, w 7.5, 1.6e-6.
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_matches_diffusers_on_tiny(tiny, tiny_pipe, guidance_scale):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    diff, moved = compare(tiny, tiny_pipe, SD15, PROMPT, latents, 5, guidance_scale, 64, 64)
    assert diff < 1e-4 and moved > 0.05


@pytest.mark.filterwarnings("ignore:.*far from this model")  # 128 x 256 on a model of 64 x 64: on purpose
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_matches_diffusers_on_sd1_topology(sd1_fixture, guidance_scale):
    """128 x 256: latents 16 x 32, so the two FreeU levels have 2 x 4 and 4 x 8 maps (at 64 x 64 the
    deepest would be 1 x 1), non-square and with distinct factors, so a swapped axis or stage shows."""
    sd = sdlens.load(sd1_fixture["folder"])
    latents = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(1))
    values = dict(b1=1.3, b2=1.6, s1=0.7, s2=0.2)
    diff, moved = compare(sd, sd1_fixture["pipe"], values, "a blue circle", latents, 4, guidance_scale, 128, 256)
    assert diff < 1e-4 and moved > 1e-3


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 2, 1, 1), (1, 2, 2, 3), (2, 1, 5, 8), (1, 1, 6, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fourier_filter_is_diffusers(shape, dtype):
    """Bitwise the same as diffusers' fourier_filter, odd and one-pixel sides included (Python slicing
    of the mask block), and the float32 round trip of a bfloat16 input."""
    from diffusers.utils.torch_utils import fourier_filter as reference
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for scale in (0.2, 0.9, 1.0):
        assert torch.equal(fourier_filter(x, 1, scale), reference(x, 1, scale))
    torch.testing.assert_close(fourier_filter(x.float(), 1, 1.0), x.float(), atol=1e-6, rtol=1e-6)  # s = 1: no change


def test_changes_the_image_and_exit_restores_it(tiny):
    kw = dict(steps=4, seed=3, output="tensor", progress=False)
    plain = tiny.generate(PROMPT, **kw)
    with freeu(tiny) as used:
        changed = tiny.generate(PROMPT, **kw)
    assert used == SD15  # sdlens-tiny has no published values: SD 1.5's
    assert (changed - plain).abs().max() > 0.05
    assert all(not tiny.unet.hook_point(n).fns for n in tiny.unet.hook_names())
    assert torch.equal(tiny.generate(PROMPT, **kw), plain)
    with pytest.raises(RuntimeError):  # an error inside the `with` detaches too
        with freeu(tiny):
            raise RuntimeError("inside")
    assert torch.equal(tiny.generate(PROMPT, **kw), plain)


def test_values_by_family():
    for family, values in VALUES.items():
        assert freeu_values(SimpleNamespace(family=family)) == values
    assert VALUES["SD 2.x"] == dict(b1=1.4, b2=1.6, s1=0.9, s2=0.2)
    assert VALUES["SDXL"] == dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    assert freeu_values(SimpleNamespace(family="SD architecture, custom widths"), s2=0.5) == dict(SD15, s2=0.5)


def test_layers_are_the_two_deepest_decoder_levels(tiny):
    """diffusers' resolution_idx 0 and 1 = up_blocks[0] and [1] = the deepest decoder level and the next:
    on sdlens-tiny (3 levels) output blocks 0-5, three per level (num_res_blocks + 1)."""
    from sdlens.editing.freeu import patches
    from sdlens.editing.patch import hooks
    names = hooks(tiny, patches(tiny, **SD15))
    blocks = sorted({tiny.unet.hook_info(n).block for n in names})
    assert blocks == [0, 1, 2, 3, 4, 5]
    assert {tiny.unet.hook_info(n).kind for n in names} == {"backbone", "skip"}


@pytest.mark.parametrize("name", ["b1", "b2", "s1", "s2"])
def test_bad_values_name_the_argument(tiny, name):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=name):
            freeu(tiny, **{name: bad})  # refused at the call, before any `with`
    with pytest.raises(TypeError, match=name):
        freeu(tiny, **{name: "1.2"})
    with pytest.raises(TypeError, match=name):
        freeu(tiny, **{name: True})


# ---- the claim on sdlens-tiny ----
# Criterion fixed before the decisive run (no exploratory run of it was made). The FreeU paper's
# Fourier analysis of the backbone factor b (Si et al. 2024, Sec. 3; the figure number was not checked:
# the PDF could not be read here) says that amplifying the backbone suppresses the high frequencies of
# the generated image, and diffusers' docstring calls the result "the oversmoothing effect". Claim: with FreeU at its default (SD 1.5's) values the generated image has less high-frequency
# energy: the share of the image's spectral energy (grey, mean removed) at radii above half the Nyquist
# frequency (|f| > 0.25 cycles / pixel) is lower with FreeU than without for >= 10 of 12 prompt/seed
# pairs (sign test p = 0.019), and lower on average. 12 prompts "a big <colour> <shape> <position>",
# drawn by random.Random(0), seeds 0-11, 20 DDIM steps, w 7.5, the same noise for both runs (12, not 16:
# 16 pairs timed at ~37 s on one thread before the run, over the ~40 s budget with the rest).
# Run at 10 steps since (2026-12-06, measured before the switch with this criterion): the same verdict,
# FreeU lower in 5/12 again (means 0.0192 vs 0.0320; checker failures FreeU 3/12, plain 1/12).
CLAIM_N, CLAIM_STEPS = 12, 10


def claim_prompts(n=CLAIM_N, seed=0):
    from sdlens.tiny.scenes import COLORS, POSITION_PHRASE, SHAPES
    rng = random.Random(seed)
    for i in range(n):
        colour, shape, pos = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITION_PHRASE))
        yield f"a big {colour} {shape} {POSITION_PHRASE[pos]}", colour, shape, pos, i


def high_frequency_share(img: torch.Tensor) -> float:
    """[3, H, W] in [0, 1] -> share of the grey image's spectral energy (mean removed) at |f| > 0.25 cycles/pixel."""
    grey = img.double().mean(0)
    power = torch.fft.fft2(grey - grey.mean()).abs() ** 2
    fy = torch.fft.fftfreq(grey.shape[0], dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(grey.shape[1], dtype=torch.float64)[None, :]
    return (power[(fy ** 2 + fx ** 2).sqrt() > 0.25].sum() / power.sum()).item()


@pytest.mark.xfail(strict=True, reason="measured false on sdlens-tiny (20 steps; 5/12 again at the test's 10): FreeU's high-frequency share lower in 5/12 "
                   "pairs (mean 0.0206 vs 0.0227 plain); criterion >= 10/12")
def test_claim_freeu_suppresses_high_frequencies(tiny):
    """Decisive run (criterion above, fixed first, 20 steps): FALSE on sdlens-tiny. FreeU's share is lower in 5 of
    12 pairs; the mean is a little lower (0.0206 vs 0.0227) because of one plain image at 0.091, and
    per pair the share moves both ways by up to 10x. Reported alongside, not judged: the checker fails
    5/12 FreeU images against 1/12 plain ones (SD 1.5's values on a model they were not chosen for).
    strict: a change that makes the claim hold must remove this mark."""
    from sdlens.tiny.checker import check
    from sdlens.pipeline import to_pil
    rows = list(claim_prompts())
    # one batch, each row from its own seed's noise (as one call per seed, 3x faster per image)
    kw = dict(steps=CLAIM_STEPS, guidance_scale=7.5, seed=[r[-1] for r in rows], output="tensor", progress=False)
    plain = tiny.generate([r[0] for r in rows], **kw)
    with freeu(tiny):
        free = tiny.generate([r[0] for r in rows], **kw)
    shares, failed = [], [0, 0]
    for (prompt, colour, shape, pos, seed), f, p in zip(rows, free, plain):
        shares.append((high_frequency_share(f), high_frequency_share(p)))
        for k, img in enumerate((f, p)):  # reported, not judged
            r = check(to_pil(img[None])[0], colour, shape, pos)
            failed[k] += not (r["color"] and r["shape"] and r["position"])
    s = np.array(shares)
    lower = int((s[:, 0] < s[:, 1]).sum())
    print(f"high-frequency share: FreeU {s[:, 0].mean():.4f}, plain {s[:, 1].mean():.4f}; FreeU lower in "
          f"{lower}/{len(s)}; checker failures: FreeU {failed[0]}/{len(s)}, plain {failed[1]}/{len(s)}")
    assert lower >= 10 and s[:, 0].mean() < s[:, 1].mean(), shares


def test_matches_diffusers_on_sdxl_topology(sdxl_fixture):
    """SDXL: 3 levels, attention from level 1 on, the published SDXL values by family (measured 8.0e-7)."""
    sd = sdlens.load(sdxl_fixture["folder"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with freeu(sd) as used:
        ours = sd.generate("a cat", steps=3, guidance_scale=5.0, latents=latents, output="tensor", progress=False)
    assert used == VALUES["SDXL"]
    ref = with_freeu(sdxl_fixture["pipe"], used, prompt="a cat", num_inference_steps=3, guidance_scale=5.0,
                     latents=latents, height=64, width=64)
    assert (ours - ref).abs().max() < 1e-4
