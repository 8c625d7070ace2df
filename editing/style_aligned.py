"""StyleAligned (Hertz, Voynov, Fruchter, Cohen-Or; CVPR 2024): a batch of images in one style, the
style of its first image. Every image is sampled from its own noise and prompt; in the self-attention
layers the queries and keys of each image are normalised to the reference image's statistics (AdaIN),
and each image attends to the reference's keys and values besides its own ("shared attention").

    images = style_aligned(sd, ["a toy train. macro photo", "a toy plane. macro photo"], seed=1)

Row 0 is the reference. Keywords are `sd.generate`'s (steps, guidance_scale, seed, latents, height,
width, output, ...), and so is the result.

Facts from the official code (google/style-aligned @ 2faf0af, sa_handler.py), and what is done here:
- AdaIN (`adain`, :65-71, `calc_mean_std` :59-62): per image, head and channel, over the tokens (dim
  -2 of [batch, heads, tokens, head_dim]): std = sqrt(var + 1e-5) with torch's default unbiased
  variance, x -> (x - mean_x) / std_x * std_ref + mean_ref. Applied to queries and keys (:130-135,
  `adain_queries`, `adain_keys`; values only with `adain_values`) before the keys are shared. Here a
  `Patch` on the self-attention `q`, `k` (and `v`) points: read the reference row, write its half.
- Shared attention (`concat_first`, :54-56, :137-138): each image's keys and values are followed by
  the reference's (after AdaIN), so every image, the reference too, attends to 2n keys; the
  reference meets its own keys twice, which leaves its output unchanged (the same weights twice). Here a
  hook on the `kv` point (hooks.KeyValuePoint, the one point that may add keys). It is a hook beside
  the patches, not a `Patch`: a patch writes rows of the same shape, and this one grows the key axis.
- The reference of each half: `expand_first` (:43-51) takes rows 0 and b // 2, the first row of each
  classifier-free-guidance half [uncond 0..n-1 | cond 0..n-1]. Here the rows are named in the step
  context ("uncond", "cond", "uncond_ref", "cond_ref") by the denoiser this method builds.
  Without guidance (w in {0, 1}: one UNet pass of the n conditional rows) the official code would take
  row n // 2 as a second reference; here there is one half, "cond", and row 0 is its reference.
- `shared_score_scale` multiplies the appended reference keys of the other images (not the
  reference's own copy, :46-50); `shared_score_shift` adds a constant to their attention logits
  (:87-91, :139-140; the transfer notebook uses log 2). Here the shift multiplies those keys'
  probabilities by exp(shift) and renormalises, the same softmax, at the `probs` point (so those layers
  take the explicit attention path).
- Layers: self-attention only (cross-attention keeps its plain processor, :225-227); which ones is
  `only_self_level` (:191-229): 0 = all of them (SD 16, SDXL 70); otherwise a regular fraction of the
  layers stays plain, counted in diffusers' processor order (down blocks, up blocks, then the mid
  block), which `shared_layers` reproduces from HookInfo.place.
- Norms (`register_shared_norm`, :232-261): `share_layer_norm` concatenates the reference's tokens
  before each LayerNorm and drops them after, but LayerNorm normalises each token alone, so it changes
  nothing: accepted here as the no-op it is. `share_group_norm` computes each GroupNorm's statistics
  over the image's and the reference's pixels together; it needs the input of every GroupNorm, which
  no hook point sees, so it is refused (NotImplementedError) rather than done by replacing modules'
  forward. `full_attention_share` (:169-174, off by default) is not offered.

Defaults: the attention options are StyleAlignedArgs' (sa_handler.py:29-40: share_attention,
adain_queries, adain_keys True, adain_values False, shared_score_scale 1, shared_score_shift 0,
only_self_level 0). The norms follow the SDXL notebook (style_aligned_sdxl.ipynb, demo_stylealigned_sdxl.py:
share_group_norm=False, share_layer_norm=False), not StyleAlignedArgs (both True; the SD 1 notebook
uses True). That notebook also samples with DDIM steps_offset 0 and guidance 5.0 (SDXL's pipeline
default) over 50 steps; here `sd.scheduler` and `sd.generate`'s defaults are used as they are.

The statistics are computed in float32 (and cast back), also for float16 models, where the official
code computes in float16. A map of one token has no unbiased variance (the official NaN); there the
biased one (0) is used. tests/test_style_aligned.py compares the images with a re-implementation of
the official processor on diffusers' pipelines (and, marked `oracle`, with sa_handler.py itself).
"""
import math
from typing import Dict, List, Sequence

import torch

from ..checks import flag, fraction, model, number
from ..pipeline import uses_guidance
from .patch import Patch, apply

EPS = 1e-5  # calc_mean_std's eps, inside the square root (sa_handler.py:59-60)
HALVES = (("uncond", "uncond_ref"), ("cond", "cond_ref"))  # the rows of a half, its reference row
PROCESSOR_ORDER = {"down": 0, "up": 1, "mid": 2}  # diffusers registers down_blocks, up_blocks, then mid_block


def mean_std(x: torch.Tensor):
    """Mean and std over the tokens (dim -2), std = sqrt(unbiased var + 1e-5) (sa_handler.py:59-62)."""
    correction = 1 if x.shape[-2] > 1 else 0  # one token: no unbiased variance (the official gives NaN)
    return x.mean(-2, keepdim=True), (x.var(-2, keepdim=True, correction=correction) + EPS).sqrt()


def adain(src, dst, w=None):
    """A `Patch` op: the rows `dst` take the token statistics of the reference row `src` (sa_handler.py:65-71),
    per head and channel, in float32 (float64 for a float64 model)."""
    f = torch.promote_types(dst.dtype, torch.float32)
    (ms, ss), (md, sd_) = mean_std(src.to(f)), mean_std(dst.to(f))
    return ((dst.to(f) - md) / sd_ * ss + ms).to(dst.dtype)


def switch_vector(n: int, level: float) -> List[bool]:
    """Which of `n` self-attention layers (in diffusers' processor order) stay plain, for `only_self_level`
    (sa_handler.py:191-205): 0 none, 1 all; below 1/2 every (n // int(level n))-th layer from the first,
    above 1/2 the others (the rule for 1 - level, flipped). Where int(level n) is 0 the official code
    divides by zero; here that is the rule's limit, no layer switched (before the flip)."""
    if level == 0 or level == 1:
        return [level == 1] * n
    flip = level > 0.5
    k = int((1 - level if flip else level) * n)
    vec = [k > 0 and i % (n // k) == 0 for i in range(n)]
    return [not v for v in vec] if flip else vec


def shared_layers(sd, only_self_level: float = 0.0) -> List[str]:
    """The self-attention modules StyleAligned acts on, in module order. The official code counts layers
    in diffusers' `attn_processors` order (down blocks, up blocks, mid block; sa_handler.py:212-224):
    the same order is made here from each point's HookInfo.place, never from its name."""
    infos = [sd.unet.hook_info(n) for n in sd.unet.hook_names(kind="self_attention", point="q")]
    official = sorted(range(len(infos)), key=lambda i: PROCESSOR_ORDER[infos[i].place])  # stable: module order within
    plain = switch_vector(len(infos), only_self_level)
    kept = {official[j] for j in range(len(infos)) if not plain[j]}
    return [infos[i].module for i in sorted(kept)]


def rows(n: int, guided: bool) -> Dict[str, List[int]]:
    """The step context's row groups for n prompts: with guidance [uncond 0..n-1 | cond 0..n-1], each half's
    reference its first row (the official rows 0 and b // 2); without, one half, "cond", reference row 0."""
    if not guided:
        return {"cond": list(range(n)), "cond_ref": [0]}
    return {"uncond": list(range(n)), "cond": list(range(n, 2 * n)), "uncond_ref": [0], "cond_ref": [n]}


def patches(layers: Sequence[str], adain_queries=True, adain_keys=True, adain_values=False) -> List[Patch]:
    """AdaIN as data: at the chosen self-attention layers' q / k / v, each half's rows take the statistics
    of the half's reference row, at every step (sa_handler.py:130-135 has no step schedule)."""
    points = {p for p, on in (("q", adain_queries), ("k", adain_keys), ("v", adain_values)) if on}
    if not points or not layers:
        return []
    at = {"kind": "self_attention", "point": points, "module": set(layers)}
    return [Patch(at=at, op=adain, read=ref, write=half) for half, ref in HALVES]


def share_kv(kv, hook, scale=1.0):
    """At `hook_kv` ([2, B, heads, keys, head_dim]): each row's keys and values, then its half's reference's
    (sa_handler.py:137-138, `concat_first`); the appended keys of the other rows times `scale` (:46-50)."""
    ctx = hook.ctx
    if ctx is None or not ctx.rows.get("cond_ref"):
        return None  # not a StyleAligned UNet call
    halves = [(len(ctx.rows[half]), ctx.slice(ref)) for half, ref in HALVES if ctx.rows.get(half)]  # in row order
    extra = torch.cat([kv[:, ref].expand(-1, n, -1, -1, -1) for n, ref in halves], dim=1)
    if scale != 1:
        keys = extra[0] * scale
        for _, ref in halves:  # the reference's own copy stays unscaled (expand_first's feat_style[:, :1])
            keys[ref] = kv[0, ref]
        extra = torch.stack([keys, extra[1]])
    return torch.cat([kv, extra], dim=-2)


def shift_probs(probs, hook, shift=0.0):
    """At `hook_probs` ([B, heads, queries, 2 keys]): the logits of the appended keys + `shift`
    (sa_handler.py:87-91), written on the probabilities: softmax(l + s) = p e^s / sum(p e^s)."""
    ctx = hook.ctx
    if ctx is None or not ctx.rows.get("cond_ref"):
        return None
    n = probs.shape[-2]  # own keys = queries in self-attention; the rest are the reference's
    p = torch.cat([probs[..., :n], probs[..., n:] * math.exp(shift)], dim=-1)
    return p / p.sum(-1, keepdim=True)


def share_hooks(sd, layers: Sequence[str], shared_score_scale=1.0, shared_score_shift=0.0) -> Dict[str, object]:
    """{hook name: fn}: shared attention at the chosen layers' `kv` points (and `probs`, for a shift)."""
    layers = set(layers)
    names = [n for n in sd.unet.hook_names(kind="self_attention", point="kv") if sd.unet.hook_info(n).module in layers]
    out = {n: (lambda kv, hook: share_kv(kv, hook, shared_score_scale)) for n in names}
    if shared_score_shift != 0:
        probs = [n for n in sd.unet.hook_names(kind="self_attention", point="probs")
                 if sd.unet.hook_info(n).module in layers]
        out.update({n: (lambda p, hook: shift_probs(p, hook, shared_score_shift)) for n in probs})
    return out


@torch.no_grad()
def style_aligned(sd, prompts: Sequence[str], *, adain_queries=True, adain_keys=True, adain_values=False,
                  share_attention=True, shared_score_scale=1.0, shared_score_shift=0.0, only_self_level=0.0,
                  share_group_norm=False, share_layer_norm=False, **generate_kw):
    """Generate `prompts` in the style of the first: `sd.generate(prompts, **generate_kw)` with StyleAligned's
    hooks (see the module notes for each option and its official default). Returns what generate returns."""
    model("sd", sd)
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a non-empty list of strings, the first the style reference, not {prompts!r}")
    for name, v in (("adain_queries", adain_queries), ("adain_keys", adain_keys), ("adain_values", adain_values),
                    ("share_attention", share_attention), ("share_group_norm", share_group_norm),
                    ("share_layer_norm", share_layer_norm)):
        flag(name, v)
    scale = number("shared_score_scale", shared_score_scale)
    shift = number("shared_score_shift", shared_score_shift)
    level = fraction("only_self_level", only_self_level)
    if share_group_norm:
        raise ValueError("share_group_norm=True is not supported: it needs every GroupNorm's input, which no "
                                  "hook point sees (the official SDXL notebook runs with share_group_norm=False)")
    if "denoiser" in generate_kw:
        raise TypeError("style_aligned() makes its own denoiser; pass generate's other keywords")
    # share_layer_norm: a no-op (LayerNorm normalises each token alone; see the module notes)
    layers = shared_layers(sd, level)
    edits = patches(layers, adain_queries, adain_keys, adain_values)
    shared = share_hooks(sd, layers, scale, shift) if share_attention and layers else {}

    def denoiser(context, guidance_scale, steps):
        guided = uses_guidance(guidance_scale)
        return sd.denoiser(context, guidance_scale, steps, rows=rows(len(prompts), guided))

    with apply(sd, edits), sd.unet.hooks(shared):
        return sd.generate(list(prompts), denoiser=denoiser, **generate_kw)
