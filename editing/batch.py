"""Sampling a source prompt and its edited prompts together: the shared part of the editing methods
that run one batch from the same noise (Prompt-to-Prompt, MasaCtrl).

- `start_noise`: the common x_T, from a real image's inversion, given latents, or a seed;
- `batch_denoiser`: one UNet call per step over the rows  uncond(prompts) | cond(prompts), with
  `StepContext.rows` naming them: "uncond" and "cond" list the rows prompt by prompt (so uncond[i]
  and cond[i] are prompt i's two halves), "source" and "target" are the conditional rows of the
  source (prompt 0) and of the targets, "uncond_source" and "uncond_target" their unconditional
  rows (MasaCtrl edits both halves; P2P the conditional one). An inversion's per-step unconditional embeddings
  (null-text, negative-prompt) replace "" on the unconditional rows;
- `follow_inversion`: direct inversion (Ju et al. 2024) puts the source row back onto the
  inversion's trajectory after every step.
"""
from typing import Optional

import torch

from ..checks import finite_tensor, instance, number, tensor_shape
from ..hooks import StepContext
from ..pipeline import uses_guidance
from ..schedulers import classifier_free_guidance
from ..inversion import Inversion


def start_noise(sd, n, *, steps, seed=None, latents=None, inversion: Optional[Inversion] = None, height=None,
                width=None):
    """x_T for n rows: `inversion.latents[-1]` (a real image), else `latents` ([1 or n, C, h, w]), else
    drawn from `seed` (an int, or None for fresh noise) at `height` x `width` (default the model's size).
    The Python API's checks for both editors: an `inversion` that is not an `Inversion` is a TypeError,
    `latents` of another shape or with NaN or inf a ValueError, each naming the argument."""
    if inversion is not None:
        instance("inversion", inversion, Inversion, "an Inversion (from invert_image) or None")
        if inversion.steps != steps:
            raise ValueError(f"the inversion has {inversion.steps} steps, the edit {steps}; use the same number")
        x = inversion.latents[-1].expand(n, -1, -1, -1).clone()
    elif latents is not None:
        c = sd.unet.cfg.in_channels
        expected = f"[1 or {n}, {c}, h, w]"
        tensor_shape("latents", latents, (None, c, None, None), expected)
        if latents.shape[0] not in (1, n):
            raise ValueError(f"latents must be a {expected} tensor, got shape {tuple(latents.shape)}")
        finite_tensor("latents", latents)
        x = latents.expand(n, -1, -1, -1).clone() if latents.shape[0] == 1 else latents
    else:
        height, width = sd.check_size(height, width)
        sd.warn_size(height, width)
        f = sd.latent_factor
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        x = torch.randn((1, sd.unet.cfg.in_channels, height // f, width // f), generator=g).expand(n, -1, -1, -1).clone()
    return x.to(sd.device, sd.latent_dtype)


def check_guidance(guidance_scale):
    number("guidance_scale", guidance_scale)


def batch_denoiser(sd, prompts, steps, guidance_scale, inversion: Optional[Inversion] = None, low_memory=False,
                   size=None):
    """`denoise(x, t, step)` over the rows of `prompts` (source first), with classifier-free guidance
    (w = 1: conditional rows only). `low_memory`: the unconditional rows in a separate pass, whose
    context names only "uncond" (so methods that edit "source"/"target" leave it alone). `size`: the
    images' (height, width), for SDXL's size conditioning (default the model's size). The unconditional
    rows are the model's empty prompt: "" (SD) or zeros (SDXL's force_zeros_for_empty_prompt)."""
    check_guidance(guidance_scale)
    n = len(prompts)
    cond = sd.encode_prompt(prompts, size)
    empty = sd.encode_negative(None, n, size)
    tgt = list(range(1, n))

    def uncond_at(step):
        if inversion is not None and inversion.uncond is not None:
            return inversion.uncond[step].expand(n, -1, -1)
        return empty

    def denoise(xt, t, step):
        step_ctx = lambda rows: sd.unet.step_context(StepContext(step=step, t=int(t), num_steps=steps, rows=rows))
        edit_rows = {"cond": list(range(n)), "source": [0], "target": tgt}
        if not uses_guidance(guidance_scale):
            with step_ctx(edit_rows):
                return sd.unet(xt, t, cond)
        u = uncond_at(step)
        if low_memory:  # two passes of n rows instead of one of 2n
            with step_ctx({"uncond": list(range(n)), "uncond_source": [0], "uncond_target": tgt}):
                eu = sd.unet(xt, t, u)
            with step_ctx(edit_rows):
                ec = sd.unet(xt, t, cond)
        else:
            with step_ctx({"uncond": list(range(n)), "cond": list(range(n, 2 * n)), "source": [n],
                      "target": [n + i for i in tgt], "uncond_source": [0], "uncond_target": tgt}):
                eu, ec = sd.unet(torch.cat([xt, xt]), t, torch.cat([u, cond])).chunk(2)
        return classifier_free_guidance(eu, ec, guidance_scale)

    return denoise


def follow_inversion(inversion: Optional[Inversion], step, xt):
    """After sampling step `step`: a direct inversion forces the source row (0) onto its trajectory
    (= adding the per-step offset); any other inversion, or none, leaves x alone."""
    if inversion is None or not inversion.direct:
        return xt
    xt = xt.clone()
    xt[0] = inversion.source_latent_after(step)[0]
    return xt
