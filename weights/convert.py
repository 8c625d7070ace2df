"""Key layouts: the original (LDM) names our modules use, and the rules to other layouts.

We write each mapping in one direction only, from our (original) key to the other layout's key.
Loading a diffusers folder inverts it over the model's own key list, and `to_single_file` uses
it forwards, so the two can never disagree.
"""
import re

import torch

# Prefixes of the original single-file checkpoint.
UNET, VAE, TEXT_SD1, TEXT_SD2 = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "cond_stage_model.model."
# SDXL (sgm): CLIP-L in the Hugging Face layout, OpenCLIP bigG in its own.
TEXT_XL_L, TEXT_XL_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

_RESNET_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _sub(rest, table):
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def unet_to_diffusers(key, cfg):
    """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight`, etc."""
    R, L = cfg.num_res_blocks, len(cfg.channel_mult)
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
           "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if _sub(key, top) != key:
        return _sub(key, top)
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?(\d+)\.(.*)", key)
    if m is None:
        return key
    part, n, k, rest = m.group(1), int(m.group(2) or 0), int(m.group(3)), m.group(4)
    if part == "middle_block":
        n, k = k, None
        if n == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{n // 2}.{_sub(rest, _RESNET_UNET)}"
    if part == "input_blocks":
        level, j = (n - 1) // (R + 1), (n - 1) % (R + 1)
        if j == R:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[len('op.'):]}"
        where = "down_blocks"
    else:
        level, j = n // (R + 1), n % (R + 1)
        if k > 0 and rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        where = "up_blocks"
    if k == 0:
        return f"{where}.{level}.resnets.{j}.{_sub(rest, _RESNET_UNET)}"
    return f"{where}.{level}.attentions.{j}.{rest}"


def vae_to_diffusers(key, cfg):
    """`decoder.up.0.block.1.nin_shortcut.weight` -> `decoder.up_blocks.3.resnets.1.conv_shortcut.weight`."""
    L = len(cfg.ch_mult)
    res = {"nin_shortcut": "conv_shortcut"}
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", key)
    if m:
        coder, _, i, what, j, rest = m.groups()
        i = int(i) if coder == "encoder" else L - 1 - int(i)  # decoder.up.i runs deepest-first
        blocks = "down_blocks" if coder == "encoder" else "up_blocks"
        if j is not None:
            return f"{coder}.{blocks}.{i}.resnets.{j}.{_sub(rest, res)}"
        return f"{coder}.{blocks}.{i}.{what}rs.0.{rest}"
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key)
    if m:
        coder, what, rest = m.groups()
        if what == "attn_1":
            return f"{coder}.mid_block.attentions.0.{_sub(rest, attn)}"
        return f"{coder}.mid_block.resnets.{int(what[-1]) - 1}.{_sub(rest, res)}"
    return _sub(key, {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"})


def vae_tensor_to_diffusers(key, t):
    """The VAE mid-attention q/k/v/proj_out are 1x1 convs in the original and Linear in diffusers."""
    if ".mid.attn_1." in key and key.endswith("weight") and t.ndim == 4:
        return t[:, :, 0, 0]
    return t


_OPENCLIP = {"token_embedding": "text_model.embeddings.token_embedding",
             "ln_final": "text_model.final_layer_norm"}
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def text_from_openclip(key, t):
    """One OpenCLIP text key (prefix stripped) -> [(our key, tensor)]; fused in_proj splits in three.

    `text_projection` is applied as x @ W in OpenCLIP, so it becomes our Linear's weight W^T.
    Keys our model does not have (later layers, `logit_scale`) keep a name the loader
    recognises as unexpected or harmless.
    """
    if key == "positional_embedding":
        return [("text_model.embeddings.position_embedding.weight", t)]
    if key == "text_projection":
        return [("text_projection.weight", None if t is None else t.T)]
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
    if m is None:
        return [(_sub(key, _OPENCLIP), t)]
    i, rest = m.groups()
    base = f"text_model.encoder.layers.{i}."
    m = re.match(r"attn\.in_proj_(weight|bias)", rest)
    if m:
        return [(f"{base}self_attn.{p}_proj.{m.group(1)}", c) for p, c in zip("qkv", t.chunk(3, dim=0))]
    return [(base + _sub(rest, _OPENCLIP_LAYER), t)]


def text_to_openclip(sd):
    """Our text state dict -> OpenCLIP keys with fused in_proj (for writing SD 2 single files)."""
    inv_layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out = {}
    for key, t in sd.items():
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = t
            continue
        if key == "text_projection.weight":
            out["text_projection"] = t.T
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if m is None:
            out[_sub(key, {v: k for k, v in _OPENCLIP.items()})] = t
            continue
        i, rest = m.groups()
        pm = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
        if pm:
            if pm.group(1) == "q":
                kind = pm.group(2)
                out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            continue
        out[f"transformer.resblocks.{i}.{_sub(rest, inv_layer)}"] = t
    return out


def to_single_file(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, openclip=False, text_2_sd=None):
    """diffusers-layout state dicts -> one original-layout dict, as a single-file checkpoint has.
    With `text_2_sd` (SDXL's second encoder, HF layout), the sgm layout: `conditioner.embedders.*`.

    The inverse of what `load` does for folders; used by the tests to build single-file fixtures
    and by `weights.save.save_single_file`.
    """
    from ..unet import UNetModel
    from ..vae import AutoencoderKL
    with torch.device("meta"):
        unet_keys, vae_keys = UNetModel(unet_cfg).state_dict().keys(), AutoencoderKL(vae_cfg).state_dict().keys()
    out = {UNET + k: unet_sd[unet_to_diffusers(k, unet_cfg)] for k in unet_keys}
    for k in vae_keys:
        t = vae_sd[vae_to_diffusers(k, vae_cfg)]
        out[VAE + k] = t[:, :, None, None] if t.ndim == 2 else t
    hf = lambda sd: {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                     for k, v in sd.items() if not k.endswith("position_ids")}
    text_sd = hf(text_sd)
    if text_2_sd is not None:
        out.update({TEXT_XL_L + k: v for k, v in text_sd.items()})
        out.update({TEXT_XL_G + k: v for k, v in text_to_openclip(hf(text_2_sd)).items()})
    elif openclip:
        out.update({TEXT_SD2 + k: v for k, v in text_to_openclip(text_sd).items()})
    else:
        out.update({TEXT_SD1 + k: v for k, v in text_sd.items()})
    return {k: v.contiguous() for k, v in out.items()}
