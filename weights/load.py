"""Strict loading of SD weights: single-file safetensors checkpoints and diffusers folders.

Models are built on the meta device (no memory), then each tensor is read from the
memory-mapped file, cast and assigned in place, so at most one copy of the weights exists.
Every parameter must be filled and every key used; only known harmless extras are skipped.
"""
import dataclasses
import json
import os
import re

import torch

from ..text import SDXL_G, SDXL_L, CLIPTextEncoder, TextConfig
from ..unet import SDXL, UNetConfig, UNetModel
from ..vae import AutoencoderKL, VAEConfig
from .config import WeightsError, _short, folder_configs, given_configs, metadata_configs, read_json, structure_problem
from .config import configs_from_diffusers  # noqa: F401 (re-exported: the tests build fixtures with it)
from .convert import (TEXT_SD1, TEXT_SD2, TEXT_XL_G, TEXT_XL_L, UNET, VAE, text_from_openclip, unet_to_diffusers,
                      vae_to_diffusers)
from .presets import PRESETS

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "clip_tokenizer")
TINY_DIR = os.path.join(HERE, "sdlens-tiny")
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
# DDPM training buffers that LDM saves next to the model (ldm/models/diffusion/ddpm.py).
DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                "posterior_mean_coef2", "logvar"}


class TensorFile:
    """Shapes of all tensors in a file, and each tensor on demand (memory-mapped)."""

    def __init__(self, path, allow_pickle=False):
        self.path = path
        if not os.path.isfile(path):
            raise WeightsError(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            raise WeightsError(f"{path}: the file is empty; download it again")
        if path.lower().endswith(PICKLE_EXT):  # model.CKPT is a pickle too
            if not allow_pickle:
                raise WeightsError(f"{path}: pickled checkpoints can run arbitrary code when loaded; use the "
                                   ".safetensors version, or pass allow_pickle=True (--allow-pickle) if you trust it")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise WeightsError(f"{path}: cannot read the pickled checkpoint ({_short(e)})") from None
            obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
            if not isinstance(obj, dict):
                raise WeightsError(f"{path}: the pickle holds no state dict")
            self._sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            self.metadata = {}
            self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}
            self.get = self._sd.__getitem__
            return
        from safetensors import safe_open
        try:
            self._f = safe_open(path, framework="pt", device="cpu")
            self.shapes = {k: tuple(self._f.get_slice(k).get_shape()) for k in self._f.keys()}
            self.metadata = self._f.metadata() or {}
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({_short(e)}); it is truncated or "
                               "corrupt: download it again") from None
        self.get = self._get

    def _get(self, key):
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{self.path}: cannot read tensor {key} ({_short(e)}); the file is corrupt") from None


def _finite(t):
    return bool(torch.isfinite(t).all())


def fill(model, source, what, where, dtype, device):
    """Assign `source` ({our key: (shape, getter)}) into a meta-device model, strictly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source if k not in expected]
    wrong = [f"{k}: file {source[k][0]} vs model {expected[k]}" for k in expected
             if k in source and tuple(source[k][0]) != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong)):
            if items:
                parts.append(f"{len(items)} {name} (first: {', '.join(items[:3])})")
        raise WeightsError(f"{where}: does not match the {what} it looks like: {'; '.join(parts)}")
    sd = {}
    for k in expected:
        raw = source[k][1]()
        sd[k] = t = raw.to(device=device, dtype=dtype)
        # One NaN/inf weight makes every output NaN; name the tensor now rather than a black image later.
        if not _finite(t):
            if _finite(raw):
                raise WeightsError(f"{where}: {what} tensor {k} overflows {dtype} (values beyond its range); "
                                   "load it in float32 or bfloat16")
            raise WeightsError(f"{where}: {what} tensor {k} holds NaN or inf values; the file is corrupt")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _level_count(shapes, pattern):
    return 1 + max((int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m), default=-1)


def single_file_family(tf):
    """"SD 1.x", "SD 2.x" or "SDXL" from the text encoders' layout; refuses what is none of them."""
    s, p = tf.shapes, tf.path
    if UNET + "input_blocks.0.0.weight" not in s:
        raise WeightsError(f"{p}: no Stable Diffusion UNet (model.diffusion_model.*) in this file; "
                           "pass an SD 1.x/2.x/SDXL checkpoint or a diffusers folder")
    if any(k.startswith("conditioner.embedders") for k in s):
        if TEXT_XL_L + "text_model.embeddings.token_embedding.weight" in s and TEXT_XL_G + "token_embedding.weight" in s:
            return "SDXL"
        raise WeightsError(f"{p}: an sgm checkpoint without SDXL base's two text encoders (conditioner.embedders.0 "
                           "CLIP-L, .1 OpenCLIP bigG); the SDXL refiner and other sgm models are not supported")
    if TEXT_SD1 + "text_model.embeddings.token_embedding.weight" in s:
        family = "SD 1.x"
    elif TEXT_SD2 + "token_embedding.weight" in s:
        family = "SD 2.x"
    else:
        raise WeightsError(f"{p}: the UNet is there but no CLIP text encoder (cond_stage_model.*); "
                           "this is not a full SD 1.x/2.x checkpoint")
    return family


def detect_single_file(tf):
    """Keys and shapes -> (family, UNetConfig, VAEConfig, TextConfig, second TextConfig or None), by the
    SD 1/2 presets; an SDXL file is taken to be SDXL base's architecture (`load` then checks every shape)."""
    family = single_file_family(tf)
    if family == "SDXL":  # sgm sd_xl_base.yaml; its VAE (sdxl-vae) scales latents by 0.13025
        return family, SDXL, VAEConfig(scaling_factor=0.13025), SDXL_L, SDXL_G
    try:
        u, v, t = _preset_configs(tf.shapes, family == "SD 2.x")
    except KeyError as e:
        raise WeightsError(f"{tf.path}: no {e.args[0]} in this file; it is not a complete {family} checkpoint") from None
    except (ValueError, IndexError, ZeroDivisionError, AssertionError) as e:
        problem = f"{type(e).__name__}: {_short(e)}"
    else:
        problem = structure_problem(u, v, t)
    if problem:
        raise WeightsError(f"{tf.path}: its shapes fit no SD 1.x/2.x preset ({problem}) and it holds no sdlens "
                           "configs; pass config= a diffusers folder with this model's config.json files")
    return family, u, v, t, None


def _preset_configs(s, sd2):
    def first(suffix):  # a KeyError naming what is missing, not a bare StopIteration
        shape = next((v for k, v in s.items() if k.startswith(UNET) and k.endswith(suffix)), None)
        if shape is None:
            raise KeyError(f"UNet key *.{suffix} (cross-attention)")
        return shape
    mc, cin = s[UNET + "input_blocks.0.0.weight"][:2]
    downs = sorted(int(m.group(1)) for k in s for m in [re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.weight", k)] if m)
    n_in = _level_count(s, r"model\.diffusion_model\.input_blocks\.(\d+)\.")
    R = downs[0] - 1 if downs else n_in - 1
    levels = len(downs) + 1
    mult = tuple(s[UNET + f"input_blocks.{1 + i * (R + 1)}.0.out_layers.3.weight"][0] // mc for i in range(levels))
    attn = tuple(i for i in range(levels) if UNET + f"input_blocks.{1 + i * (R + 1)}.1.proj_in.weight" in s)
    ctx = first("attn2.to_k.weight")[1]
    linear = len(first("proj_in.weight")) == 2
    unet = UNetConfig(in_channels=cin, out_channels=s[UNET + "out.2.weight"][0], model_channels=mc, channel_mult=mult,
                      num_res_blocks=R, attention_levels=attn, context_dim=ctx, use_linear_in_transformer=linear,
                      # v1-inference.yaml: num_heads 8; v2: num_head_channels 64. Upcasting is always safe.
                      num_heads=tuple(m * mc // 64 for m in mult) if sd2 else (8,) * levels, upcast_attention=sd2)
    ch = s[VAE + "encoder.conv_in.weight"][0]
    vl = _level_count(s, r"first_stage_model\.encoder\.down\.(\d+)\.")
    vae = VAEConfig(ch=ch, ch_mult=tuple(s[VAE + f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(vl)),
                    num_res_blocks=_level_count(s, r"first_stage_model\.encoder\.down\.0\.block\.(\d+)\."),
                    z_channels=s[VAE + "post_quant_conv.weight"][0], in_channels=s[VAE + "encoder.conv_in.weight"][1])
    if sd2:
        vocab, d = s[TEXT_SD2 + "token_embedding.weight"]
        text = TextConfig(vocab_size=vocab, hidden_size=d, num_heads=d // 64, act="gelu",
                          # SD 2 conditions on the penultimate layer (v2-inference.yaml: layer "penultimate")
                          num_layers=_level_count(s, r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.") - 1,
                          intermediate_size=s[TEXT_SD2 + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                          max_positions=s[TEXT_SD2 + "positional_embedding"][0])
    else:
        t = TEXT_SD1 + "text_model."
        vocab, d = s[t + "embeddings.token_embedding.weight"]
        text = TextConfig(vocab_size=vocab, hidden_size=d, num_heads=d // 64,
                          num_layers=_level_count(s, r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.(\d+)\."),
                          intermediate_size=s[t + "encoder.layers.0.mlp.fc1.weight"][0],
                          max_positions=s[t + "embeddings.position_embedding.weight"][0])
    return unet, vae, text


def _harmless(key, text_cfg):
    if key in DDPM_BUFFERS or key.startswith("model_ema.") or key.endswith("position_ids"):
        return True
    if key in (TEXT_SD2 + "text_projection", TEXT_SD2 + "logit_scale", TEXT_XL_G + "logit_scale"):
        return True
    m = re.match(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= text_cfg.num_layers  # the unused last OpenCLIP block


def _tokenizer(folder, pad_token=None):
    from transformers import CLIPTokenizer
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)


def _file_configs(tf, family, config, prediction_type):
    """The configs of a single file: from `config` (a preset name, a diffusers folder or a JSON of
    sdlens configs), else from the sdlens metadata `save_single_file` wrote, else the family's preset."""
    path = tf.path
    if isinstance(config, str) and config in PRESETS:
        preset = PRESETS[config]
        if preset["family"] != family:
            raise WeightsError(f"{path}: config={config!r} is a {preset['family']} preset but this is an {family} file")
    elif config is not None:
        return given_configs(config)
    elif "sdlens" in tf.metadata:
        try:
            m = json.loads(tf.metadata["sdlens"])
        except ValueError as e:
            raise WeightsError(f"{path}: its 'sdlens' metadata is not JSON ({_short(e)}); save the file again") from None
        return metadata_configs(m, f"{path} (sdlens metadata)")
    else:
        name = {"SD 1.x": "sd1", "SDXL": "sdxl"}.get(family) or ("sd2" if prediction_type == "epsilon" else "sd2-v")
        if family == "SD 2.x" and prediction_type is None:
            print(f"sdlens: {os.path.basename(path)} is SD 2.x, assuming v-prediction (the 768-v models); pass "
                  "prediction_type='epsilon' (--prediction-type epsilon) for the 512 base models, or "
                  "config='sd-turbo' for SD-Turbo")
        config, preset = name, PRESETS[name]
    _, u, v, t, t2 = detect_single_file(tf)
    return dict(unet=u, vae=v, text=t, text_2=t2, scheduler=preset["scheduler"], default_size=preset["default_size"],
                tokenizer=None, tokenizer_2=None, pad_token=None, pad_token_2=None, name=config,
                force_zeros=preset.get("force_zeros", False), defaults=dict(preset.get("defaults", {})))


def _openclip_sources(sub, shape, get):
    """One OpenCLIP key of a single file -> [(our key, shape, getter)]: the fused in_proj gives three."""
    meta = torch.empty(shape, device="meta")
    out = []
    for i, (k, t) in enumerate(text_from_openclip(sub, meta)):
        if sub.endswith(("in_proj_weight", "in_proj_bias")):
            out.append((k, tuple(t.shape), (lambda i: lambda: get().chunk(3, dim=0)[i])(i)))
        elif sub == "text_projection":
            out.append((k, tuple(t.shape), lambda: get().T))
        else:
            out.append((k, shape, get))
    return out


def load_single_file(path, dtype, device, prediction_type=None, allow_pickle=False, config=None):
    """A single file (SD 1/2: LDM layout; SDXL: sgm layout), configs from `_file_configs`."""
    tf = TensorFile(path, allow_pickle)
    family = single_file_family(tf)
    c = _file_configs(tf, family, config, prediction_type)
    if (c["text_2"] is not None) != (family == "SDXL"):
        raise WeightsError(f"{path}: the configs given describe {'an SDXL' if c['text_2'] else 'no SDXL'} model "
                           f"but this is an {family} file")
    # (prefix, group, layout): the text encoders' keys are Hugging Face's or OpenCLIP's.
    parts = [(UNET, "unet", None), (VAE, "vae", None)] + {
        "SD 1.x": [(TEXT_SD1, "text", "hf")], "SD 2.x": [(TEXT_SD2, "text", "openclip")],
        "SDXL": [(TEXT_XL_L, "text", "hf"), (TEXT_XL_G, "text_2", "openclip")]}[family]
    groups = {"unet": {}, "vae": {}, "text": {}, "text_2": {}}
    for key, shape in tf.shapes.items():
        get = (lambda k: lambda: tf.get(k))(key)
        part = next(((p, g, lay) for p, g, lay in parts if key.startswith(p)), None)
        if part is None or (part[2] and _harmless(key, c["text"])):
            if not _harmless(key, c["text"]):
                groups["unet"]["<unknown> " + key] = (shape, get)  # reported as unexpected
            continue
        prefix, group, layout = part
        sub = key[len(prefix):]
        for k, shp, g in (_openclip_sources(sub, shape, get) if layout == "openclip" else [(sub, shape, get)]):
            groups[group][k] = (shp, g)
    sched = c["scheduler"]
    if prediction_type is not None:
        sched = dataclasses.replace(sched, prediction_type=prediction_type)
    # SD 2 and bigG pad with "!" (id 0), CLIP-L with <|endoftext|>; a saved file records its own pad tokens.
    pad = c["pad_token"] or ("!" if family == "SD 2.x" else None)
    tokenizer = _tokenizer(c["tokenizer"]) if c["tokenizer"] else _tokenizer(TOKENIZER_DIR, pad)
    with torch.device("meta"):
        unet, vae, text = UNetModel(c["unet"]), AutoencoderKL(c["vae"]), CLIPTextEncoder(c["text"])
        text_2 = CLIPTextEncoder(c["text_2"]) if c["text_2"] else None
    where = f"{path} ({family} single file{f', configs from {config}' if config is not None else ''})"
    out = dict(
        unet=fill(unet, groups["unet"], f"{family} UNet", where, dtype, device),
        vae=fill(vae, groups["vae"], "VAE", where, torch.float32, device),
        text_encoder=fill(text, groups["text"], "text encoder", where, dtype, device),
        tokenizer=tokenizer, scheduler=sched, default_size=c["default_size"], name=c.get("name", ""),
        force_zeros_for_empty_prompt=c["force_zeros"], defaults=c["defaults"])
    if text_2 is not None:
        out["text_encoder_2"] = fill(text_2, groups["text_2"], "second text encoder (OpenCLIP bigG)", where, dtype, device)
        out["tokenizer_2"] = (_tokenizer(c["tokenizer_2"]) if c.get("tokenizer_2") else
                              _tokenizer(TOKENIZER_DIR, c.get("pad_token_2") or "!"))
    return out


def _weights_file(folder, stem, allow_pickle):
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return TensorFile(path, allow_pickle)
    raise WeightsError(f"{folder}: no {stem}.safetensors in this folder")


def load_folder(folder, dtype, device, prediction_type=None, allow_pickle=False):
    c = folder_configs(folder, prediction_type)
    with torch.device("meta"):
        models = {"unet": UNetModel(c["unet"]), "vae": AutoencoderKL(c["vae"]), "text_encoder": CLIPTextEncoder(c["text"])}
        if c["text_2"] is not None:
            models["text_encoder_2"] = CLIPTextEncoder(c["text_2"])
    to_theirs = {"unet": lambda k: unet_to_diffusers(k, c["unet"]), "vae": lambda k: vae_to_diffusers(k, c["vae"])}
    what = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
    where = f"{folder} (diffusers folder)"
    out = dict(scheduler=c["scheduler"], default_size=c["default_size"], tokenizer=_tokenizer(c["tokenizer"]),
               force_zeros_for_empty_prompt=c["force_zeros"], defaults=c["defaults"], name=c["name"])
    for name, model in models.items():
        stem = "model" if name.startswith("text") else "diffusion_pytorch_model"
        tf = _weights_file(os.path.join(folder, name), stem, allow_pickle)
        ours = {k: to_theirs[name](k) if name in to_theirs else k for k in model.state_dict()}
        if name.startswith("text"):  # transformers may save CLIPTextModel without the text_model. prefix
            if not any(k.startswith("text_model.") for k in tf.shapes):
                ours = {k: k[len("text_model."):] if k.startswith("text_model.") else k for k in ours}
        theirs = {v: k for k, v in ours.items()}
        src = {}
        for key, shape in tf.shapes.items():
            if key.endswith("position_ids"):
                continue
            get = (lambda f, k: lambda: f.get(k))(tf, key)
            if name == "vae" and ".mid.attn_1." in theirs.get(key, "") and len(shape) == 2:
                shape, get = shape + (1, 1), (lambda g: lambda: g()[:, :, None, None])(get)  # Linear -> 1x1 conv
            src[theirs.get(key, key)] = (shape, get)
        out[name] = fill(model, src, what[name], f"{where}/{name}", torch.float32 if name == "vae" else dtype, device)
    if c["text_2"] is not None:
        out["tokenizer_2"] = _tokenizer(c["tokenizer_2"])
    return out


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype_device(dtype, device):
    """`dtype` as a torch dtype or its name, `device` one this machine can use; else an error naming it."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype or one of {', '.join(DTYPES)}, not {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type ({', '.join(DTYPES)}), not {dtype}")
    try:
        torch.empty(0, device=device)  # "bogus", "cuda" without CUDA, "cuda:7" on a 1-GPU machine
    except Exception as e:
        why = f" ({_short(e)})" if len(_short(e)) < 100 else ""
        raise ValueError(f"device {device!r} is not usable here{why}; use e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    return dtype, torch.device(device)


def load_components(source=None, *, device="cpu", dtype=torch.float32, prediction_type=None, allow_pickle=False,
                    config=None):
    """Dispatch on the source: None (bundled sdlens-tiny), a folder, or a single file."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise WeightsError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    dtype, device = check_dtype_device(dtype, device)
    if source is None:
        if not os.path.isfile(os.path.join(TINY_DIR, "model_index.json")):
            raise WeightsError("the bundled sdlens-tiny model is not in this install (weights/sdlens-tiny); "
                               "pass a checkpoint path or a diffusers folder")
        source = TINY_DIR
    source = os.fspath(source)
    if os.path.isdir(source):
        if config is not None:
            raise WeightsError(f"{source}: config= is for single files; a diffusers folder carries its own configs")
        return load_folder(source, dtype, device, prediction_type, allow_pickle)
    if not os.path.exists(source):
        raise WeightsError(f"{source}: no such file or folder")
    return load_single_file(source, dtype, device, prediction_type, allow_pickle, config)
