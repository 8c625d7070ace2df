"""Model configs, from the places they can come from, checked before anything is built.

- a diffusers folder's config.json files (`folder_configs`), also usable for a single file via
  `load(path, config=FOLDER)`, as diffusers' `from_single_file(config=...)`;
- the `sdlens` metadata that `save_single_file` writes into a single file, or the same JSON as a
  file of its own (`load(path, config="model.json")`);
- the SD 1/2 presets that a public single file's shapes select (weights/load.py).

A config that cannot build a working model (a size of 0, a width that its heads or norm groups do
not divide) is refused here with the file and the field, not later with a ZeroDivisionError.
"""
import dataclasses
import json
import os

from ..schedulers import DDIMConfig
from ..text import TextConfig
from ..unet import UNetConfig
from ..vae import VAEConfig


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line and says what to do."""


def _short(e):
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


# Fields that are sizes: diffusers/transformers config.json names, then our configs' names (metadata).
SIZES = {"in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "sample_size", "norm_num_groups",
         "block_out_channels", "attention_head_dim", "num_attention_heads", "latent_channels", "vocab_size",
         "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings", "num_train_timesteps",
         "model_channels", "channel_mult", "num_res_blocks", "num_heads", "context_dim", "norm_groups", "ch",
         "ch_mult", "z_channels", "num_layers", "max_positions", "default_size", "projection_dim",
         "addition_time_embed_dim", "projection_class_embeddings_input_dim"}


NULLABLE = {"attention_head_dim", "num_attention_heads", "addition_time_embed_dim",
            "projection_class_embeddings_input_dim", "projection_dim"}


def check_sizes(d, path):
    """Every size field present in the dict `d` (read from `path`) is a positive int or a list of them."""
    if not isinstance(d, dict):
        raise WeightsError(f"{path}: expected a JSON object {{...}}, found a {type(d).__name__}")
    pos = lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0
    for k, v in d.items():
        if k not in SIZES or (v is None and k in NULLABLE) or (k == "projection_dim" and v == 0):  # 0: none
            continue
        if not (pos(v) or (isinstance(v, (list, tuple)) and v and all(pos(x) for x in v))):
            what = "a list of positive integers" if isinstance(v, (list, tuple)) else "a positive integer"
            raise WeightsError(f"{path}: {k} must be {what}, not {v!r}")
    return d


def read_json(path):
    try:
        with open(path) as f:
            return check_sizes(json.load(f), path)
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing; a diffusers folder needs model_index.json and unet/, vae/, "
                           "text_encoder/, tokenizer/, scheduler/") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({_short(e)})") from None


def structure_problem(u: UNetConfig, v: VAEConfig, t: TextConfig, t2: TextConfig = None):
    """Why these configs cannot build a working model, or None. GroupNorm needs the channels
    divisible by the groups, attention the width divisible by the heads; SDXL's two encoders must
    fill the context and the pooled vector the added conditioning."""
    if u.adm_in_channels or t2 is not None:
        if t2 is None or not u.adm_in_channels:
            return "an SDXL model needs both the UNet's added conditioning and a second text encoder"
        if t.hidden_size + t2.hidden_size != u.context_dim:
            return f"the text widths {t.hidden_size} + {t2.hidden_size} do not make the UNet's context {u.context_dim}"
        if t2.projection_dim != u.pooled_dim or u.pooled_dim + 6 > u.context_dim:
            return (f"the pooled text vector ({t2.projection_dim}) and 6 x {u.time_id_dim} time ids do not make "
                    f"the UNet's added conditioning ({u.adm_in_channels}), or do not fit in a context row")
        problem = structure_problem(dataclasses.replace(u, adm_in_channels=0), v, t2)
        if problem:
            return problem
    last = len(u.channel_mult) - 1
    for i, m in enumerate(u.channel_mult):
        c = u.model_channels * m
        if c % u.norm_groups:
            return f"UNet width {c} is not divisible by its {u.norm_groups} norm groups"
        if (i in u.attention_levels or i == last) and (u.num_heads[i] < 1 or c % u.num_heads[i]):
            return f"UNet width {c} at level {i} is not divisible by its {u.num_heads[i]} attention heads"
    for m in v.ch_mult:
        if v.ch * m % v.norm_groups:
            return f"VAE width {v.ch * m} is not divisible by its {v.norm_groups} norm groups"
    if t.num_heads < 1 or t.hidden_size % t.num_heads:
        return f"text width {t.hidden_size} is not divisible by its {t.num_heads} attention heads"
    if t.act not in ("quick_gelu", "gelu"):
        return f"text activation {t.act!r} is not 'quick_gelu' or 'gelu'"
    return None


def _mult(channels, path, key):
    if any(c % channels[0] for c in channels):
        raise WeightsError(f"{path}: {key} {list(channels)} must all be multiples of the first")
    return tuple(c // channels[0] for c in channels)


def text_config(tc, path, sdxl=False, pooled=False):
    """A transformers CLIP text config.json dict -> TextConfig. SDXL reads both encoders at the
    penultimate layer; its second (`pooled`, a `CLIPTextModelWithProjection`) also has the projection."""
    check_sizes(tc, path)
    try:
        proj = tc["projection_dim"] if pooled else 0
        return TextConfig(vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], num_layers=tc["num_hidden_layers"],
                          num_heads=tc["num_attention_heads"], intermediate_size=tc["intermediate_size"],
                          max_positions=tc["max_position_embeddings"], act=tc.get("hidden_act", "quick_gelu"),
                          output="penultimate" if sdxl else "last", projection_dim=proj)
    except KeyError as e:
        raise WeightsError(f"{path}: no {e} field") from None


def configs_from_diffusers(uc, vc, tc, where=".", tc2=None):
    """The config.json dicts of a diffusers folder -> our configs (`where`: the folder, for messages).
    `tc2`: SDXL's text_encoder_2 config; then the result has a fourth entry, its TextConfig."""
    up, vp, tp = (os.path.join(where, s, "config.json") for s in ("unet", "vae", "text_encoder"))
    for d, p in ((uc, up), (vc, vp), (tc, tp)):
        check_sizes(d, p)
    sdxl = uc.get("addition_embed_type") == "text_time"  # SDXL's added conditioning
    unsupported = [k for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim",
                               "reverse_transformer_layers_per_block") if uc.get(k) and not (sdxl and k == "addition_embed_type")]
    boc = uc.get("block_out_channels") or [0]
    tl = uc.get("transformer_layers_per_block", 1)
    tl = tuple(tl) if isinstance(tl, (list, tuple)) else (tl,) * len(boc)
    if sdxl and tc2 is None:
        raise WeightsError(f"{up} is an SDXL UNet (addition_embed_type text_time) but the folder has no "
                           "text_encoder_2/; copy it from the model's repository")
    try:
        if unsupported or len(tl) != len(boc) or not all(isinstance(x, int) and x > 0 for x in tl) \
                or uc.get("only_cross_attention"):
            raise WeightsError(f"{up} uses {unsupported or 'an unusual transformer_layers_per_block'}; "
                               "this is not an SD 1.x/2.x or SDXL UNet")
        boc, types = uc["block_out_channels"], uc["down_block_types"]
        heads = uc.get("num_attention_heads") or uc.get("attention_head_dim") or 8  # diffusers' misnomer: heads
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(boc)
        if not isinstance(types, (list, tuple)) or len(types) != len(boc) or len(heads) != len(boc):
            raise WeightsError(f"{up}: down_block_types and attention_head_dim need one entry per block_out_channels")
        unet = UNetConfig(in_channels=uc["in_channels"], out_channels=uc["out_channels"], model_channels=boc[0],
                          channel_mult=_mult(boc, up, "block_out_channels"), num_res_blocks=uc["layers_per_block"],
                          attention_levels=tuple(i for i, t in enumerate(types) if "CrossAttn" in str(t)),
                          num_heads=heads, context_dim=uc["cross_attention_dim"],
                          use_linear_in_transformer=bool(uc.get("use_linear_projection")),
                          upcast_attention=bool(uc.get("upcast_attention")), norm_groups=uc.get("norm_num_groups", 32),
                          transformer_depth=tl if set(tl) != {1} else (),
                          adm_in_channels=uc["projection_class_embeddings_input_dim"] if sdxl else 0,
                          time_id_dim=uc.get("addition_time_embed_dim", 256) if sdxl else 256)
    except KeyError as e:
        raise WeightsError(f"{up}: no {e} field") from None
    try:
        vb = vc["block_out_channels"]
        vae = VAEConfig(ch=vb[0], ch_mult=_mult(vb, vp, "block_out_channels"), num_res_blocks=vc["layers_per_block"],
                        z_channels=vc["latent_channels"], in_channels=vc.get("in_channels", 3),
                        scaling_factor=vc.get("scaling_factor", 0.18215), norm_groups=vc.get("norm_num_groups", 32))
    except KeyError as e:
        raise WeightsError(f"{vp}: no {e} field") from None
    sf = vae.scaling_factor
    if not isinstance(sf, (int, float)) or isinstance(sf, bool) or not 0 < sf < float("inf"):
        raise WeightsError(f"{vp}: scaling_factor must be a positive number, not {sf!r}")
    text = text_config(tc, tp, sdxl)
    text2 = text_config(tc2, os.path.join(where, "text_encoder_2", "config.json"), True, True) if sdxl else None
    problem = structure_problem(unet, vae, text, text2)
    if problem:
        raise WeightsError(f"{where}: its config.json files describe no working model: {problem}")
    return (unet, vae, text, text2) if tc2 is not None else (unet, vae, text)


def folder_configs(folder, prediction_type=None):
    """A diffusers folder's configs: dict(unet, vae, text, text_2 (SDXL, else None), scheduler, default_size,
    tokenizer and tokenizer_2 folders, force_zeros (model_index.json's force_zeros_for_empty_prompt),
    defaults (sampling defaults: the turbo models'), name)."""
    j = lambda sub, name="config.json": read_json(os.path.join(folder, sub, name))
    index = read_json(os.path.join(folder, "model_index.json"))
    sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2")) or bool(index.get("text_encoder_2"))
    ucfg, vcfg, tcfg, *t2 = configs_from_diffusers(j("unet"), j("vae"), j("text_encoder"), folder,
                                                    j("text_encoder_2") if sdxl else None)
    sc = j("scheduler", "scheduler_config.json")
    fields = {k: sc[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset",
                                 "set_alpha_to_one", "prediction_type", "timestep_spacing") if k in sc}
    if prediction_type:
        fields["prediction_type"] = prediction_type
    try:
        sched = DDIMConfig(**fields)
    except ValueError as e:
        raise WeightsError(f"{folder}/scheduler/scheduler_config.json: {_short(e)}") from None
    toks = [os.path.join(folder, t) for t in ("tokenizer", "tokenizer_2")[:1 + sdxl]]
    for tok in toks:
        if not os.path.isdir(tok):
            raise WeightsError(f"{folder}: the {os.path.basename(tok)}/ folder is missing; copy it from the model's "
                               "repository (every SD model uses the CLIP tokenizer)")
    from .presets import for_folder
    sched, defaults = for_folder(sched)
    return dict(unet=ucfg, vae=vcfg, text=tcfg, text_2=t2[0] if t2 else None, scheduler=sched, tokenizer=toks[0],
                tokenizer_2=toks[1] if sdxl else None, pad_token=None, force_zeros=bool(index.get(
                    "force_zeros_for_empty_prompt", False)), defaults=defaults,
                name=os.path.basename(os.path.normpath(folder)),
                default_size=j("unet").get("sample_size", 64) * 2 ** (len(vcfg.ch_mult) - 1))


def metadata_configs(m, where):
    """The sdlens metadata dict (see `save_single_file`) -> the same dict as `folder_configs`.

    Its fields: "unet", "vae", "text", "scheduler" (each our config's fields), "default_size"
    (image side in pixels) and optionally "pad_token" (the tokenizer's pad token, "!" for SD 2);
    SDXL adds "text_2", "pad_token_2", "force_zeros"; "defaults" and "name" are optional.
    """
    tup = lambda d: {k: tuple(x) if isinstance(x, list) else x for k, x in check_sizes(d, where).items()}
    try:
        check_sizes(m, where), check_sizes(m["scheduler"], where)
        out = dict(unet=UNetConfig(**tup(m["unet"])), vae=VAEConfig(**tup(m["vae"])), text=TextConfig(**tup(m["text"])),
                   text_2=TextConfig(**tup(m["text_2"])) if m.get("text_2") else None,
                   scheduler=DDIMConfig(**m["scheduler"]), default_size=int(m["default_size"]), tokenizer=None,
                   tokenizer_2=None, pad_token=m.get("pad_token"), pad_token_2=m.get("pad_token_2"),
                   force_zeros=bool(m.get("force_zeros", False)), defaults=dict(m.get("defaults") or {}),
                   name=str(m.get("name", "")))
    except WeightsError:
        raise
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise WeightsError(f"{where}: the sdlens configs are unreadable ({type(e).__name__}: {_short(e)})") from None
    problem = structure_problem(out["unet"], out["vae"], out["text"], out["text_2"])
    if problem:
        raise WeightsError(f"{where}: the sdlens configs describe no working model: {problem}")
    return out


def given_configs(config, prediction_type=None):
    """`load(..., config=...)`: a diffusers folder, or a JSON file in the sdlens metadata format.
    (A preset name, "sdxl-turbo" and the like, is handled by the loader: it keeps the file's shapes.)"""
    config = os.fspath(config)
    if os.path.isdir(config):
        return folder_configs(config, prediction_type)
    if config.lower().endswith(".json") and os.path.isfile(config):
        try:
            with open(config) as f:
                m = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{config}: not valid JSON ({_short(e)})") from None
        return metadata_configs(m, config)
    from .presets import PRESETS
    raise WeightsError(f"config={config!r} is neither a diffusers folder nor a .json file of sdlens configs nor a "
                       f"preset ({', '.join(PRESETS)})")
