"""Fixtures: small random SD models in the exact public layouts, built with diffusers and
transformers (the oracles), saved as diffusers folders and as original single-file checkpoints."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`-n 2`, setup.cfg) each worker computes on one thread: two workers with torch's two
# threads each would make four on two cores, and OpenMP's spinning threads then wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "clip_tokenizer")

# Topologies that keep every structural feature of the real ones (4 levels, 2 ResBlocks per level,
# no attention at the deepest level, conv vs linear proj_in, heads 8 vs head_dim 64), at tiny widths.
SPECS = {
    "sd1": dict(unet=dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=8, cross_attention_dim=64),
                text=dict(hidden_size=64, num_attention_heads=1, intermediate_size=128, hidden_act="quick_gelu",
                          num_hidden_layers=2, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
                prediction="epsilon", pad=None),
    "sd2v": dict(unet=dict(block_out_channels=(64, 64, 128, 128), attention_head_dim=(1, 1, 2, 2), cross_attention_dim=128,
                           use_linear_projection=True, upcast_attention=True),
                 text=dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, hidden_act="gelu",
                           num_hidden_layers=2, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
                 prediction="v_prediction", pad="!"),
}


def build_pipeline(kind, seed=0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    spec = SPECS[kind]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"]))
    # Random init leaves some parameters at exact 0/1 (norms, biases); perturb all so every key matters.
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER, **({"pad_token": spec["pad"]} if spec["pad"] else {}))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=spec["prediction"])
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(torch.float32)


def save_fixture(pipe, kind, root):
    """Writes root/folder (diffusers layout) and root/model.safetensors (original layout)."""
    from safetensors.torch import save_file
    from sdlens.weights import to_single_file
    from sdlens.weights.load import configs_from_diffusers
    folder = os.path.join(root, "folder")
    pipe.save_pretrained(folder, safe_serialization=True)
    ucfg, vcfg, _ = configs_from_diffusers(dict(pipe.unet.config), dict(pipe.vae.config), pipe.text_encoder.config.to_dict())
    sd = to_single_file(pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(), ucfg, vcfg,
                        openclip=kind.startswith("sd2"))
    if kind.startswith("sd2"):
        # Real SD 2 files carry a 24th OpenCLIP block that SD never uses, and the projection: add both.
        last = pipe.text_encoder.config.num_hidden_layers
        for k in [k for k in sd if ".resblocks.0." in k]:
            sd[k.replace(".resblocks.0.", f".resblocks.{last}.")] = torch.randn_like(sd[k])
        sd["cond_stage_model.model.text_projection"] = torch.randn(128, 128)
    sd["alphas_cumprod"] = pipe.scheduler.alphas_cumprod.clone()  # a DDPM buffer, harmless by rule
    path = os.path.join(root, "model.safetensors")
    save_file(sd, path)
    return folder, path


_BUILT = {}


def _get(kind, tmp_path_factory):
    if kind not in _BUILT:  # built once per session, shared by every test that needs it
        pipe = build_pipeline(kind)
        folder, path = save_fixture(pipe, kind, str(tmp_path_factory.mktemp(kind)))
        _BUILT[kind] = dict(kind=kind, pipe=pipe, folder=folder, single=path)
    return _BUILT[kind]


@pytest.fixture(scope="session", params=list(SPECS))
def fixture(request, tmp_path_factory):
    """Each topology in turn: {kind, pipe (the diffusers oracle), folder, single}."""
    return _get(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def sd1_fixture(tmp_path_factory):
    return _get("sd1", tmp_path_factory)


@pytest.fixture(scope="session")
def sd2v_fixture(tmp_path_factory):
    return _get("sd2v", tmp_path_factory)


# SDXL at tiny widths, every structural feature kept: 3 levels with no attention at level 0,
# 1-, 2- and 3-deep spatial transformers, linear proj_in, two text encoders of DIFFERENT widths
# (diffusers' single-file loader tells them apart by width), bigG's pooled projection, and the
# added conditioning of pooled (32) + 6 x 8 time ids.
SDXL_SPEC = dict(unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 4),
                           transformer_layers_per_block=(1, 2, 3), cross_attention_dim=96, use_linear_projection=True,
                           addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=32 + 6 * 8,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
                 text=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, hidden_act="quick_gelu",
                           num_hidden_layers=3),
                 text_2=dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, hidden_act="gelu",
                             num_hidden_layers=3, projection_dim=32))


def build_sdxl_pipeline(seed=0, scheduler=None):
    """A random StableDiffusionXLPipeline in the exact public layout (DDIM unless `scheduler` is given)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=32, **SDXL_SPEC["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.13025,
                        force_upcast=True)
    ids = dict(vocab_size=49408, max_position_embeddings=77, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
    text = CLIPTextModel(CLIPTextConfig(**ids, **SDXL_SPEC["text"]))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **SDXL_SPEC["text_2"]))
    for m in (unet, vae, text, text_2):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    sched = scheduler or DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!"), unet=unet, scheduler=sched,
        force_zeros_for_empty_prompt=True, add_watermarker=False).to(torch.float32)


def save_sdxl_fixture(pipe, root):
    """root/folder (diffusers layout) and root/model.safetensors (sgm layout, no sdlens metadata)."""
    from safetensors.torch import save_file
    from sdlens.weights import to_single_file
    from sdlens.weights.load import configs_from_diffusers
    folder = os.path.join(root, "folder")
    pipe.save_pretrained(folder, safe_serialization=True)
    ucfg, vcfg, _, _ = configs_from_diffusers(dict(pipe.unet.config), dict(pipe.vae.config),
                                              pipe.text_encoder.config.to_dict(), tc2=pipe.text_encoder_2.config.to_dict())
    sd = to_single_file(pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(), ucfg, vcfg,
                        text_2_sd=pipe.text_encoder_2.state_dict())
    sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)  # in real files, unused
    path = os.path.join(root, "model.safetensors")
    save_file(sd, path)
    return folder, path


@pytest.fixture(scope="session")
def sdxl_fixture(tmp_path_factory):
    """{pipe (the diffusers oracle, DDIM), folder, single}: a small random SDXL."""
    if "sdxl" not in _BUILT:
        pipe = build_sdxl_pipeline()
        folder, path = save_sdxl_fixture(pipe, str(tmp_path_factory.mktemp("sdxl")))
        _BUILT["sdxl"] = dict(kind="sdxl", pipe=pipe, folder=folder, single=path)
    return _BUILT["sdxl"]


@pytest.fixture(scope="module")
def tiny():
    """The bundled sdlens-tiny, one per test module (methods that patch the model stay within their module)."""
    import sdlens
    return sdlens.load()


@pytest.fixture(scope="module")
def tiny_pipe():
    """sdlens-tiny as a diffusers StableDiffusionPipeline (the reference side), one per test module: tests
    change its attention processors or enable FreeU on it, so no module sees another's."""
    from diffusers import StableDiffusionPipeline
    from sdlens.weights.load import TINY_DIR
    pipe = StableDiffusionPipeline.from_pretrained(TINY_DIR, safety_checker=None, dtype=torch.float32,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
