"""Perturbed-Attention Guidance (Ahn et al., ECCV 2024): guide away from a prediction whose
self-attention maps are replaced by the identity, which keeps the layer's values but loses the
structure its attention gives.

Each sampling step makes one UNet call over the rows

    uncond | cond | perturbed         (with classifier-free guidance)
    cond | perturbed                  (without)

where "perturbed" is a copy of the conditional rows (same latents, same text) whose chosen
self-attention layers attend each query to itself only: their probabilities are the identity, a
Patch on those layers' `hook_probs` that writes the "perturbed" rows. Then

    eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_p)      (with guidance)
    eps = eps_c + s (eps_c - eps_p)                           (without)

with w = `guidance_scale` and s = `pag_scale`.

The reference is diffusers 0.42.1 `StableDiffusionPAGPipeline` (pipelines/pag/), checked image for
image in tests/test_pag.py:
- rows: `_prepare_perturbed_attention_guidance` (pag_utils.py:132-149) puts [cond, cond] after the
  unconditional rows: [uncond, cond, cond] / [cond, cond];
- guidance: `_apply_perturbed_attention_guidance` (pag_utils.py:100-130), the formula above, in that
  order of operations (`classifier_free_guidance` is eps_u + w (eps_c - eps_u));
- the perturbation: `PAGCFGIdentitySelfAttnProcessor2_0` / `PAGIdentitySelfAttnProcessor2_0`
  (models/attention_processor.py:5142-5242, 5043-5139) compute to_out(to_v(x)) for the perturbed
  rows (:5120-5124, :5222-5227). Identity probabilities give I v = v exactly (each output sums one
  value times 1 and zeros), so the layer's output is the same to_out(v);
- default layers: "mid" (pipeline_pag_sd.py:215), every self-attention of the middle block: one on
  SD 1/2 (the official PAG's "m0", KU-CVLAB/Perturbed-Attention-Guidance README), ten on SDXL;
- default pag_scale 3.0 (pipeline_pag_sd.py:772). The official README uses 3.0 with guidance 4.0,
  and 5.0 without guidance.
- pag_scale 0: diffusers then runs plain classifier-free guidance (pag_utils.py:211-213,
  pipeline_pag_sd.py:924-929); so does `pag_generate` (it calls `sd.generate`).

Differences from diffusers, by choice:
- when guidance runs: diffusers only for w > 1 (pipeline_pag_sd.py:730-731); here as `sd.generate`
  (`uses_guidance`: every w but 0 and 1), so `pag_generate` at any w is `sd.generate` at that w
  plus the PAG term. For 0 < w < 1 or w < 0 diffusers drops the unconditional rows, we do not.
- layers are chosen by `HookInfo` fields, not by a regex over module names (pag_utils.py:75).
- a negative pag_scale is refused; diffusers silently turns PAG off (`pag_scale > 0`, pag_utils.py:213).
- no `pag_adaptive_scale` (diffusers' default 0, off).
Cost: a hook on `hook_probs` makes the chosen layers use the explicit attention path for every row
(the [rows, heads, queries, queries] matrix exists), where diffusers keeps SDPA for the other rows:
cheap at the middle block (SD 512: 8 x 8 maps), heavy for "up" at 64 x 64 maps. The rows that are not
perturbed then differ from SDPA's by rounding only (tests/test_pag.py: images within 1e-4, measured ~5e-6).
"""
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch

from ..checks import model, number
from ..hooks import HookInfo, StepContext
from ..pipeline import uses_guidance
from ..schedulers import classifier_free_guidance
from .patch import Patch, apply, select

PLACES = ("down", "mid", "up")
DEFAULT_LAYERS = ("mid",)  # diffusers pipeline_pag_sd.py:215; official PAG "m0" on SD 1.5
Selection = Union[str, Mapping[str, Any]]


def identity(src, dst, w):
    """Patch op: attention probabilities [rows, heads, queries, keys] -> the identity (query i attends
    to key i only), where the weight is not 0 (w None: always)."""
    eye = torch.eye(dst.shape[-2], dst.shape[-1], dtype=dst.dtype, device=dst.device)
    return eye.expand_as(dst) if w is None else torch.where(w != 0, eye, dst)


def layer_selections(sd, layers: Optional[Sequence[Selection]]) -> List[dict]:
    """`layers` -> one {HookInfo field: value} per entry, each checked to pick self-attention.

    An entry is a place, "down" / "mid" / "up" (every self-attention there, as diffusers' "mid"), or a
    dict of HookInfo fields with values or sets of values: {"place": "up", "block": 3}, {"level": 1},
    {"module": "middle_block.1.transformer_blocks.0.attn1"}. The kind (self-attention) and the point
    (probs) are fixed, so they may not be given. None: ["mid"]."""
    layers = DEFAULT_LAYERS if layers is None else layers
    if isinstance(layers, (str, Mapping)) or not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be a non-empty list of places ({', '.join(PLACES)}) or dicts of HookInfo "
                         f"fields, e.g. ['mid'] or [{{'place': 'up', 'block': 3}}], not {layers!r}")
    out = []
    for sel in layers:
        if isinstance(sel, str):
            if sel not in PLACES:
                raise ValueError(f"layers: {sel!r} is not a place; use one of {', '.join(PLACES)} or a dict of "
                                 f"HookInfo fields")
            at = {"place": sel}
        elif isinstance(sel, Mapping):
            at = dict(sel)
            bad = [k for k in at if k not in HookInfo.__dataclass_fields__ or k in ("kind", "point")]
            if bad:
                raise ValueError(f"layers: {bad[0]!r} cannot select PAG layers (kind and point are fixed: "
                                 f"self-attention probabilities); fields: place, block, level, module, "
                                 f"transformer_block, name")
        else:
            raise ValueError(f"layers: each entry is a place or a dict of HookInfo fields, not {sel!r}")
        at.update(kind="self_attention", point="probs")
        if not select(sd.unet, at):
            raise ValueError(f"layers: {sel!r} selects no self-attention layer of this UNet; "
                             f"see sd.unet.hook_names(kind='self_attention', point='probs')")
        out.append(at)
    return out


def patches(sd, layers: Optional[Sequence[Selection]] = None) -> List[Patch]:
    """The perturbation as data: identity self-attention at the chosen layers, on the "perturbed" rows,
    always (weight None). One patch per selection; overlapping selections set the identity twice."""
    return [Patch(at=at, op=identity, write="perturbed") for at in layer_selections(sd, layers)]


def pag_denoiser(sd, pag_scale):
    """The `denoiser=` factory for `sd.generate`: `(context, guidance_scale, steps) -> denoise(x, t, step)`
    over the rows uncond | cond | perturbed (or cond | perturbed without guidance)."""
    def factory(context, guidance_scale, steps):
        guided = uses_guidance(guidance_scale)  # as sd.generate built `context`
        n = context.shape[0] // 2 if guided else context.shape[0]
        cond = context[-n:]
        context = torch.cat([context, cond])
        groups = (("uncond", "cond", "perturbed") if guided else ("cond", "perturbed"))
        rows = {g: list(range(i * n, (i + 1) * n)) for i, g in enumerate(groups)}

        def denoise(x, t, step):
            with sd.unet.step_context(StepContext(step=step, t=int(t), num_steps=steps, rows=rows)):
                out = sd.unet(torch.cat([x] * len(groups)), t, context)
            if guided:
                eps_u, eps_c, eps_p = out.chunk(3)
                return classifier_free_guidance(eps_u, eps_c, guidance_scale) + pag_scale * (eps_c - eps_p)
            eps_c, eps_p = out.chunk(2)
            return eps_c + pag_scale * (eps_c - eps_p)
        return denoise
    return factory


def pag_generate(sd, prompt, *, pag_scale=3.0, layers: Optional[Sequence[Selection]] = None, **kw):
    """`sd.generate(prompt, **kw)` with Perturbed-Attention Guidance; returns what it returns.

    pag_scale: s >= 0 (diffusers' default 3.0; the official README: 3.0 with guidance 4.0, 5.0
    without); 0 is plain `sd.generate`. layers: where attention is perturbed, a list of places
    ("down", "mid", "up") or dicts of HookInfo fields ({"place": "up", "block": 3}, {"module": name});
    None: ["mid"], diffusers' and the official default. kw: `sd.generate`'s (steps, guidance_scale,
    seed, latents, height, width, output, negative_prompt, eta, sampler, progress, prepare).
    Guidance runs where `sd.generate`'s does (every w but 0 and 1; diffusers: w > 1 only)."""
    model("sd", sd)
    pag_scale = number("pag_scale", pag_scale, lo=0)
    chosen = patches(sd, layers)
    if "denoiser" in kw:
        raise TypeError("pag_generate makes its own denoiser; call sd.generate for another")
    if pag_scale == 0:  # as diffusers: no perturbed rows, plain guidance
        return sd.generate(prompt, **kw)
    with apply(sd, chosen):
        return sd.generate(prompt, denoiser=pag_denoiser(sd, pag_scale), **kw)
