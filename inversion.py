"""Inverting a real image into SD's noise space, so that it can be edited like a generated one.

Each method returns an `Inversion`: the DDIM trajectory z_0 ... z_T of the image's latents, and
what the editor must use on the unconditional (or source) branch to reconstruct it:

- `ddim`: deterministic DDIM inversion with the source prompt at w = 1 (Song et al. 2021,
  sec. 4.3). Exact at w = 1 only; at w = 7.5 the reconstruction drifts.
- `null_text`: Mokady et al. 2023, "Null-text Inversion": per-step unconditional embeddings
  optimised with Adam so that guided sampling retraces the trajectory. Official defaults: 10 inner
  steps, lr 1e-2 (1 - i/100), early stop at loss < 1e-5 + i 2e-5.
- `negative_prompt`: Miyake et al. 2023: the source prompt's embedding as the unconditional one,
  so guidance cancels on the source branch. No optimisation.
- `direct`: Ju et al. 2024, "PnP Inversion": keep "" as unconditional and add, each step, the
  offset that puts the source branch back onto the trajectory (`Inversion.direct`).
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from .checks import instance, model, number, path as check_path, string, whole
from .schedulers import alphas_cumprod, classifier_free_guidance, ddim_step, invert, timesteps

METHODS = ("ddim", "null-text", "negative-prompt", "direct")


@dataclass
class Inversion:
    latents: List[torch.Tensor]  # z_0 (clean) ... z_T, each [1, C, h, w]
    prompt: str
    method: str
    uncond: Optional[List[torch.Tensor]] = None  # per sampling step [1, 77, D], for null-text / negative-prompt
    direct: bool = False  # force the source branch onto `latents` after every step

    @property
    def steps(self):
        return len(self.latents) - 1

    def source_latent_after(self, step: int) -> torch.Tensor:
        """z after sampling step `step` (sampling runs z_T -> z_0)."""
        return self.latents[self.steps - 1 - step]


def ddim_latents(sd, image, prompt, steps, progress=False):
    """Conditional DDIM inversion at w = 1: [z_0, ..., z_T]."""
    z0 = sd.encode_image(image).to(sd.latent_dtype)
    cond = sd.encode_prompt([prompt], sd.image_size(z0))
    with torch.no_grad():
        zs = invert(sd.denoiser(cond, 1.0, steps), z0, sd.scheduler, steps, progress=progress)
    return zs


def null_text(sd, zs, prompt, guidance_scale=7.5, inner_steps=10, early_stop=1e-5, progress=False):
    """Optimise one unconditional embedding per step (Mokady et al. 2023, Alg. 1).

    The embeddings are optimised as float32 copies and the loss is computed in float32, whatever
    the model's dtype (the UNet casts its input and returns float32). In fp16, Adam's second moment
    after one step, (1 - 0.999) grad^2 ~ 1e-8 on sdlens-tiny, and its eps 1e-8 are below fp16's
    smallest number (6e-8), so the update is 0/0 = NaN; and the early-stop limit 1e-5 is below
    fp16's normal range (6.1e-5).

    What is optimised is the whole unconditional context, starting from the model's empty prompt:
    "" on SD; on SDXL the zero context (force_zeros_for_empty_prompt), its 77 token rows AND its pooled
    vector (both live in the context tensor); the UNet detaches the size conditioning.

    `progress`: a bar over the steps whose postfix counts the inner Adam steps and shows the loss
    (each inner step is a UNet forward and backward pass, up to `inner_steps` of them per step)."""
    model("sd", sd)
    string("prompt", prompt)
    number("guidance_scale", guidance_scale)  # NaN gave NaN embeddings
    whole("inner_steps", inner_steps, 1)
    number("early_stop", early_stop, 0)
    instance("zs", zs, (list, tuple), "the inversion's latents [z_0, ..., z_T] (ddim_latents)")
    if len(zs) < 2:
        raise ValueError(f"zs must hold at least z_0 and z_T, got {len(zs)} latents")
    steps = len(zs) - 1
    cfg, acp, ts = sd.scheduler, alphas_cumprod(sd.scheduler), timesteps(sd.scheduler, steps)
    ratio = cfg.num_train_timesteps // steps
    size = sd.image_size(zs[0])
    cond = sd.encode_prompt([prompt], size)
    uncond = sd.encode_negative(None, 1, size).to(sd.latent_dtype)  # the fp32 copy that Adam updates
    out, x = [], zs[-1]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="null-text inversion", leave=False)
    for i in range(steps):
        t = ts[i]
        uncond = uncond.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        target = zs[steps - 1 - i]
        with torch.no_grad():
            eps_c = sd.unet(x, t, cond)
        for j in range(inner_steps):
            eps_u = sd.unet(x, t, uncond)
            prev = ddim_step(cfg, acp, classifier_free_guidance(eps_u, eps_c, guidance_scale), t, t - ratio, x)
            loss = F.mse_loss(prev, target)  # in fp32, as the UNet returns fp32 and the latents are fp32
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = loss.item()  # the early stop is a host decision: one wait for the GPU per inner step, no more
            if bar is not None:
                bar.set_postfix(inner=f"{j + 1}/{inner_steps}", loss=f"{value:.1e}")
            if value < early_stop + i * 2e-5:
                break
        uncond = uncond.detach()
        out.append(uncond)
        with torch.no_grad():
            eps_u = sd.unet(x, t, uncond)
            x = ddim_step(cfg, acp, classifier_free_guidance(eps_u, eps_c, guidance_scale), t, t - ratio, x)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out


def invert_image(sd, image, prompt, method="ddim", steps=50, guidance_scale=7.5, progress=True) -> Inversion:
    """Image (PIL, [1,3,H,W] in [0,1], or a path read at the model's size; best at the model's size: `load_image(path, sd=sd)`) ->
    Inversion for `method` (see the module docstring).

    `prompt`: the prompt that describes the image; to edit with Prompt-to-Prompt it must be the
    editor's source prompt (`editor.source`). `method`: ddim, null-text, negative-prompt or direct.
    `steps` (>= 1): must equal the editor's steps (official: 50). `guidance_scale`: the w that the
    edit will use (null-text optimises for it; official 7.5). `progress`: tqdm bars on stderr
    (null-text, with its inner optimisation, is the slow one: about 20 s at 50 steps on sdlens-tiny
    on 2 CPU cores, see docs/benchmarks.md)."""
    model("sd", sd)
    string("prompt", prompt)
    if method not in METHODS:
        raise ValueError(f"inversion {method!r} is unknown; use one of {', '.join(METHODS)}")
    number("guidance_scale", guidance_scale)
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, sd=sd)
    from .pipeline import to_tensor
    image = to_tensor(image, batch=1)  # one image: its shape and finite values checked here, where it enters
    zs = ddim_latents(sd, image, prompt, steps, progress)
    if method == "null-text":
        with torch.enable_grad():
            return Inversion(zs, prompt, method, uncond=null_text(sd, zs, prompt, guidance_scale, progress=progress))
    if method == "negative-prompt":
        return Inversion(zs, prompt, method, uncond=[sd.encode_prompt([prompt], sd.image_size(zs[0]))] * steps)
    return Inversion(zs, prompt, method, direct=method == "direct")


MAX_SIZE = 4096  # 512 latents: far beyond SD's 512/768 training sizes, about 200 MB of float32 pixels


def load_image(path, size=None, *, sd=None):
    """Centre-crop the image at `path` to a square and resize it: the papers' preprocessing.

    The side is `size` (a multiple of 8, at most 4096) if given, else the model's own size,
    `sd.default_size` (64 for sdlens-tiny, 512 for SD 1.x): `load_image("photo.png", sd=sd)`.
    A size far from the model's makes every UNet call slower (with the square of the side) and the
    images worse, so prefer the model's.

    The EXIF orientation is applied (phones store portraits sideways), and 16-bit images keep their
    high byte, as PIL itself decodes 16-bit RGB PNGs (a plain convert("RGB") clips them to white).
    """
    import numpy as np
    from PIL import Image, ImageOps
    check_path("path", path)
    if sd is not None:
        model("sd", sd)
    if size is None:
        if sd is None:
            raise TypeError("load_image() needs the model, load_image(path, sd=sd), to resize to its own size "
                            "(sd.default_size), or a size, load_image(path, 512)")
        size = sd.default_size
    whole("size", size, not_int=TypeError)
    if size <= 0 or size % 8 or size > MAX_SIZE:
        raise ValueError(f"size must be a positive multiple of 8 of at most {MAX_SIZE}, got {size}")
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        if im.mode.startswith("I"):  # I;16, I;16B (16-bit PNG, TIFF) and I (older Pillow): 0..65535
            im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
        im = im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's own texts ("cannot identify image file") say less
        raise ValueError(f"{path}: not a readable image (PNG, JPEG, WebP, BMP, TIFF); it may be truncated or of "
                         f"another format ({type(e).__name__})") from None
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((size, size), Image.LANCZOS)


# ---- the latents of an inversion at the sampling timesteps (Plug-and-Play, features) ----
INVERSION_STEPS = 999  # Plug-and-Play's official inversion (editing/pnp.py: both official codes)


def schedule_timesteps(sd, n, name):
    """The sampling timesteps of an n-step schedule; ValueError naming `name` if n is not a usable count."""
    T = sd.scheduler.num_train_timesteps
    try:
        whole(name, n)
        return timesteps(sd.scheduler, n)  # checks the range
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number of steps from 1 to {T - sd.scheduler.steps_offset}, "
                         f"got {n!r}") from None


def check_inversion_steps(sd, steps, inversion_steps, name="inversion_steps"):
    """The inversion must pass through every sampling timestep, so that its latents can be kept there."""
    fine = schedule_timesteps(sd, inversion_steps, name)
    if inversion_steps < steps:
        raise ValueError(f"{name} ({inversion_steps}) must be at least steps ({steps})")
    if not set(schedule_timesteps(sd, steps, "steps")) <= set(fine):
        raise ValueError(f"{name} ({inversion_steps}) misses some of the {steps} sampling timesteps; "
                         f"use {steps}, or 999 (every timestep)")


def keep_sampling_latents(sd, zs, steps):
    """[z_0, z_{t_1}, ..., z_{t_N'}] of an N'-step inversion -> the N + 1 latents at the N sampling timesteps."""
    by_t = dict(zip(reversed(timesteps(sd.scheduler, len(zs) - 1)), zs[1:]))
    return [zs[0]] + [by_t[t] for t in reversed(timesteps(sd.scheduler, steps))]


def inversion_latents(sd, image, prompt="", steps=50, inversion_steps=None, progress=False):
    """DDIM inversion with `prompt` (empty by default) at w = 1, in `inversion_steps` steps (default
    `steps`); returns the steps + 1 latents at the sampling timesteps [z_0, z_{t_1}, ..., z_{t_N}]."""
    model("sd", sd)
    string("prompt", prompt)
    inversion_steps = steps if inversion_steps is None else inversion_steps
    check_inversion_steps(sd, steps, inversion_steps)
    z0 = sd.encode_image(image).to(sd.latent_dtype)
    with torch.no_grad():
        den = sd.denoiser(sd.encode_prompt([prompt], sd.image_size(z0)), 1.0, inversion_steps)
        zs = invert(den, z0, sd.scheduler, inversion_steps, progress=progress)
    return keep_sampling_latents(sd, zs, steps)
