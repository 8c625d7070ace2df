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

from ..schedulers import alphas_cumprod, ddim_step, invert, timesteps

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


def ddim_latents(sd, image, prompt, steps):
    """Conditional DDIM inversion at w = 1: [z_0, ..., z_T]."""
    z0 = sd.encode_image(image).to(sd.dtype)
    cond = sd.encode_prompt([prompt])
    with torch.no_grad():
        zs = invert(sd.denoiser(cond, 1.0, steps), z0, sd.scheduler, steps)
    sd.unet.ctx = None
    return zs


def null_text(sd, zs, prompt, guidance_scale=7.5, inner_steps=10, early_stop=1e-5, progress=False):
    """Optimise one unconditional embedding per step (Mokady et al. 2023, Alg. 1)."""
    steps = len(zs) - 1
    cfg, acp, ts = sd.scheduler, alphas_cumprod(sd.scheduler), timesteps(sd.scheduler, steps)
    ratio = cfg.num_train_timesteps // steps
    cond = sd.encode_prompt([prompt])
    uncond = sd.encode_prompt([""])
    out, x = [], zs[-1]
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="null-text inversion", leave=False)
    for i in it:
        t = ts[i]
        uncond = uncond.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        target = zs[steps - 1 - i]
        with torch.no_grad():
            eps_c = sd.unet(x, t, cond)
        for _ in range(inner_steps):
            eps_u = sd.unet(x, t, uncond)
            prev = ddim_step(cfg, acp, eps_u + guidance_scale * (eps_c - eps_u), t, t - ratio, x)
            loss = F.mse_loss(prev, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < early_stop + i * 2e-5:
                break
        uncond = uncond.detach()
        out.append(uncond)
        with torch.no_grad():
            eps_u = sd.unet(x, t, uncond)
            x = ddim_step(cfg, acp, eps_u + guidance_scale * (eps_c - eps_u), t, t - ratio, x)
    return out


def invert_image(sd, image, prompt, method="ddim", steps=50, guidance_scale=7.5, progress=False) -> Inversion:
    """Image (PIL, [1,3,H,W] in [0,1], or a path, read by `load_image` at the model's size) ->
    Inversion for `method` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"inversion {method!r} is unknown; use one of {', '.join(METHODS)}")
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, sd.default_size)
    zs = ddim_latents(sd, image, prompt, steps)
    if method == "null-text":
        with torch.enable_grad():
            return Inversion(zs, prompt, method, uncond=null_text(sd, zs, prompt, guidance_scale, progress=progress))
    if method == "negative-prompt":
        return Inversion(zs, prompt, method, uncond=[sd.encode_prompt([prompt])] * steps)
    return Inversion(zs, prompt, method, direct=method == "direct")


def load_image(path, size):
    """Centre-crop to a square and resize to `size` (a multiple of 8): the paper's preprocessing."""
    from PIL import Image
    try:
        im = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((size, size), Image.LANCZOS)
