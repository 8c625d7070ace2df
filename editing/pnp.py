"""Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023): text-driven image-to-image
translation that keeps the guidance image's structure by injecting its features.

The guidance image is DDIM-inverted (empty prompt by default) and its latents are kept for every
step, in memory. Each sampling step then makes one batched UNet call with the rows

    source (the inverted latent, inversion prompt) | unconditional | [negative] | conditional

and hooks copy the source row into the translation rows:
- the ResBlock feature `hook_h` of decoder layer 4 (`output_blocks.4.0`) for the first
  `feature_injection` = 0.8 of the steps;
- self-attention queries and keys (`hook_q`, `hook_k` of `attn1`) in decoder layers 4-11 for the
  first `attention_injection` = 0.5 of the steps. Only q and k are replaced, so attention keeps
  the fast SDPA path: no attention matrix is materialised.
Defaults are the official ones (pnp-diffusers `config_pnp.yaml`: 50 steps, guidance 7.5,
pnp_f_t 0.8, pnp_attn_t 0.5; the LDM code uses guidance 10 for real images).
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..hooks import StepContext
from ..schedulers import invert, sample

FEATURE_LAYERS = ("output_blocks.4.0",)
# The official list for SD (pnp-diffusers: decoder layers 4-11). `decoder_self_attention` is the
# default rule; on SD it gives exactly these (tests/test_pnp.py checks it).
ATTENTION_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in range(4, 12))


def decoder_self_attention(sd, first=4):
    """attn1 of every decoder layer from `first` on: SD's layers 4-11, and the same rule elsewhere."""
    return [n[:-len(".hook_q")] for n in sd.unet.hook_names()
            if n.startswith("output_blocks.") and int(n.split(".")[1]) >= first and n.endswith("attn1.hook_q")]


def negative_alpha(schedule: str, alpha: float, step: int, steps: int) -> float:
    """Weight of eps(empty) in the unconditional branch at `step`: eps~ = a eps(0) + (1 - a) eps(P_n).

    constant: a; linear: from 1 at the first step to a at the last; exp: a ** (step / (steps - 1)).
    """
    frac = step / max(1, steps - 1)
    if schedule == "constant":
        return alpha
    if schedule == "linear":
        return 1.0 + (alpha - 1.0) * frac
    if schedule == "exp":
        return alpha ** frac if alpha > 0 else float(step == 0)
    raise ValueError(f"alpha schedule {schedule!r} is unknown; use constant, linear or exp")


def negative_uncond(eps_empty, eps_negative, alpha):
    return alpha * eps_empty + (1 - alpha) * eps_negative


@dataclass
class PnPResult:
    images: torch.Tensor  # [1, 3, H, W] in [0,1]
    latents: torch.Tensor
    guidance_latents: list  # the inverted z_0 ... z_T of the guidance image


def inversion_latents(sd, image, prompt="", steps=50, progress=False):
    """DDIM inversion with `prompt` (empty by default) at w = 1; all latents kept in memory."""
    z0 = sd.encode_image(image).to(sd.latent_dtype)
    with torch.no_grad():
        zs = invert(sd.denoiser(sd.encode_prompt([prompt]), 1.0, steps), z0, sd.scheduler, steps, progress=progress)
    sd.unet.ctx = None
    return zs


@torch.no_grad()
def translate(sd, image, prompt, *, inversion_prompt="", negative_prompt=None, alpha=0.0, alpha_schedule="constant",
              feature_injection=0.8, attention_injection=0.5, feature_layers: Sequence[str] = FEATURE_LAYERS,
              attention_layers: Optional[Sequence[str]] = None, guidance_scale=7.5, steps=50,
              latents: Optional[list] = None, observe: Optional[dict] = None, progress=False) -> PnPResult:
    """Translate `image` (PIL / [1,3,H,W] in [0,1], or pass `latents` from `inversion_latents`) to `prompt`.

    `observe`: extra hooks attached after the injections, so they see the injected values."""
    attention_layers = decoder_self_attention(sd) if attention_layers is None else attention_layers
    names = set(sd.unet.hook_names())
    for layer in list(feature_layers) + list(attention_layers):
        need = f"{layer}.hook_h" if layer in feature_layers else f"{layer}.hook_q"
        if need not in names:
            raise ValueError(f"layer {layer!r} has no {need.rsplit('.', 1)[1]} hook point; see sd.unet.hook_names()")
    zs = latents if latents is not None else inversion_latents(sd, image, inversion_prompt, steps, progress)
    if len(zs) - 1 != steps:
        raise ValueError(f"the guidance latents have {len(zs) - 1} steps, the translation {steps}")
    src_ctx = sd.encode_prompt([inversion_prompt])
    texts = [""] + ([negative_prompt] if negative_prompt is not None else []) + [prompt]
    ctx = torch.cat([src_ctx, sd.encode_prompt(texts)])
    neg = negative_prompt is not None
    rows = {"source": [0], "uncond": [1], "cond": [len(texts)], **({"negative": [2]} if neg else {})}
    targets = [1] + ([2] if neg else []) + [len(texts)]
    f_steps, a_steps = int(steps * feature_injection), int(steps * attention_injection)

    def inject(limit):
        def fn(x, hook):
            if hook.ctx is None or "source" not in hook.ctx.rows or hook.ctx.step >= limit:
                return None
            x = x.clone()
            x[targets] = x[hook.ctx.rows["source"]]
            return x
        return fn

    hooks = {f"{l}.hook_h": inject(f_steps) for l in feature_layers}
    hooks.update({f"{l}.{h}": inject(a_steps) for l in attention_layers for h in ("hook_q", "hook_k")})

    def denoise(x, t, step):
        sd.unet.ctx = StepContext(step=step, t=int(t), num_steps=steps, rows=rows)
        src = zs[steps - step]  # the guidance image's latent at this step's noise level
        out = sd.unet(torch.cat([src, x.expand(len(texts), -1, -1, -1)]), t, ctx)
        eps_u, eps_c = out[1:2], out[-1:]
        if neg:
            eps_u = negative_uncond(eps_u, out[2:3], negative_alpha(alpha_schedule, alpha, step, steps))
        return eps_u + guidance_scale * (eps_c - eps_u)

    try:
        with sd.unet.hooks(hooks), sd.unet.hooks(observe or {}):
            x = sample(denoise, zs[-1], sd.scheduler, steps, progress=progress)
    finally:
        sd.unet.ctx = None
    return PnPResult(sd.decode_latents(x), x, zs)
