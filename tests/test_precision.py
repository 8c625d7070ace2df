"""Reduced precision (fp16, bf16) on the CPU: what the model boundary, the sampler, the attention
upcast and the hooks promise, and end to end on sdlens-tiny that every job gives finite images
close to its fp32 result.

The closeness criterion, fixed before measuring. To first order a computation run with unit
roundoff u returns f + u E, where E depends on the inputs and the computation, not on u. fp64
(u = 2^-53) is exact at fp32's scale, so rms(fp32 - fp64) = u32 rms(E) measures this job's
sensitivity to rounding, and the same job in precision p should be off fp32 by about
rms(fp32 - fp64) * u_p / u32. We allow a factor K = 4 for what the scaling leaves out: the fp_p run
also rounds every weight once (about as much error again as rounding the arithmetic), and two
rounding patterns of the same size differ by up to about twice their rms. The VAE runs in fp32 in
every run, so it does not scale; it only carries the latents' differences to the images.
"""
import copy
import random

import pytest
import torch

import sdlens
from sdlens.editing import PromptToPrompt, invert_image
from sdlens.inversion import METHODS, Inversion, ddim_latents, null_text
from sdlens.editing.pnp import translate
from sdlens.pipeline import StableDiffusion
from sdlens.schedulers import DDIMConfig, invert, sample
from sdlens.tiny.scenes import render, scene_from
from sdlens.unet.attention import Attention

U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
K = 4
STEPS, SIZE = 5, 32  # 32x32 images (8x8 latents) and 2 null-text inner steps keep fp16 on a CPU quick
PROMPT, TARGET = "a big red circle on the left", "a big blue circle on the left"


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


# ---- the sampler and the model boundary ----

@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_sampler_keeps_fp32_latents(low):
    """A denoiser whose output is rounded to `low` (as a reduced-precision model's is) must not make
    the sampler's state `low`: against the same outputs in fp64, the only error left is fp32's,
    a few roundings per step (bound: 8 u32 per step, times the largest |x|)."""
    cfg, steps = DDIMConfig(), 50
    g = torch.Generator().manual_seed(0)
    eps = [torch.randn(1, 4, 8, 8, generator=g).to(low) for _ in range(steps)]  # exactly representable
    x_T = torch.randn(1, 4, 8, 8, generator=g).to(low)
    fake = lambda x, t, step: eps[step]
    exact = lambda x, t, step: eps[step].double()
    out = sample(fake, x_T, cfg, steps)
    ref = sample(exact, x_T.double(), cfg, steps)
    assert out.dtype == torch.float32
    bound = steps * 8 * U[torch.float32] * ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() < bound
    zs, zs_ref = invert(fake, x_T, cfg, steps), invert(exact, x_T.double(), cfg, steps)
    assert zs[-1].dtype == torch.float32
    assert (zs[-1].double() - zs_ref[-1]).abs().max().item() < steps * 8 * U[torch.float32] * zs_ref[-1].abs().max().item()


@pytest.fixture(scope="module")
def tiny16():
    return sdlens.load(dtype=torch.float16)


@pytest.fixture(scope="module")
def tiny32():
    return sdlens.load()


def test_unet_casts_at_its_boundary(tiny16):
    """The fp16 UNet takes fp32 latents and context, computes (and shows its hooks) fp16, returns fp32."""
    unet = tiny16.unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), tiny16.encode_prompt([PROMPT, ""]).float()
    seen = []
    with torch.no_grad(), unet.hooks({lambda n: n.endswith("hook_h") or n == "hook_out": lambda v, h: seen.append(v.dtype)}):
        out = unet(x, 501, ctx)
    assert out.dtype == torch.float32 and set(seen) == {torch.float16}
    with torch.no_grad():
        assert torch.equal(out, unet(x.half(), 501, ctx.half()))


# ---- attention upcast (SD 2.x) ----

def test_upcast_attention_is_the_same_on_both_paths():
    """With `upcast` both paths compute the attention in fp32 and round once to fp16, so hooking
    hook_probs changes an output by at most one fp16 spacing (rtol 2^-10) plus fp32's own
    difference between the two algorithms (64 u32 max|v|). Before, the explicit path rounded the
    probabilities to fp16 and multiplied v in fp16."""
    torch.manual_seed(0)
    a = Attention(64, 32, heads=2, head_dim=32, upcast=True)
    with torch.no_grad():
        a.to_q.weight.mul_(8), a.to_k.weight.mul_(8)  # large logits, as in SD 2.1-v
        a.to_out[0].weight.copy_(torch.eye(64)), a.to_out[0].bias.zero_()  # an exact to_out: see the attention
    a = a.half()
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 256, 64, generator=g).half(), torch.randn(2, 77, 32, generator=g).half()
    vs = []
    a.hook_v.fns.append(lambda v, h: vs.append(v))
    with torch.no_grad():
        fast = a(x, c)
        a.hook_probs.fns.append(lambda p, h: None)
        slow = a(x, c)
    assert fast.dtype == slow.dtype == torch.float16
    torch.testing.assert_close(slow.float(), fast.float(), rtol=2.0 ** -10,
                               atol=64 * U[torch.float32] * vs[0].abs().max().item())


# ---- hooks ----

def test_hook_returning_another_dtype_or_device_is_refused(tiny16):
    x, ctx = torch.zeros(1, 4, 16, 16, dtype=torch.float16), tiny16.encode_prompt([""])
    for bad in (lambda v, h: v.float(), lambda v, h: torch.empty_like(v, device="meta")):
        with pytest.raises(TypeError, match=r"hook on output_blocks\.4\.0\.hook_h returned a .* return one of torch.float16"):
            with torch.no_grad(), tiny16.unet.hooks({"output_blocks.4.0.hook_h": bad}):
                tiny16.unet(x, 1, ctx)


def test_run_with_cache_default_skips_attention_maps(tiny32):
    """By default every hook point but hook_probs is recorded, and attention keeps the fast path:
    the output is bit-identical to a plain forward (the explicit path differs in the last bits)."""
    unet = tiny32.unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, 501, ctx)
        out, cache = unet.run_with_cache(x, 501, ctx)
    assert set(cache) == {n for n in unet.hook_names() if unet.hook_info(n).point not in ("probs", "kv")}
    assert torch.equal(out, ref)


# ---- end to end on sdlens-tiny ----

def jobs(sd, image):
    """name -> images [n,3,H,W] in [0,1]: generate, P2P after each inversion, PnP."""
    out = {"generate": sd.generate(PROMPT, steps=STEPS, seed=0, height=SIZE, width=SIZE, output="tensor",
                                   progress=False)}
    for m in METHODS:
        if m == "null-text":  # invert_image's null-text with 2 instead of 10 Adam steps per step
            zs = ddim_latents(sd, image, PROMPT, STEPS)
            with torch.enable_grad():
                inv = Inversion(zs, PROMPT, m, uncond=null_text(sd, zs, PROMPT, inner_steps=2))
        else:
            inv = invert_image(sd, image, PROMPT, m, steps=STEPS)
        out[f"p2p+{m}"] = PromptToPrompt(sd, PROMPT, [TARGET], steps=STEPS).run(inversion=inv).images
    out["pnp"] = translate(sd, image, "a big blue star on the left", steps=STEPS, inversion_steps=STEPS).images
    return out


@pytest.fixture(scope="module")
def image():
    img = render(scene_from("circle", "red", "big", "left", "gray", "plain", seed=0), random.Random(0))
    return img.resize((SIZE, SIZE))


@pytest.fixture(scope="module")
def reference(image, tiny32):
    """fp32 results, and their spread from fp64 (the same weights, cast up)."""
    sd = tiny32
    sd64 = StableDiffusion(copy.deepcopy(sd.unet).double(), sd.vae, copy.deepcopy(sd.text_encoder).double(),
                           sd.tokenizer, sd.scheduler, sd.default_size)
    r32, r64 = jobs(sd, image), jobs(sd64, image)
    return r32, {k: rms(r32[k], r64[k]) for k in r32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_jobs_in_reduced_precision_match_fp32(dtype, reference, image, request):
    r32, spread = reference
    res = jobs(sdlens.load(dtype=dtype), image)
    report = []
    for k, x in res.items():
        assert torch.isfinite(x).all(), f"{k}: non-finite values in {dtype}"
        err, tol = rms(x, r32[k]), K * spread[k] * U[dtype] / U[torch.float32]
        report.append(f"{k}: rms {err:.2e} tol {tol:.2e} (fp32-fp64 {spread[k]:.1e})")
    print(f"\n{dtype}: " + "\n  ".join(report))
    for k, x in res.items():
        assert rms(x, r32[k]) <= K * spread[k] * U[dtype] / U[torch.float32], f"{k} in {dtype}: " + "; ".join(report)
