"""Where the papers' features are in sdlens: `paper_layer(paper, layer)` gives our hook name.

    paper_layer("diffusers", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q")
        -> "output_blocks.5.1.transformer_blocks.0.attn1.hook_q"
    paper_layer("dift", 1) -> "output_blocks.5.hook_out"       paper_layer("pnp", 4) -> "output_blocks.4.0.hook_h"
    paper_layer("gdf", "up-level1-repeat1-vit-block0-cross-q") -> "output_blocks.4.1.transformer_blocks.0.attn2.hook_q"
    paper_hooks("odise", 0) -> ("output_blocks.1.hook_out", "input_blocks.9.hook_out")   (concatenated on dim 1)
    paper_layers("vpd") -> [0, 1, 2, 3]                          (the valid `layer` values)
    paper_layer("gdf", "up-level1-repeat0-vit-block0-cross-q", unet=sdxl.unet)
        -> "output_blocks.3.1.transformer_blocks.0.attn2.hook_q"    (SDXL: pass its UNet)
    paper_layer("dift", dift_index(sd), sd.unet)                  (DIFT's default for the model: SD 1, SDXL 0)

Every name is built from the numbering rules of both UNets for a topology (`unet=`, default SD 1.x/2.x: 4 levels,
2 ResBlocks per level, attention at levels 0-2, one transformer block per spatial transformer; SDXL: 3 levels,
attention at levels 1-2, 2- and 10-deep transformers), never read back from a name. tests/test_paper_layers.py
proves each entry: on the same random weights, our hook's value equals the named diffusers module's output (1e-5);
tests/test_sdxl_features.py does the same on a small SDXL and checks every name on the full-size SDXL.

What a diffusers module's OUTPUT is in our terms (diffusers 0.42 `unet_2d_blocks.py`, `resnet.py`):
- `down_blocks.i.resnets.j` / `.attentions.j` -> `input_blocks.{1+(R+1)i+j}.0.hook_out` / `.1.hook_out`
  (R = ResBlocks per level); `up_blocks.i.resnets.j` / `.attentions.j` -> `output_blocks.{(R+1)i+j}.0` / `.1`;
  `mid_block.resnets.0`, `.attentions.0`, `.resnets.1` -> `middle_block.0`, `.1`, `.2`.
- `*.resnets.j.conv2` -> that ResBlock's `hook_h` (the residual branch before the skip add; ResnetBlock2D.forward
  adds the shortcut after conv2, and output_scale_factor is 1 in SD).
- `down_blocks.i.downsamplers.0` -> `input_blocks.{(R+1)(i+1)}.hook_out`; `up_blocks.i.upsamplers.0` and
  `up_blocks.i` -> the level's last output block's `hook_out` (its upsampler runs last in that block).
- `down_blocks.i` returns a tuple: element 0 (hidden_states, after the downsampler if any) is the level's last input
  block's `hook_out`; element 1 holds every input block output of the level (each its own `input_blocks.N.hook_out`).
- A Transformer2DModel returns `.sample` (element 0 with return_dict=False): our spatial transformer's `hook_out`.
- `*.attentions.j.transformer_blocks.K.attn1|attn2` -> `*.1.transformer_blocks.K.attn1|attn2`: K numbers the
  transformer blocks in both UNets (SDXL's `transformer_layers_per_block`, sgm's `transformer_depth`).
- `attn1`/`attn2` and their `to_out.0`: our attention `hook_out` [B, N, C]. `to_q`/`to_k`/`to_v` give
  [B, N, heads*d]; ours are split per head: `rearrange(ours, "b h n d -> b n (h d)")` is theirs.
- `conv_in` -> `input_blocks.0.hook_out`; `conv_out` -> `hook_out` (the UNet's prediction).
Modules with no point of ours (norms, conv1, proj_in/out, ff, transformer_blocks.K, time_embedding, add_embedding)
raise.
"""
import functools
from typing import Tuple

from ..checks import whole
from ..unet.config import SD1

# --- The papers' tables (commits read: see each source) ---------------------------------------------------------
# DIFT (Tang et al., NeurIPS 2023), Tsingularity/dift @ 9421eb20, src/models/dift_sd.py L125-156: `up_ft[i]` is the
# output of `self.up_blocks[i]` (after its upsampler), i in [0, 1, 2, 3] (L222). SPair defaults (eval_spair.py
# L141-147, dift_sd.py L248, L272-275): SD 2.1 at 768x768, t=261, up_ft_index=1, ensemble_size=8 noise draws averaged.
# Plug-and-Play (Tumanyan et al., CVPR 2023), MichalGeyer/plug-and-play @ 4e7f703d: "decoder layer N" is
# `output_blocks[N]`; run_features_extraction.py L182-195 saves `block[0].out_layers_features` as
# f"output_block_{N}_out_layers_features", which ldm/modules/diffusionmodules/openaimodel.py L295-296 sets to
# `out_layers(h)` before the skip add: our `hook_h`. run_features_pca.py L85-87 draws the PCA of exactly those
# (configs/pnp/feature-pca-vis.yaml: "output_block_4"); run_pnp.py L90 injects layer 4. With --save_all_features
# every decoder block 0-11 is saved (L185-190); the rest of our table follows the same numbering.
# (`in_layers_features`, the other PCA row, is in_layers(x) before the timestep add: no hook of ours.)
# VPD (Zhao et al., ICCV 2023), wl-zhao/VPD @ 92095abd, vpd/models.py: the UNet's forward keeps the outputs of
# output_blocks 1, 4, 7 (L202-203) and the last block's output h (L206), and UNetWrapper.forward returns that list
# reversed (L236): VPD's feature k, finest first, is output_blocks[VPD_BLOCKS[k]]. SD 1.5 (depth/models_depth/
# model.py L48-50). Blocks 1, 4, 7 are the second of their level's three blocks, not the upsampled level outputs.
# (The segmentation model also concatenates averaged cross-attention maps onto features 1-3, L232-235.)
VPD_BLOCKS = (11, 7, 4, 1)
# ODISE (Xu et al., CVPR 2023), NVlabs/ODISE @ 2b187e4b, odise/modeling/meta_arch/ldm.py: LdmExtractor's
# `unet_block_indices=(2, 5, 8, 11)` (L241; configs/common/models/odise_with_*.py L19) index `unet.output_blocks`,
# but unet_forward (L485-489) stores the block's INPUT: `h = cat([h, hs.pop()])` is appended before
# `h = module(h, ...)`. So feature k is the channel concat of the previous block's output and the skip from the
# mirrored input block: `paper_hooks("odise", k)`. (Its encoder/decoder_block_indices (5, 7), (2, 5) index VAE
# ResBlocks, which have no hook points.) Default checkpoint SD v1-3 (L82), the SD 1.5 topology.
ODISE_BLOCKS = (2, 5, 8, 11)
# GDF (Meng et al., NeurIPS 2024, "Not All Diffusion Model Activations Have Been Evaluated as Discriminative
# Features"), Darkbblue/generic-diffusion-feature @ e4361a69. feature/components/feature_extractor.py L125-249 names
# diffusers modules `{down|up}-level{L}-repeat{R}-{res|vit}`, `-vit-block{i}-{self|cross|ffn}`, `mid-repeat{R}-res`,
# `mid-vit...`, `{down|up}-level{L}-{down|up}sampler`, `unet`, with L the diffusers block index (up-level0 is the
# coarsest) and R the resnet/attention index, both from 0. The patched diffusers files in feature/diffusers/ gather:
# res `increment` (conv2 output before the shortcut add, resnet.py L371-372) and `out` (L377); vit `out`
# (Transformer2D output with its residual, transformers/transformer_2d.py L475); attention `q`/`k`/`v` (to_q/to_k/
# to_v outputs, attention_processor.py L1129-1131) and `map` (softmax probs [B, heads, Q, K], components/
# attention.py L238-244); sampler `out`; unet `in`, `after-conv-in`, `out` (unet/unet_2d_condition.py L1170-1310).
# FeatureStore.store (feature_extractor.py L31-60) drops cross-k/v, reshapes [B, N, C] to a square [B, C, h, w]
# and casts to fp16; its TF.normalize(mean=0, std=1) is the identity. The full SD 1.5 set:
# feature/configs/config_15_full.json (196 names). `-vit-block{K}` is `.attentions[R].transformer_blocks[K]`
# (feature_extractor.py L141-158), so on SDXL K runs over its 2 or 10 blocks as our `transformer_blocks.K`.
GDF_NO_HOOK = {  # their activations that sdlens has no hook for: an error, not a nearby point
    "ffn-inner": "the feed-forward's inner GEGLU activation (attention.py L1255-1257)",
    "cross-k": "cross-attention keys of the text, which GDF never stores (feature_extractor.py L37-39)",
    "cross-v": "cross-attention values of the text, which GDF never stores (feature_extractor.py L37-39)",
    "unet-in": "the UNet's input: that is the noisy latent you pass in",
}
# GDF's "practical" sets (feature/configs/config_15_practical.json, config_xl_practical.json; used at t = 50 with
# 512^2 / 1024^2 images). Three of the XL set are transformer block outputs (attention.py L589-590, the tokens before
# proj_out): our `transformer_blocks.K.hook_out`.
GDF_PRACTICAL = {
    "sd15": ("up-level1-repeat1-vit-block0-cross-q", "up-level1-repeat2-res-out",
             "up-level2-repeat1-vit-block0-cross-q", "up-level3-repeat0-vit-block0-self-k"),
    "sdxl": ("up-level0-repeat0-vit-block7-out", "up-level0-repeat0-vit-block5-out",
             "up-level1-repeat0-vit-block0-cross-q", "up-level1-repeat0-vit-block0-out"),
}
# DIFT's default feature on SDXL. DIFT has no SDXL setting (Tsingularity/dift issue #25 asks, with no maintainer
# answer when read), so we keep what its SD 2.1 default reads: up_ft_index 1 is the output of up_blocks[1] after its
# upsampler, 1280 channels at 1/16 of the image (48x48 at 768x768; README L50: "if `up_ft_index=1`, it would be
# 1/16"). A like-for-like resolution and width is our choice, not DIFT's. On SDXL's 3 levels that is
# up_ft_index 0 (output_blocks.2 after its upsampler: 1280 channels, 1/16, 64x64 at 1024x1024); its index 1 would
# be 640 channels at 1/8, and no SDXL up block gives 1/32. `dift_index` finds the 1/16 block from the hook's level.
DIFT_DOWNSCALE = 16
PAPERS = ("diffusers", "dift", "pnp", "vpd", "odise", "gdf")
DIFFUSERS_KINDS = ("conv_in, conv_out, mid_block, down_blocks.I, up_blocks.I, <block>.resnets.J, "
                   "<block>.resnets.J.conv2, <block>.attentions.J, "
                   "<block>.attentions.J.transformer_blocks.K.attn1|attn2[.to_q|.to_k|.to_v|.to_out.0], "
                   "down_blocks.I.downsamplers.0, up_blocks.I.upsamplers.0")


@functools.lru_cache(maxsize=8)
def _tables(cfg):
    """({diffusers path: our hook}, {GDF name: our hook}, {GDF name we have no hook for: GDF_NO_HOOK key}) for a
    UNet config, walking both models' numbering: diffusers by level and repeat, ours by block index, both by
    transformer block K within a spatial transformer."""
    R, n, attn = cfg.num_res_blocks, len(cfg.channel_mult), set(cfg.attention_levels)
    diff, gdf, missing = {}, {}, {}

    def add(dpath, gname, hook):
        if dpath:
            diff[dpath] = hook
        if gname:
            gdf[gname] = hook

    def resblock(dpath, gname, ours):
        add(dpath, f"{gname}-res-out", f"{ours}.hook_out")
        add(f"{dpath}.conv2", f"{gname}-res-increment", f"{ours}.hook_h")

    def transformer(dpath, gname, ours, depth):
        add(dpath, f"{gname}-vit-out", f"{ours}.hook_out")
        for k in range(depth):  # diffusers' transformer_blocks.K is ours
            block = f"transformer_blocks.{k}"
            for a, kind in (("attn1", "self"), ("attn2", "cross")):
                d, o = f"{dpath}.{block}.{a}", f"{ours}.{block}.{a}"
                g = f"{gname}-vit-block{k}-{kind}"
                add(d, None, f"{o}.hook_out")
                add(f"{d}.to_out.0", None, f"{o}.hook_out")
                add(None, f"{g}-map", f"{o}.hook_probs")
                for p in "qkv":  # GDF never stores cross-k / -v: those go to `missing` below
                    add(f"{d}.to_{p}", None if kind == "cross" and p != "q" else f"{g}-{p}", f"{o}.hook_{p}")
            g = f"{gname}-vit-block{k}"
            add(f"{dpath}.{block}", f"{g}-out", f"{ours}.{block}.hook_out")
            missing.update({f"{g}-cross-k": "cross-k", f"{g}-cross-v": "cross-v", f"{g}-ffn-inner": "ffn-inner"})

    add("conv_in", "unet-after-conv-in", "input_blocks.0.hook_out")
    missing["unet-in"] = "unet-in"
    for i in range(n):  # diffusers down_blocks.i is our level i
        first = 1 + (R + 1) * i
        for j in range(R):
            d, g, o = f"down_blocks.{i}", f"down-level{i}-repeat{j}", f"input_blocks.{first + j}"
            resblock(f"{d}.resnets.{j}", g, f"{o}.0")
            if i in attn:
                transformer(f"{d}.attentions.{j}", g, f"{o}.1", cfg.depth(i))
        last = first + R - 1
        if i < n - 1:
            last += 1
            add(f"down_blocks.{i}.downsamplers.0", f"down-level{i}-downsampler-out", f"input_blocks.{last}.hook_out")
        add(f"down_blocks.{i}", None, f"input_blocks.{last}.hook_out")
    resblock("mid_block.resnets.0", "mid-repeat0", "middle_block.0")
    transformer("mid_block.attentions.0", "mid", "middle_block.1", cfg.depth(n - 1))
    resblock("mid_block.resnets.1", "mid-repeat1", "middle_block.2")
    add("mid_block", None, "middle_block.hook_out")
    for i in range(n):  # diffusers up_blocks.i is our level n-1-i
        for j in range(R + 1):
            d, g, o = f"up_blocks.{i}", f"up-level{i}-repeat{j}", f"output_blocks.{(R + 1) * i + j}"
            resblock(f"{d}.resnets.{j}", g, f"{o}.0")
            if n - 1 - i in attn:
                transformer(f"{d}.attentions.{j}", g, f"{o}.1", cfg.depth(n - 1 - i))
        last = f"output_blocks.{(R + 1) * i + R}.hook_out"
        if i < n - 1:
            add(f"up_blocks.{i}.upsamplers.0", f"up-level{i}-upsampler-out", last)
        add(f"up_blocks.{i}", None, last)
    add("conv_out", "unet-out", "hook_out")
    return diff, gdf, missing


def _index(paper, layer, count):
    whole(f"layer for {paper!r}", layer, not_int=TypeError)
    if not 0 <= layer < count:
        raise ValueError(f"{paper!r} has no layer {layer}; valid: {list(range(count))}")
    return layer


def _hooks(paper, layer, cfg) -> Tuple[str, ...]:
    R, n = cfg.num_res_blocks, len(cfg.channel_mult)
    n_out = n * (R + 1)  # output blocks, and as many input blocks (conv_in + R per level + n-1 downsamplers)
    if paper in ("diffusers", "gdf"):
        if not isinstance(layer, str):
            raise TypeError(f"layer for {paper!r} must be a str, got {layer!r}")
        diff, gdf, missing = _tables(cfg)
        if paper == "diffusers":
            if layer not in diff:
                raise ValueError(f"diffusers module {layer!r} has no sdlens hook point (or is not in this "
                                 f"{n}-level UNet); paths with one: {DIFFUSERS_KINDS}")
            return (diff[layer],)
        if layer in missing:
            raise ValueError(f"GDF's {layer!r} has no sdlens hook: it is {GDF_NO_HOOK[missing[layer]]}; the GDF "
                             f"names with one are paper_layers('gdf', unet)")
        if layer not in gdf:
            raise ValueError(f"{layer!r} is not a GDF activation of this {n}-level UNet; GDF names are "
                             "{down|up}-level{L}-repeat{R}-{res-out|res-increment|vit-out|vit-block{K}-"
                             "{self|cross}-{q|k|v|map}}, {down|up}-level{L}-{down|up}sampler-out, "
                             "mid-repeat{R}-res-..., mid-vit-..., unet-after-conv-in, unet-out; "
                             "all: paper_layers('gdf', unet)")
        return (gdf[layer],)
    if paper == "dift":
        return _hooks("diffusers", f"up_blocks.{_index(paper, layer, n)}", cfg)
    if paper == "pnp":
        return (f"output_blocks.{_index(paper, layer, n_out)}.0.hook_h",)
    if paper in ("vpd", "odise"):
        block = (VPD_BLOCKS if paper == "vpd" else ODISE_BLOCKS)[_index(paper, layer, 4)]
        if block >= n_out:
            raise ValueError(f"{paper!r} layer {layer} is output block {block}, which this {n}-level UNet lacks "
                             f"(it has {n_out}); the {paper.upper()} table is for SD's 4 levels")
        if paper == "vpd":
            return (f"output_blocks.{block}.hook_out",)
        # The block's input: the previous block's output, then the skip from the mirrored input block (ldm.py L486).
        prev = "middle_block.hook_out" if block == 0 else f"output_blocks.{block - 1}.hook_out"
        return prev, f"input_blocks.{n_out - 1 - block}.hook_out"
    raise ValueError(f"unknown paper {paper!r}; valid: {', '.join(PAPERS)}")


def _cfg(unet):
    if unet is None:
        return SD1  # the SD 1.x/2.x topology; SD 2's differences (heads, linear proj) do not change any name
    if not hasattr(unet, "cfg") or not hasattr(unet, "hook_names"):
        raise TypeError(f"unet must be an sdlens UNet (sd.unet), got {type(unet).__name__}")
    return unet.cfg


def paper_hooks(paper: str, layer, unet=None) -> Tuple[str, ...]:
    """The hook points that make up `paper`'s feature `layer`, to be concatenated on dim 1 in this order: one name
    for every paper but ODISE, whose feature is a block's input (two). `unet`: an sdlens UNet whose topology to
    use (default SD 1.x/2.x) and in which every name is checked to exist."""
    names = _hooks(paper, layer, _cfg(unet))
    if unet is not None:
        missing = [h for h in names if h not in set(unet.hook_names())]
        if missing:
            raise ValueError(f"{paper!r} layer {layer!r} maps to {missing[0]!r}, which this UNet does not have")
    return names


def paper_layer(paper: str, layer, unet=None) -> str:
    """Our hook name for `paper`'s `layer` (see the module docstring): `layer` is a diffusers module path
    ("diffusers"), a GDF activation name ("gdf"), DIFT's up_ft_index ("dift": 0-3 on SD, 0-2 on SDXL; the model's
    default is `dift_index(sd)`), PnP's decoder layer ("pnp": 0-11 on SD, 0-8 on SDXL),
    or an index into VPD's / ODISE's feature list ("vpd", "odise"). ODISE's features are two points concatenated:
    use `paper_hooks`."""
    names = paper_hooks(paper, layer, unet)
    if len(names) > 1:
        raise ValueError(f"{paper!r} layer {layer!r} is not one hook point but the channel concat of {list(names)} "
                         f"(the output block's input); use paper_hooks({paper!r}, {layer!r})")
    return names[0]


def paper_layers(paper: str, unet=None) -> list:
    """The valid `layer` values of `paper` for a topology (default SD 1.x/2.x), in the paper's order."""
    cfg = _cfg(unet)
    n_out = len(cfg.channel_mult) * (cfg.num_res_blocks + 1)
    if paper == "diffusers":
        return list(_tables(cfg)[0])
    if paper == "gdf":
        return list(_tables(cfg)[1])
    if paper == "dift":
        return list(range(len(cfg.channel_mult)))
    if paper == "pnp":
        return list(range(n_out))
    if paper in ("vpd", "odise"):
        return [k for k, b in enumerate(VPD_BLOCKS if paper == "vpd" else ODISE_BLOCKS) if b < n_out]
    raise ValueError(f"unknown paper {paper!r}; valid: {', '.join(PAPERS)}")


def dift_index(sd) -> int:
    """DIFT's default up_ft_index for this model: the up block whose output is 1/16 of the image (DIFT_DOWNSCALE),
    as SD 2.1's index 1, DIFT's setting. SD 1.x/2.x: 1; SDXL: 0 (see DIFT_DOWNSCALE). A model with no such block
    (sdlens-tiny: VAE factor 4, up blocks at 1/8 and 1/4) keeps DIFT's own 1. Read from each hook's `level`."""
    for i in paper_layers("dift", sd.unet):
        if sd.latent_factor * sd.unet.hook_info(paper_layer("dift", i, sd.unet)).downscale == DIFT_DOWNSCALE:
            return i
    return 1


def dift_layer(sd) -> str:
    """The hook of DIFT's default feature for this model: `paper_layer("dift", dift_index(sd), sd.unet)`."""
    return paper_layer("dift", dift_index(sd), sd.unet)


# Plug-and-Play's injected feature (editing/pnp.py), also the default layer of `features pca`.
FEATURE_LAYERS = ("output_blocks.4.0",)  # pnp-diffusers: decoder layer 4's ResBlock
# SDXL has no official PnP. Our choice, by level: SD's layer 4 is the second decoder block at maps of
# 1/4 of the latent (16x16 at 512²); SDXL's at 1/4 (32x32 at 1024²) is its first decoder level.
SDXL_FIRST_BLOCK = 1


def default_feature_layers(sd):
    """The ResBlock whose `hook_h` is injected: SD's decoder layer 4, or SDXL's analogue (our choice)."""
    if not sd.is_sdxl:
        return FEATURE_LAYERS
    infos = [sd.unet.hook_info(n) for n in sd.unet.hook_names(place="up", kind="resblock", point="h")]
    return tuple(i.module for i in infos if i.block == SDXL_FIRST_BLOCK)
