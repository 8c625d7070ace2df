"""Full-size SD 1.5 and SD 2.1 on the meta device (no memory): our key set and every shape must be
what the public checkpoints hold. The expected set comes from diffusers' full-size models mapped
back through diffusers' own LDM converters, independent of our mapping code."""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from sdlens.text import CLIPTextEncoder
from sdlens.text import clip as text_presets
from sdlens.unet import SD1, SD2_V, UNetModel
from sdlens.vae import AutoencoderKL as OurVAE, VAEConfig
from sdlens.weights import to_single_file
from sdlens.weights.load import detect_single_file

UNET_SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
UNET_SD21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True)
TEXT_SD15 = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu")
TEXT_SD21 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu")


def diffusers_models(unet_kw, text_kw):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kw)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(**text_kw))
    return unet, vae, text


def ours_prefixed(ucfg, tcfg):
    with torch.device("meta"):
        parts = (("model.diffusion_model.", UNetModel(ucfg)), ("first_stage_model.", OurVAE(VAEConfig())),
                 ("cond_stage_model.transformer.", CLIPTextEncoder(tcfg)))
    return {p + k: v for p, m in parts for k, v in m.state_dict().items()}


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_unet_and_vae_keys_match_diffusers_conversion(which):
    unet_kw = UNET_SD15 if which == "sd15" else UNET_SD21
    d_unet, d_vae, _ = diffusers_models(unet_kw, TEXT_SD15)
    ucfg = SD1 if which == "sd15" else SD2_V
    ours = ours_prefixed(ucfg, text_presets.SD1)
    conv_unet = sfu.convert_ldm_unet_checkpoint(ours, dict(d_unet.config))
    assert shapes(conv_unet) == shapes(d_unet.state_dict())
    conv_vae = sfu.convert_ldm_vae_checkpoint(ours, dict(d_vae.config))
    assert shapes(conv_vae) == shapes(d_vae.state_dict())


def test_text_keys_match_transformers():
    _, _, text = diffusers_models(UNET_SD15, TEXT_SD15)
    with torch.device("meta"):
        ours = CLIPTextEncoder(text_presets.SD1)
    theirs = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in shapes(text.state_dict()).items()
              if not k.endswith("position_ids")}
    assert shapes(ours.state_dict()) == theirs


def test_sd15_parameter_counts():
    """The published sizes: UNet 859,520,964 in 686 tensors, VAE 83,653,863, CLIP text 123,060,480."""
    with torch.device("meta"):
        unet, vae, text = UNetModel(SD1), OurVAE(VAEConfig()), CLIPTextEncoder(text_presets.SD1)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert (n(unet), len(unet.state_dict()), n(vae), n(text)) == (859_520_964, 686, 83_653_863, 123_060_480)


class MetaFile:
    def __init__(self, sd):
        self.path, self.shapes = "meta.safetensors", shapes(sd)


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_detection_at_full_size(which):
    """A full-size single file (as shapes) is recognised as the right family with the preset configs."""
    sd2 = which == "sd21"
    d_unet, d_vae, d_text = diffusers_models(UNET_SD21 if sd2 else UNET_SD15, TEXT_SD21 if sd2 else TEXT_SD15)
    ucfg = SD2_V if sd2 else SD1
    sd = to_single_file(d_unet.state_dict(), d_vae.state_dict(), d_text.state_dict(), ucfg, VAEConfig(), openclip=sd2)
    if sd2:  # the real file's unused 24th OpenCLIP block
        sd.update({k.replace("resblocks.0.", "resblocks.23."): v for k, v in sd.items() if "resblocks.0." in k})
        sd2_keys = [k for k in sd if k.startswith("cond_stage_model.model.")]
        # OpenCLIP ViT-H text layout, as in v2-1_768-ema-pruned: fused in_proj, c_fc/c_proj, ln_final
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd2_keys
        assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    family, u, v, t, _ = detect_single_file(MetaFile(sd))
    assert family == ("SD 2.x" if sd2 else "SD 1.x")
    assert (u, v, t) == (ucfg, VAEConfig(), text_presets.SD2 if sd2 else text_presets.SD1)
