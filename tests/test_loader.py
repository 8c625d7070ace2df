"""Single-file round trips and `load(path, config=...)`, against the diffusers-built fixtures."""
import json
import os
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

import sdlens
from sdlens import WeightsError
from sdlens.weights import to_single_file
from sdlens.weights.load import TOKENIZER_DIR as TOKENIZER
from sdlens.weights.save import save_single_file


def test_single_file_round_trip(fixture, tmp_path):
    """save_single_file -> load keeps the pad token: SD 2's "!" (id 0) came back as 49407 before,
    and the text embeddings moved by up to 2.5. Oracle: diffusers' own text encoder and tokenizer."""
    fx = fixture
    sd = sdlens.load(fx["folder"])
    path = tmp_path / "model.safetensors"
    save_single_file(sd, str(path), dtype=torch.float32)
    again = sdlens.load(path)
    assert again.tokenizer.pad_token_id == sd.tokenizer.pad_token_id == (0 if fx["kind"] == "sd2v" else 49407)
    assert (again.scheduler, again.default_size, again.text_encoder.cfg) == (sd.scheduler, sd.default_size, sd.text_encoder.cfg)
    prompts = ["a cat riding a bicycle", ""]
    pipe = fx["pipe"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(again.encode_prompt(prompts), theirs, atol=1e-5, rtol=1e-5)
    for a, b in ((again.unet, sd.unet), (again.text_encoder, sd.text_encoder), (again.vae, sd.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # 128^2, not 64^2: at 64^2 the UNet's deepest level is 1x1 and its GroupNorm groups hold 2 numbers, whose
    # near-ties amplify kernel-order rounding ~1000x (bench/gpu.py CHECK_MIN_SIZE): 1.8e-5 apart on one thread
    kw = dict(steps=3, seed=0, height=128, width=128, output="tensor", progress=False)
    torch.testing.assert_close(again.generate("a cat", **kw), sd.generate("a cat", **kw), atol=1e-5, rtol=0)


def build_small(root):
    """A model that fits no SD preset (16/32 channels, 8 norm groups, text width 32), built with
    diffusers; written as a diffusers folder and as a single file without sdlens metadata."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                                block_out_channels=(16, 32), attention_head_dim=2, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.5)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=32, num_attention_heads=2,
                                        intermediate_size=64, num_hidden_layers=1, pad_token_id=1, bos_token_id=49406,
                                        eos_token_id=49407))
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
                                   scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = os.path.join(root, "folder")
    pipe.save_pretrained(folder, safe_serialization=True)
    ref = sdlens.load(folder)
    single = os.path.join(root, "small.safetensors")
    save_file(to_single_file(unet.state_dict(), vae.state_dict(), text.state_dict(), ref.unet.cfg, ref.vae.cfg), single)
    return folder, single, ref


def same_model(a, b):
    assert (a.unet.cfg, a.vae.cfg, a.text_encoder.cfg, a.scheduler, a.default_size) == \
           (b.unet.cfg, b.vae.cfg, b.text_encoder.cfg, b.scheduler, b.default_size)
    assert a.tokenizer.pad_token_id == b.tokenizer.pad_token_id
    for x, y in [(a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)]:
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


def test_single_file_that_fits_no_preset_loads_with_config(tmp_path):
    folder, single, ref = build_small(str(tmp_path))
    with pytest.raises(WeightsError) as e:  # before: ZeroDivisionError from the text heads (32 // 64)
        sdlens.load(single)
    msg = str(e.value)
    assert "\n" not in msg and "fit no SD 1.x/2.x preset" in msg and "config=" in msg
    same_model(sdlens.load(single, config=folder), ref)
    # A JSON config is the metadata format of save_single_file; a file with that metadata needs no config=.
    cfg = {"unet": asdict(ref.unet.cfg), "vae": asdict(ref.vae.cfg), "text": asdict(ref.text_encoder.cfg),
           "scheduler": asdict(ref.scheduler), "default_size": ref.default_size}
    (tmp_path / "small.json").write_text(json.dumps(cfg))
    same_model(sdlens.load(single, config=tmp_path / "small.json"), ref)
    save_single_file(ref, str(tmp_path / "saved.safetensors"), dtype=torch.float32)
    same_model(sdlens.load(tmp_path / "saved.safetensors"), ref)
    with pytest.raises(WeightsError, match="config= is for single files"):
        sdlens.load(folder, config=folder)
    with pytest.raises(WeightsError, match="neither a diffusers folder nor a .json"):
        sdlens.load(single, config=tmp_path / "nope")
    bad = dict(cfg, text=dict(cfg["text"], num_heads=3))  # 32 is not divisible by 3 heads
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(WeightsError, match="text width 32 is not divisible by its 3 attention heads"):
        sdlens.load(single, config=tmp_path / "bad.json")
