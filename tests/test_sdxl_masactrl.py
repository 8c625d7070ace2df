"""MasaCtrl on SDXL: our layer numbering (in the suite), and against the official code (marked `oracle`, not in
the suite: the official code stays out of the project, as ../shared/oracles keeps P2P's and PnP's). Run it with
a checkout of TencentARC/MasaCtrl @ d0ba16b (its masactrl/ package is all it needs):

    MASACTRL_REF=path/to/MasaCtrl python -m pytest -m oracle tests/test_sdxl_masactrl.py

Measured 2026-12-06: max image difference 3.5e-6 / 3.1e-6 / 3.2e-6 at the three start layers, 4.1e-6
mask-guided. The official editors run on diffusers' SDXL pipeline and ours on sdlens, with the same
weights (the small random SDXL of tests/conftest.py), the same noise and the official SDXL settings
(run_synthesis_sdxl.py: DDIM with diffusers' steps_offset 0, guidance 7.5, no negative prompt).

Scaled to the small model: 4 steps instead of 50, so `start_step` 1 for the official 4 (4 of 50 would
round to 0, and 1 keeps a plain first step, so the step gate is checked too) with the official
`total_steps` set to 4; the official start layers 44, 54, 64 of SDXL's 70 are the first self-attention
layers of the decoder's 2nd, 3rd and 4th spatial transformer, which on this UNet (transformer depths
1, 2, 3 instead of 1, 2, 10: 28 layers) are 16, 19 and 22, given to the official editor as
`layer_idx = range(start, 28)` since its `model_type="SDXL"` hard-codes 70."""
import copy
import dataclasses
import os
import sys
import types

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

import sdlens
from sdlens.editing.masactrl import (MasaCtrl, decoder_transformer_starts, default_start_layer, sdxl_start_layers,
                                     self_attention_layers)
from sdlens.unet import SD1, SDXL, UNetModel

SRC, TGT = "a red circle on the left", "a red star on the left"
STEPS, START_STEP, GUIDANCE = 4, 1, 7.5
REF = os.environ.get("MASACTRL_REF", "")
oracle = pytest.mark.oracle  # needs MASACTRL_REF


@pytest.fixture(scope="module")
def official():
    """The official modules, imported with empty stand-ins for cv2 and torchvision (used there only to
    write mask images, which these tests never ask for); the stand-ins and the top-level name
    `masactrl` leave sys.modules right after."""
    if not os.path.isdir(os.path.join(REF, "masactrl")):
        pytest.fail(f"MASACTRL_REF={REF!r} is not a checkout of TencentARC/MasaCtrl (it needs its masactrl/ folder)")
    stubs = {"cv2": types.ModuleType("cv2"), "torchvision": types.ModuleType("torchvision"),
             "torchvision.utils": types.ModuleType("torchvision.utils")}
    stubs["torchvision.utils"].save_image = None
    added = [k for k in stubs if k not in sys.modules]
    sys.modules.update({k: stubs[k] for k in added})
    sys.path.insert(0, REF)
    try:
        from masactrl import masactrl, masactrl_utils
    finally:
        sys.path.remove(REF)
        for k in added + [k for k in sys.modules if k == "masactrl" or k.startswith("masactrl.")]:
            del sys.modules[k]
    return types.SimpleNamespace(utils=masactrl_utils, masactrl=masactrl)


@pytest.fixture(scope="module")
def pipe(sdxl_fixture):
    """The fixture's pipeline with the official scheduler and its own copy of the UNet (the official
    registration replaces each attention module's forward)."""
    p = sdxl_fixture["pipe"]
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)  # run_synthesis_sdxl.py; steps_offset 0 by default
    return StableDiffusionXLPipeline(**{**p.components, "unet": copy.deepcopy(p.unet), "scheduler": sched})


@pytest.fixture(scope="module")
def sd(sdxl_fixture):
    sd = sdlens.load(sdxl_fixture["folder"])
    sd.scheduler = dataclasses.replace(sd.scheduler, steps_offset=0)  # the official DDIM
    return sd


def official_images(official, pipe, editor, latents, steps=STEPS):
    official.utils.regiter_attention_editor_diffusers(pipe, editor)
    side = latents.shape[-1] * 8
    with torch.no_grad():
        return pipe([SRC, TGT], latents=latents.expand(2, -1, -1, -1), guidance_scale=GUIDANCE,
                    num_inference_steps=steps, height=side, width=side, output_type="pt").images.float()


def full_size_sdxl_diffusers():
    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def test_layer_numbering(sd):
    """Full-size SDXL on the meta device: 70 self-attention layers (the official MODEL_TYPE "SDXL": 70, and
    its registration counts 140 attention modules, self and cross, as diffusers' model has), and the
    official start layers 44, 54, 64 are the decoder's 2nd, 3rd, 4th spatial transformers; our default is
    64, the 4th, as SD's official 10 is. The small model: 28 layers, the same transformers at 16, 19, 22."""
    with torch.device("meta"):
        full = types.SimpleNamespace(unet=UNetModel(SDXL))
        sd1 = types.SimpleNamespace(unet=UNetModel(SD1))
    attention = [n for n, m in full_size_sdxl_diffusers().named_modules() if n.endswith(("attn1", "attn2"))]
    assert len(attention) // 2 == len(self_attention_layers(full)) == 70
    assert decoder_transformer_starts(full) == [34, 44, 54, 64, 66, 68]
    assert sdxl_start_layers(full) == [44, 54, 64] and default_start_layer(full) == 64
    assert len(self_attention_layers(sd)) == 28 and sdxl_start_layers(sd) == [16, 19, 22]
    assert decoder_transformer_starts(sd1)[3] == default_start_layer(sd1) == 10  # SD's official: the same 4th


@oracle
def test_official_registration_counts_70_layers(official):
    editor = official.utils.AttentionBase()
    official.utils.regiter_attention_editor_diffusers(types.SimpleNamespace(unet=full_size_sdxl_diffusers()), editor)
    assert editor.num_att_layers // 2 == 70 == official.masactrl.MutualSelfAttentionControl.MODEL_TYPE["SDXL"]


@oracle
def test_official_layer_count_follows_our_order(official, pipe, sd):
    """At each self-attention call the official `cur_att_layer // 2` is 0, 1, 2, ... and the module
    called holds the weights of our layer of that index in `self_attention_layers`: "layer 44" is
    the same block on both sides."""
    seen, called = [], []

    class Spy(official.utils.AttentionBase):
        def forward(self, q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kw):
            if not is_cross:
                seen.append(self.cur_att_layer // 2)
            return super().forward(q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kw)

    official.utils.regiter_attention_editor_diffusers(pipe, Spy())
    attn1 = [m for n, m in pipe.unet.named_modules() if n.endswith("attn1")]
    hooks = [m.register_forward_pre_hook(lambda mod, args: called.append(mod)) for m in attn1]
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    try:
        with torch.no_grad():
            pipe.unet(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 77, 96), added_cond_kwargs=added)
    finally:
        for h in hooks:
            h.remove()
    ours = [sd.unet.get_submodule(m).to_q.weight for m in self_attention_layers(sd)]
    assert seen == list(range(len(ours))) == list(range(28))
    assert all(torch.equal(m.to_q.weight, w) for m, w in zip(called, ours)) and len(called) == 28


def noise():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))


@pytest.fixture(scope="module")
def plain(official, pipe):
    """The official script's first run: its plain `AttentionBase` editor."""
    return official_images(official, pipe, official.utils.AttentionBase(), noise())


@oracle
@pytest.mark.parametrize("which", [0, 1, 2])
def test_matches_official_sdxl(official, pipe, sd, plain, which):
    """Each of the official script's three runs (start layers 44, 54, 64 on SDXL), scaled as above."""
    start = sdxl_start_layers(sd)[which]
    lat = noise()
    editor = official.masactrl.MutualSelfAttentionControl(START_STEP, start, layer_idx=list(range(start, 28)),
                                                          total_steps=STEPS, model_type="SDXL")
    theirs = official_images(official, pipe, editor, lat)
    ours = MasaCtrl(sd, SRC, TGT, steps=STEPS, start_step=START_STEP, start_layer=start).run(
        guidance_scale=GUIDANCE, latents=lat, progress=False).images
    diff = (ours - theirs).abs().max().item()
    print(f"start layer {start}: max |ours - official| = {diff:.2e}")
    assert diff < 1e-4
    assert (theirs[0] - plain[0]).abs().max() < 1e-5  # the source is not edited
    assert (theirs[1] - plain[1]).abs().max() > 1e-3  # the target is


@oracle
def test_mask_guided_matches_official_at_16x16(official, pipe, sd):
    """Mask-guided (MutualSelfAttentionControlMaskAuto) where SDXL has a 16x16 cross-attention map: a
    256x256 image (32x32 latent, level 1; on SDXL 256 or 512). The word's token positions are read with
    the pipeline's tokenizer. Plain MasaCtrl from the same noise differs by about 1e-2: the masks matter."""
    tok = pipe.tokenizer
    pos = lambda prompt, word: [tok(prompt).input_ids.index(tok(word).input_ids[1])]
    start = sdxl_start_layers(sd)[0]
    lat = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    editor = official.masactrl.MutualSelfAttentionControlMaskAuto(
        START_STEP, start, layer_idx=list(range(start, 28)), total_steps=STEPS, ref_token_idx=pos(SRC, "circle"),
        cur_token_idx=pos(TGT, "star"), model_type="SDXL")
    theirs = official_images(official, pipe, editor, lat)
    kw = dict(steps=STEPS, start_step=START_STEP, start_layer=start)
    res = MasaCtrl(sd, SRC, TGT, mask_word=("circle", "star"), **kw).run(guidance_scale=GUIDANCE, latents=lat,
                                                                         progress=False)
    unmasked = MasaCtrl(sd, SRC, TGT, **kw).run(guidance_scale=GUIDANCE, latents=lat, progress=False).images
    diff = (res.images - theirs).abs().max().item()
    print(f"mask-guided: max |ours - official| = {diff:.2e}")
    assert diff < 1e-4
    assert (res.images[1] - unmasked[1]).abs().max() > 1e-3
    cut = res.masks >= 0.1  # the official threshold: each mask has a foreground and a background
    assert cut.flatten(1).any(1).all() and not cut.flatten(1).all(1).any()


def test_mask_guided_refused_without_16x16_maps(sd):
    """At the model's own size (64 here; 1024 on SDXL) the maps are 4x4 and 2x2 (on SDXL 64x64 and 32x32):
    the official editor would silently make no mask, so we refuse and name the sizes that work."""
    with pytest.raises(ValueError, match=r"64x64 image has 4x4, 2x2; use a square image of side 512 or 256"):
        MasaCtrl(sd, SRC, TGT, steps=STEPS, mask_word=("circle", "star")).run(latents=torch.zeros(1, 4, 8, 8),
                                                                              progress=False)
