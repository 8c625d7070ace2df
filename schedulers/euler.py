"""Euler ancestral sampling (Karras et al. 2022, "Elucidating the Design Space...", alg. 2 with
ancestral noise from k-diffusion's `sample_euler_ancestral`), the turbo models' own sampler.

It works in the sigma parametrisation x = x0 + sigma eps, sigma_t = sqrt((1 - a_t) / a_t), on the
same schedule and timestep spacing as DDIM (`DDIMConfig`). The UNet is trained on unit-variance
inputs, so it sees x / sqrt(sigma^2 + 1). Written to equal diffusers' EulerAncestralDiscreteScheduler
(0.42) given the same noise, including its float32 arithmetic and one noise draw per step.

The start differs between the two references. diffusers scales unit noise by sigma_max for
"trailing" and "linspace" spacing (`init_noise_sigma`), sgm's turbo sampler by sqrt(1 + sigma_max^2),
the exact noise level of t = 999: 0.23% apart at sigma_max = 14.6. `sample_euler_ancestral`
follows diffusers, so that it equals it; a 1-step DDIM with trailing spacing is sgm's exact
1-step turbo sample (the x0 prediction at t = 999 from unit noise).
"""
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .ddim import DDIMConfig, alphas_cumprod, state_dtype


def euler_schedule(cfg: DDIMConfig, steps: int) -> Tuple[List[float], torch.Tensor]:
    """(timesteps, sigmas): diffusers' float timesteps for the spacing, and their sigmas (float32,
    interpolated in the 1000 trained ones) with a final 0."""
    n = cfg.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and {n}, got {steps}")
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float32) + cfg.steps_offset
    else:  # trailing
        ts = np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    acp = alphas_cumprod(cfg)
    sigmas = np.interp(ts, np.arange(n), (((1 - acp) / acp) ** 0.5).numpy())
    return [float(t) for t in ts], torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def init_sigma(cfg: DDIMConfig, sigmas: torch.Tensor) -> torch.Tensor:
    """The scale of the starting noise, as diffusers' `init_noise_sigma` (see the module docstring)."""
    top = sigmas.max()
    return top if cfg.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5


def sample_euler_ancestral(denoise: Callable, x: torch.Tensor, cfg: DDIMConfig, steps: int,
                           generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
                           progress: bool = False) -> torch.Tensor:
    """Sample from unit noise `x` (scaled here by `init_sigma`). `denoise(x, t, step)` returns the
    model output (eps or v) at the UNet's input x / sqrt(sigma^2 + 1); `callback(step, t, x)` as in
    DDIM's `sample`. Each step draws fresh noise from `generator` (on the CPU when None is given)."""
    ts, sigmas = euler_schedule(cfg, steps)
    x = x.to(state_dtype(x))
    sigmas = sigmas.to(x.dtype)
    x = x * init_sigma(cfg, sigmas).to(x.device)
    it = enumerate(ts)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=len(ts), desc="Euler ancestral", leave=False)
    for i, t in it:
        sigma, sigma_to = sigmas[i], sigmas[i + 1]
        out = denoise(x / (sigma ** 2 + 1) ** 0.5, t, i).to(x.dtype)
        if cfg.prediction_type == "epsilon":
            x0 = x - sigma * out
        elif cfg.prediction_type == "v_prediction":
            x0 = out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        else:
            raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported")
        # Split the step to sigma_to into a deterministic part down to sigma_down and fresh noise
        # of sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2.
        sigma_up = (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu",
                            dtype=x.dtype).to(x.device)
        x = x + noise * sigma_up
        if callback is not None:
            y = callback(i, t, x)
            x = x if y is None else y
    return x
