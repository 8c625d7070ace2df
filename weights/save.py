"""Write a pipeline as a diffusers-format folder (the layout sdlens-tiny ships in) or as one
original-layout single file.

The inverse of the loaders: configs in diffusers' field names, tensors renamed by the same
one-direction rules in convert.py. Written to a temporary path and renamed at the end, so an
interrupted save never leaves a half-written model.
"""
import json
import os
import shutil
import tempfile
from dataclasses import asdict

import torch
from safetensors.torch import save_file

from .convert import to_single_file, unet_to_diffusers, vae_to_diffusers, vae_tensor_to_diffusers


def diffusers_configs(sd):
    u, v, t = sd.unet.cfg, sd.vae.cfg, sd.text_encoder.cfg
    n = len(u.channel_mult)
    boc = [u.model_channels * m for m in u.channel_mult]
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": sd.default_size // sd.latent_factor,
            "in_channels": u.in_channels, "out_channels": u.out_channels, "block_out_channels": boc,
            "layers_per_block": u.num_res_blocks, "cross_attention_dim": u.context_dim,
            "attention_head_dim": list(u.num_heads), "use_linear_projection": u.use_linear_in_transformer,
            "upcast_attention": u.upcast_attention, "norm_num_groups": u.norm_groups, "norm_eps": 1e-5,
            "down_block_types": ["CrossAttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in range(n)],
            "up_block_types": ["CrossAttnUpBlock2D" if i in u.attention_levels else "UpBlock2D" for i in reversed(range(n))],
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
            "transformer_layers_per_block": [u.depth(i) for i in range(n)]}
    if u.adm_in_channels:  # SDXL's added conditioning, in diffusers' names
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=u.time_id_dim,
                    projection_class_embeddings_input_dim=u.adm_in_channels)
    vae = {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.in_channels,
           "latent_channels": v.z_channels, "block_out_channels": [v.ch * m for m in v.ch_mult],
           "layers_per_block": v.num_res_blocks, "norm_num_groups": v.norm_groups, "scaling_factor": v.scaling_factor,
           "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult), "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult),
           "sample_size": sd.default_size, "act_fn": "silu"}
    def text_cfg(t, tok):
        return {"architectures": ["CLIPTextModelWithProjection" if t.projection_dim else "CLIPTextModel"],
                "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads, "max_position_embeddings": t.max_positions, "hidden_act": t.act,
                "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": tok.pad_token_id,
                "projection_dim": t.projection_dim or t.hidden_size}
    text = text_cfg(t, sd.tokenizer)
    s = sd.scheduler
    sched = {"_class_name": "DDIMScheduler", "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start,
             "beta_end": s.beta_end, "beta_schedule": s.beta_schedule, "steps_offset": s.steps_offset,
             "set_alpha_to_one": s.set_alpha_to_one, "prediction_type": s.prediction_type, "clip_sample": False,
             "timestep_spacing": s.timestep_spacing}
    text_2 = text_cfg(sd.text_encoder_2.cfg, sd.tokenizer_2) if sd.is_sdxl else None
    return unet, vae, text, sched, text_2


def save_folder(sd, path, dtype=torch.float16):
    """Write `sd` (a StableDiffusion) to `path` as a diffusers folder; refuses to overwrite."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; remove it or choose another folder")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".saving-")
    try:
        ucfg, vcfg, tcfg, scfg, t2cfg = diffusers_configs(sd)
        tensors = {
            "unet": ({unet_to_diffusers(k, sd.unet.cfg): v for k, v in sd.unet.state_dict().items()},
                     "diffusion_pytorch_model.safetensors", ucfg, "config.json"),
            "vae": ({vae_to_diffusers(k, sd.vae.cfg): vae_tensor_to_diffusers(k, v) for k, v in sd.vae.state_dict().items()},
                    "diffusion_pytorch_model.safetensors", vcfg, "config.json"),
            "text_encoder": (sd.text_encoder.state_dict(), "model.safetensors", tcfg, "config.json"),
        }
        if sd.is_sdxl:
            tensors["text_encoder_2"] = (sd.text_encoder_2.state_dict(), "model.safetensors", t2cfg, "config.json")
        for sub, (state, fname, cfg, cname) in tensors.items():
            os.makedirs(os.path.join(tmp, sub))
            save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, os.path.join(tmp, sub, fname))
            _json(os.path.join(tmp, sub, cname), cfg)
        os.makedirs(os.path.join(tmp, "scheduler"))
        _json(os.path.join(tmp, "scheduler", "scheduler_config.json"), scfg)
        sd.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
        if sd.is_sdxl:
            sd.tokenizer_2.save_pretrained(os.path.join(tmp, "tokenizer_2"))
            for k in ("safety_checker", "feature_extractor", "requires_safety_checker"):
                del index[k]
            index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"], image_encoder=[None, None],
                         force_zeros_for_empty_prompt=sd.force_zeros_for_empty_prompt)
        _json(os.path.join(tmp, "model_index.json"), index)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_single_file(sd, path, dtype=torch.float16):
    """Write `sd` as one LDM-layout safetensors file (SD 1 text layout; SDXL: sgm's layout, with
    `conditioner.embedders.0` CLIP-L and `.1` OpenCLIP bigG); refuses to overwrite.

    The keys show the shapes but not head counts, group-norm groups, the activation, the latent
    scale, the pad token or the scheduler (LDM keeps those in its yaml), so the configs go into the file's
    metadata and `load` uses them: a non-standard model such as sdlens-tiny loads back exactly.
    Files without this metadata (every public checkpoint) get the SD 1/2 presets.
    """
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; remove it or choose another file")
    u, v = sd.unet.cfg, sd.vae.cfg
    state = to_single_file({unet_to_diffusers(k, u): t for k, t in sd.unet.state_dict().items()},
                           {vae_to_diffusers(k, v): t for k, t in sd.vae.state_dict().items()},
                           sd.text_encoder.state_dict(), u, v,
                           text_2_sd=sd.text_encoder_2.state_dict() if sd.is_sdxl else None)
    # The format `load(path, config="x.json")` also reads (weights/config.py `metadata_configs`). The
    # pad token too: SD 2 pads with "!" (id 0), and the SD 1 text layout written here cannot show it.
    configs = {"unet": asdict(u), "vae": asdict(v), "text": asdict(sd.text_encoder.cfg),
               "scheduler": asdict(sd.scheduler), "default_size": sd.default_size, "pad_token": sd.tokenizer.pad_token,
               "defaults": sd.defaults, "name": sd.name}
    if sd.is_sdxl:
        configs.update(text_2=asdict(sd.text_encoder_2.cfg), pad_token_2=sd.tokenizer_2.pad_token,
                       force_zeros=sd.force_zeros_for_empty_prompt)
    meta = {"sdlens": json.dumps(configs)}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".saving-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: t.detach().to("cpu", dtype).contiguous() for k, t in state.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def _json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
