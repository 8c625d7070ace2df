"""SDXL's hook points on the full-size topology (meta device), the inversions and Plug-and-Play on a
small random SDXL, and SDXL in fp16 / bf16 against fp32 (the criterion of tests/test_precision.py)."""
import copy

import pytest
import torch

import sdlens
from sdlens.inversion import Inversion, ddim_latents, invert_image, null_text
from sdlens.editing.pnp import decoder_self_attention, default_feature_layers, translate
from sdlens.pipeline import StableDiffusion
from sdlens.unet import SDXL, UNetModel
from sdlens.unet.model import unpack_added_cond

PROMPT = "a red circle on the left"
U = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(scope="module")
def sd(sdxl_fixture):
    return sdlens.load(sdxl_fixture["folder"])


@pytest.fixture(scope="module")
def image(sd):
    return sd.generate(PROMPT, steps=3, guidance_scale=5.0, seed=3, output="tensor", progress=False)


def test_hook_info_on_the_full_size_topology():
    """SDXL base at 1024² (latent 128): 70 transformer blocks (MasaCtrl's count), no attention at
    level 0, 2-deep transformers at level 1 and 10-deep at level 2 and in the middle block."""
    with torch.device("meta"):
        unet = UNetModel(SDXL)
    infos = [unet.hook_info(n) for n in unet.hook_names(kind="self_attention", point="probs")]
    assert len(infos) == 70 and {i.level for i in infos} == {1, 2}
    depth = {}
    for i in infos:
        depth.setdefault((i.place, i.block), set()).add(i.transformer_block)
    assert depth[("mid", 0)] == set(range(10))
    assert all(d == set(range(10 if i.level == 2 else 2)) for (p, b), d in depth.items() if p != "mid"
               for i in infos if (i.place, i.block) == (p, b))
    assert unet.hook_info("output_blocks.0.0.hook_h").transformer_block == -1
    table = unet.describe(128, 128)
    assert "output_blocks.2.1.transformer_blocks.9.attn2.hook_probs" in table
    shapes = unet.hook_shapes(128, 128)
    assert shapes["output_blocks.0.1.transformer_blocks.0.attn2.hook_probs"] == (1, 20, 32 * 32, 77)
    assert shapes["input_blocks.4.1.transformer_blocks.1.attn1.hook_probs"] == (1, 10, 64 * 64, 64 * 64)
    assert shapes["hook_out"] == (1, 4, 128, 128)


def test_inversions_reconstruct(sd, image):
    """Null-text at w = 5 reconstructs better than plain DDIM inversion does at w = 5 (a random model
    is no good denoiser, so neither is exact); it optimises the tokens and the pooled vector, never the
    time ids."""
    steps = 3
    zs = ddim_latents(sd, image, PROMPT, steps)
    rec = lambda inv, w: _sample(sd, inv, w, steps)  # in latent space, where null-text's loss is
    err = lambda x: (x - zs[0]).pow(2).mean().item()
    with torch.enable_grad():
        unconds = null_text(sd, zs, PROMPT, guidance_scale=5.0, inner_steps=3)
    tokens, pooled, time_ids = unpack_added_cond(unconds[-1], sd.unet.cfg)
    assert tokens.abs().max() > 0 and pooled.abs().max() > 0  # both moved from the zero start
    assert time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    assert err(rec(Inversion(zs, PROMPT, "null-text", uncond=unconds), 5.0)) < err(rec(Inversion(zs, PROMPT, "ddim"), 5.0))
    for method in ("negative-prompt", "direct"):
        inv = invert_image(sd, image, PROMPT, method, steps=steps, progress=False)
        assert len(inv.latents) == steps + 1


def _sample(sd, inv, w, steps):
    from sdlens.editing.batch import batch_denoiser, follow_inversion
    from sdlens.schedulers import sample
    den = batch_denoiser(sd, [PROMPT], steps, w, inv)
    return sample(den, inv.latents[-1], sd.scheduler, steps, callback=lambda i, t, x: follow_inversion(inv, i, x))


def test_pnp_layers_by_level_and_injection(sd, image):
    """Our SDXL choice: output_blocks.1.0 and decoder attn1 from block 1 on (the small model's depths
    1, 2, 3: 3 + 3 + 2 + 2 + 2 = 12 layers). Injecting everything with the source's own prompt at
    w = 1 reproduces the source row's reconstruction; the default translation differs from it."""
    assert default_feature_layers(sd) == ("output_blocks.1.0",)
    layers = decoder_self_attention(sd)
    assert len(layers) == 12 and all(sd.unet.hook_info(f"{l}.hook_q").block >= 1 for l in layers)
    zs = translate(sd, image, "a blue star", steps=3, inversion_steps=3, progress=False).guidance_latents
    a = translate(sd, None, "a blue star", latents=zs, steps=3, progress=False).images
    b = translate(sd, None, "a blue star", latents=zs, steps=3, feature_injection=0.0, attention_injection=0.0,
                  progress=False).images
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sdxl_in_reduced_precision_is_close_to_fp32(sd, sdxl_fixture, dtype):
    """Finite, and off fp32 by at most K = 4 times the fp32-fp64 spread scaled by u_dtype / u_fp32."""
    kw = dict(steps=3, guidance_scale=5.0, seed=0, output="tensor", progress=False)
    sd64 = StableDiffusion(copy.deepcopy(sd.unet).double(), sd.vae, copy.deepcopy(sd.text_encoder).double(),
                           sd.tokenizer, sd.scheduler, sd.default_size, copy.deepcopy(sd.text_encoder_2).double(),
                           sd.tokenizer_2, sd.force_zeros_for_empty_prompt)
    rms = lambda a, b: (a.double() - b.double()).pow(2).mean().sqrt().item()
    r32 = sd.generate(PROMPT, **kw)
    spread = rms(r32, sd64.generate(PROMPT, **kw))
    low = sdlens.load(sdxl_fixture["folder"], dtype=dtype).generate(PROMPT, **kw)
    assert torch.isfinite(low).all()
    assert rms(low, r32) <= 4 * spread * U[dtype] / U[torch.float32], (rms(low, r32), spread)
