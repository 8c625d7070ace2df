"""SDXL against diffusers on a small random SDXL in the exact public layouts (tests/conftest.py): each
piece (context, pooled vector, time ids, the UNet with its added conditioning, the VAE), generate with
and without a negative prompt, the turbo paths (trailing DDIM, Euler ancestral), single files in the
sgm layout, and our own saved files read back by diffusers."""
import pytest
import torch

import sdlens
from sdlens.unet.model import unpack_added_cond

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def sd(sdxl_fixture):
    return sdlens.load(sdxl_fixture["folder"])


def pipe_images(pipe, **kw):
    """diffusers' images as [B, 3, H, W] in [0, 1] (its "pt" output is already that)."""
    return pipe(output_type="pt", **kw).images.float()


def latents(b=1, seed=1):
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_context_pooled_and_time_ids_match_diffusers(sd, sdxl_fixture):
    pipe = sdxl_fixture["pipe"]
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, negative_prompt=None)
    tokens, ours_pooled, time_ids = unpack_added_cond(sd.encode_prompt(PROMPT), sd.unet.cfg)
    assert (tokens - pe).abs().max() < 1e-5 and (ours_pooled - pooled).abs().max() < 1e-5
    assert time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]  # diffusers' defaults: original = target = size
    # no negative prompt: zeros (force_zeros_for_empty_prompt), time ids kept; an explicit "" is encoded
    zt, zp, zi = unpack_added_cond(sd.encode_negative(None, 1), sd.unet.cfg)
    assert npe.abs().max() == 0 and zt.abs().max() == 0 and zp.abs().max() == 0 and zi.tolist() == time_ids.tolist()
    _, npe2, _, npooled2 = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt="")
    et, ep, _ = unpack_added_cond(sd.encode_negative("", 1), sd.unet.cfg)
    assert (et - npe2).abs().max() < 1e-5 and (ep - npooled2).abs().max() < 1e-5 and npe2.abs().max() > 0


def test_unet_with_added_conditioning_matches_diffusers(sd, sdxl_fixture):
    pipe = sdxl_fixture["pipe"]
    x = latents(2)
    ctx = torch.cat([sd.encode_prompt(PROMPT, size=(64, 48)), sd.encode_prompt("a blue star", size=(64, 48))])
    tokens, pooled, time_ids = unpack_added_cond(ctx, sd.unet.cfg)
    with torch.no_grad():
        theirs = pipe.unet(x, 501, tokens, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        ours = sd.unet(x, 501, ctx)
    assert (ours - theirs).abs().max() < 1e-5
    assert time_ids[0].tolist() == [64, 48, 0, 0, 64, 48]


def test_vae_matches_diffusers(sd, sdxl_fixture):
    pipe = sdxl_fixture["pipe"]
    assert sd.vae.cfg.scaling_factor == 0.13025
    z = latents()
    with torch.no_grad():
        theirs = pipe.vae.decode(z / 0.13025).sample / 2 + 0.5
    assert (sd.decode_latents(z) - theirs.clamp(0, 1)).abs().max() < 1e-5


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_generate_matches_diffusers(sd, sdxl_fixture, negative):
    """CFG from the same latents; no negative prompt = zeros (force_zeros_for_empty_prompt)."""
    pipe = sdxl_fixture["pipe"]
    lat = latents(2)
    kw = dict(steps=4, guidance_scale=5.0, latents=lat, output="tensor", progress=False, negative_prompt=negative)
    ours = sd.generate([PROMPT, "a blue star"], **kw)
    theirs = pipe_images(pipe, prompt=[PROMPT, "a blue star"], negative_prompt=negative, num_inference_steps=4,
                         guidance_scale=5.0, latents=lat, height=64, width=64)
    assert (ours - theirs).abs().max() < 1e-4


def test_single_file_sgm_layout_equals_folder(sd, sdxl_fixture):
    """The sgm file (conditioner.embedders.*, fused OpenCLIP in_proj, x @ W text_projection, logit_scale)
    with the folder's configs, as diffusers' from_single_file(config=...) takes them."""
    single = sdlens.load(sdxl_fixture["single"], config=sdxl_fixture["folder"])
    for a, b in ((single.unet, sd.unet), (single.text_encoder, sd.text_encoder), (single.text_encoder_2, sd.text_encoder_2),
                 (single.vae, sd.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert single.force_zeros_for_empty_prompt and single.is_sdxl


def test_saved_files_round_trip_and_diffusers_reads_ours(sd, sdxl_fixture, tmp_path):
    """save_folder / save_single_file write SDXL; we load both back exactly, and diffusers'
    from_single_file(path, config=folder) reads our sgm file and gives the same images."""
    from diffusers import StableDiffusionXLPipeline
    from sdlens.weights.save import save_folder, save_single_file
    save_folder(sd, tmp_path / "f", dtype=torch.float32)
    save_single_file(sd, tmp_path / "m.safetensors", dtype=torch.float32)
    lat = latents()
    kw = dict(steps=2, guidance_scale=3.0, latents=lat, output="tensor", progress=False)
    ref = sd.generate(PROMPT, **kw)
    for back in (sdlens.load(tmp_path / "f"), sdlens.load(tmp_path / "m.safetensors")):
        assert back.is_sdxl and back.force_zeros_for_empty_prompt
        for a, b in ((back.unet, sd.unet), (back.text_encoder_2, sd.text_encoder_2)):
            sa, sb = a.state_dict(), b.state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sb)
        # not bit-equal: a transposed text_projection read back may take another matmul kernel
        assert (back.generate(PROMPT, **kw) - ref).abs().max() < 1e-5
    pipe = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "m.safetensors"), config=sdxl_fixture["folder"],
                                                      local_files_only=True, torch_dtype=torch.float32)
    pipe.scheduler = sdxl_fixture["pipe"].scheduler
    theirs = pipe_images(pipe, prompt=PROMPT, num_inference_steps=2, guidance_scale=3.0, latents=lat, height=64, width=64)
    assert (theirs - ref).abs().max() < 1e-4


def test_turbo_one_step_is_the_x0_prediction_at_999(sd, sdxl_fixture):
    """The turbo preset's DDIM (trailing, ending at alpha 1), 1 step, guidance 0 (one UNet pass, no
    unconditional rows): the x0 prediction at t = 999 from unit noise, sgm's turbo sampler;
    diffusers' trailing DDIM with set_alpha_to_one gives the same."""
    from diffusers import DDIMScheduler
    from sdlens.weights.presets import PRESETS
    turbo = sdlens.load(sdxl_fixture["folder"])
    turbo.scheduler = PRESETS["sdxl-turbo"]["scheduler"]
    lat = latents()
    calls = []
    with turbo.unet.hooks({"hook_out": lambda x, hook: calls.append((hook.ctx.t, x.shape[0]))}):
        ours = turbo.generate(PROMPT, steps=1, guidance_scale=0.0, latents=lat, output="tensor", progress=False)
    assert calls == [(999, 1)]
    a = sdlens.schedulers.alphas_cumprod(turbo.scheduler)[999]
    eps = turbo.unet(lat, 999, turbo.encode_prompt(PROMPT))
    x0 = (lat - (1 - a) ** 0.5 * eps) / a ** 0.5
    assert (ours - turbo.decode_latents(x0)).abs().max() < 1e-5
    pipe = sdxl_fixture["pipe"]
    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(old.config, timestep_spacing="trailing", set_alpha_to_one=True)
    try:
        theirs = pipe_images(pipe, prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=lat, height=64,
                             width=64)
    finally:
        pipe.scheduler = old
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_euler_ancestral_matches_diffusers(sd, sdxl_fixture, spacing):
    """The turbo models' sampler at 3 steps, same latents and generator: equal to diffusers'
    EulerAncestralDiscreteScheduler, noise draws included."""
    import dataclasses
    from diffusers import EulerAncestralDiscreteScheduler
    pipe = sdxl_fixture["pipe"]
    lat = latents()
    old = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(old.config, timestep_spacing=spacing)
    try:
        theirs = pipe_images(pipe, prompt=PROMPT, num_inference_steps=3, guidance_scale=0.0, latents=lat, height=64,
                             width=64, generator=torch.Generator().manual_seed(7))
    finally:
        pipe.scheduler = old
    orig = sd.scheduler
    sd.scheduler = dataclasses.replace(orig, timestep_spacing=spacing)
    try:
        ours = sd.generate(PROMPT, steps=3, guidance_scale=0.0, latents=lat, seed=7, sampler="euler_ancestral",
                           output="tensor", progress=False)
    finally:
        sd.scheduler = orig
    assert (ours - theirs).abs().max() < 1e-4


def test_presets_name_turbo_files(sdxl_fixture, tmp_path):
    """Shapes cannot tell SDXL-Turbo from SDXL base: config="sdxl-turbo" says so; a preset of another
    family is refused."""
    from sdlens.weights.presets import PRESETS
    assert PRESETS["sdxl-turbo"]["scheduler"].timestep_spacing == "trailing"
    assert PRESETS["sd-turbo"]["scheduler"].prediction_type == "epsilon"
    with pytest.raises(sdlens.WeightsError, match="SD 2.x preset but this is an SDXL file"):
        sdlens.load(sdxl_fixture["single"], config="sd-turbo")
    # the real SDXL topology does not fit the tiny file: a one-line error naming the mismatch
    with pytest.raises(sdlens.WeightsError, match="shape mismatches|missing") as e:
        sdlens.load(sdxl_fixture["single"], config="sdxl-turbo")
    assert "\n" not in str(e.value)


def test_a_real_sgm_file_needs_no_config(tmp_path):
    """A file with SDXL base's full-size shapes (no metadata) is SDXL with the sdxl preset: checked on the
    meta device through detection, which has no tensors to read."""
    from sdlens.unet import SDXL
    from sdlens.text import SDXL_G, SDXL_L
    from sdlens.weights.load import detect_single_file

    class Shapes:
        path = "sd_xl_base_1.0.safetensors"
        shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                  "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
                  "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}
    family, u, v, t, t2 = detect_single_file(Shapes())
    assert (family, u, v.scaling_factor, t, t2) == ("SDXL", SDXL, 0.13025, SDXL_L, SDXL_G)


def test_timestep_spacings_match_diffusers_ddim():
    from diffusers import DDIMScheduler
    from sdlens.schedulers import DDIMConfig, timesteps
    for spacing in ("leading", "trailing", "linspace"):
        d = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=False)
        for n in (1, 2, 3, 4, 7, 50, 333):
            d.set_timesteps(n)
            assert timesteps(DDIMConfig(timestep_spacing=spacing), n) == d.timesteps.tolist(), (spacing, n)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMConfig(timestep_spacing="uniform")


def test_sd_turbo_preset_on_an_sd2_file(sd2v_fixture):
    """SD-Turbo is SD 2.1-base: an SD 2 single file with config="sd-turbo" is epsilon, 512², trailing
    timesteps ending at alpha 1, 1 step at guidance 0 by default (one UNet pass at t = 999), and its
    1-step sample equals diffusers' trailing DDIM on the same weights."""
    from diffusers import DDIMScheduler
    f = sd2v_fixture
    sd = sdlens.load(f["single"], config="sd-turbo")
    s = sd.scheduler
    assert (s.prediction_type, s.timestep_spacing, s.set_alpha_to_one, sd.default_size) == ("epsilon", "trailing", True, 512)
    assert sd.defaults == {"steps": 1, "guidance_scale": 0.0} and sd.name == "sd-turbo"
    calls = []
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with sd.unet.hooks({"hook_out": lambda x, hook: calls.append((hook.ctx.t, x.shape[0]))}):
        ours = sd.generate(PROMPT, latents=lat, height=128, width=128, output="tensor", progress=False)
    assert calls == [(999, 1)]
    pipe = f["pipe"]
    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(old.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                               prediction_type="epsilon")
    try:
        theirs = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=lat, height=128, width=128,
                      output_type="pt").images.float()
    finally:
        pipe.scheduler = old
    assert (ours - theirs).abs().max() < 1e-4
