"""features.extract against DIFT's recipe run on diffusers (the oracle), and its contract."""
import pytest
import torch
from einops import rearrange

import sdlens
from sdlens.features import extract, feature_names
from sdlens.features.extract import to_spatial


@pytest.fixture(scope="module")
def pair(sd1_fixture):
    return sd1_fixture["pipe"], sdlens.load(sd1_fixture["folder"])


def dift_on_diffusers(pipe, images, prompt, t, ensemble, seed, module, posterior="sample"):
    """DIFT's SDFeaturizer (src/models/dift_sd.py, OneStepSDPipeline) on the diffusers pipeline: each image
    repeated `ensemble` times, `vae.encode(x).latent_dist.sample()` x scale, scheduler.add_noise at t, one
    UNet call with the prompt, the module's output averaged over the ensemble. The posterior and diffusion
    draws are made in the order extract() documents."""
    out = {}
    hook = module.register_forward_hook(lambda m, i, o: out.__setitem__("v", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            dist = pipe.vae.encode(images.repeat_interleave(ensemble, 0) * 2 - 1).latent_dist
            g = torch.Generator().manual_seed(seed)
            eps_vae, noise = torch.randn(dist.mean.shape, generator=g), torch.randn(dist.mean.shape, generator=g)
            z = (dist.mean + dist.std * eps_vae if posterior == "sample" else dist.mean) * pipe.vae.config.scaling_factor
            noisy = pipe.scheduler.add_noise(z, noise, torch.tensor([t]))
            ids = pipe.tokenizer([prompt] * len(z), padding="max_length", max_length=77, return_tensors="pt").input_ids
            pipe.unet(noisy, t, encoder_hidden_states=pipe.text_encoder(ids)[0])
    finally:
        hook.remove()
    v = out["v"]
    return v.reshape(len(images), ensemble, *v.shape[1:]).mean(1)


def close(a, b, rel=1e-5):
    """Equal to 1e-5 of the reference's largest magnitude (float32 summation order differs).

    The images are large enough for 4x4 maps at the deepest level: at 1x1 or 2x1 a GroupNorm group of
    this random UNet holds 2-4 values, its variance is near 0, and batch size alone (CPU kernels sum in
    another order) moves diffusers' own features by 1e-2 there."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("ensemble, posterior", [(1, "sample"), (3, "sample"), (3, "mean")])
def test_extract_equals_dift_on_diffusers(pair, ensemble, posterior):
    pipe, sd = pair
    images = torch.rand(2, 3, 128, 64, generator=torch.Generator().manual_seed(0))  # non-square: 16x8 latents
    ours = extract(sd, images, ["output_blocks.5.hook_out", "output_blocks.4.1.transformer_blocks.0.attn1.hook_q"],
                   t=261, prompt="a photo of a cat", ensemble=ensemble, seed=7, max_rows=2, posterior=posterior)
    ref = dift_on_diffusers(pipe, images, "a photo of a cat", 261, ensemble, 7, pipe.unet.up_blocks[1],  # up_ft_index 1
                            posterior)
    assert ours["output_blocks.5.hook_out"].shape == ref.shape == (2, 64, 8, 4)
    assert close(ours["output_blocks.5.hook_out"], ref)
    q = dift_on_diffusers(pipe, images, "a photo of a cat", 261, ensemble, 7,
                          pipe.unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1.to_q, posterior)  # [B, hw, heads*d]
    heads = pipe.unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1.heads
    q = rearrange(q, "b (h w) (a d) -> b (a d) h w", h=4, a=heads)  # level 2 of a 16x8 latent: 4x2  # our documented channel order: head by head
    assert close(ours["output_blocks.4.1.transformer_blocks.0.attn1.hook_q"], q)


def test_spatial_layouts_by_hand():
    """Channel c = head * d + j for q/k/v, head * keys + key for probs; pixel = token y * w + x."""
    from sdlens.hooks import HookInfo
    info = lambda point, kind: HookInfo("n", "m", point, kind, "up", 3, 1)  # level 1: a 4x2 map of an 8x4 latent
    q = torch.randn(2, 3, 8, 5)  # [B, heads, h*w, d]
    s = to_spatial(q, info("q", "self_attention"), (8, 4))
    assert s.shape == (2, 15, 4, 2) and s[1, 2 * 5 + 4, 3, 1] == q[1, 2, 3 * 2 + 1, 4]
    p = torch.randn(2, 3, 8, 77)
    s = to_spatial(p, info("probs", "cross_attention"), (8, 4))
    assert s.shape == (2, 3 * 77, 4, 2) and s[0, 1 * 77 + 5, 2, 0] == p[0, 1, 2 * 2 + 0, 5]
    o = torch.randn(2, 8, 6)
    s = to_spatial(o, info("out", "self_attention"), (8, 4))
    assert s.shape == (2, 6, 4, 2) and s[1, 5, 0, 1] == o[1, 1, 5]


def test_chunking_and_early_exit_change_nothing(pair):
    """max_rows only bounds memory, and stopping the UNet after the last requested point changes no value."""
    _, sd = pair
    images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    names = feature_names(sd.unet, place="up", block=4)
    a = extract(sd, images, names, ensemble=2, max_rows=1)
    b = extract(sd, images, names, ensemble=2, max_rows=6)
    assert a.keys() == set(names) and all(close(a[n], b[n]) for n in names)
    with sd.unet.record(lambda n: n in names) as store:  # the full forward, for comparison
        full = extract(sd, images, ["hook_out"] + names, ensemble=2)
    assert len(store[names[0]]) == 1  # one UNet call for the 6 rows
    assert all(close(full[n], a[n]) for n in names)
    # the draws differ between images and between ensemble members: the mean is not one draw
    c = extract(sd, images, names[:1], ensemble=1, max_rows=1)
    assert not close(c[names[0]], a[names[0]], rel=1e-2)


def test_ddim_inversion_lands_on_the_sampler_inversion(pair):
    """t = 261 is on the 50-step grid (1, 21, ..., 261): inversion='ddim' must then agree with the
    editing code's 50-step DDIM inversion latent, read at that step."""
    _, sd = pair
    from sdlens.inversion import ddim_latents
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    zs = ddim_latents(sd, images, "", 50)
    got = {}
    with sd.unet.hooks({"input_blocks.0.hook_out": lambda x, hook: got.setdefault(hook.ctx.t, x)}):
        extract(sd, images, ["input_blocks.0.hook_out"], t=261, inversion="ddim")
    ref = sd.unet.input_blocks[0](zs[13], None, None)  # the latent at t = 261 through conv_in
    torch.testing.assert_close(got[261], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(names="output_blocks.4.1.transformer_blocks.0.attn2.hook_k"), "prompt's 77 text tokens"),
    (dict(names="output_blocks.4.hook_outt"), "did you mean output_blocks.4.hook_out"),
    (dict(names=[]), "non-empty list"),
    (dict(t=1000), "t must be a whole number from 0 to 999"),
    (dict(t=2.5), "t must be"),
    (dict(ensemble=0), "ensemble must be a whole number from 1 to 256"),
    (dict(inversion="ddim", ensemble=4), "ensemble must be 1 with inversion='ddim'"),
    (dict(inversion="null-text"), "inversion must be None"),
    (dict(posterior="mode"), "posterior must be"),
    (dict(prompt=["a", "b", "c"]), "one string per image"),
])
def test_bad_arguments_name_the_argument(pair, kwargs, message):
    _, sd = pair
    kw = dict(names="output_blocks.4.hook_out") | kwargs
    names = kw.pop("names")
    with pytest.raises((ValueError, TypeError), match=message):
        extract(sd, torch.rand(2, 3, 32, 32), names, **kw)


def test_images_of_different_sizes_are_refused(pair):
    from PIL import Image
    _, sd = pair
    with pytest.raises(ValueError, match="one size"):
        extract(sd, [Image.new("RGB", (32, 32)), Image.new("RGB", (64, 32))], "output_blocks.4.hook_out")
