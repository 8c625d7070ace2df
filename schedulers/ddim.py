"""DDIM (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021) as plain functions.

The noise schedule and timestep spacing are those of SD's scheduler config: "scaled_linear"
betas from 0.00085 to 0.012 over 1000 steps, "leading" spacing with `steps_offset` 1, and
`set_alpha_to_one` False. The turbo models use "trailing" spacing (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", table 2), which starts at t = 999.
Notation: a_t = alpha-bar_t, the cumulative product of (1 - beta).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"  # or "v_prediction" (Salimans & Ho 2022)
    timestep_spacing: str = "leading"  # or "trailing" (the turbo models), "linspace"

    def __post_init__(self):
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not one of {', '.join(SPACINGS)}")


SPACINGS = ("leading", "trailing", "linspace")


def alphas_cumprod(cfg: DDIMConfig) -> torch.Tensor:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta), LDM's "linear" schedule
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def timesteps(cfg: DDIMConfig, steps: int) -> List[int]:
    """Descending timesteps, as diffusers' DDIMScheduler.set_timesteps spaces them: "leading"
    981, 961, ..., 1 for 50 steps (steps_offset 1); "trailing" 999, 979, ..., 19; "linspace"
    999, ..., 0 rounded. The step after t is always t - num_train_timesteps // steps (DDIM's
    `prev_timestep`), whatever the spacing."""
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {cfg.num_train_timesteps}, got {steps}")
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "trailing":  # numpy as diffusers does it: its float arange fixes the count
        return [int(t) for t in np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1]
    if cfg.timestep_spacing == "linspace":
        return [int(t) for t in np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)]
    ratio = n // steps
    ts = [i * ratio + cfg.steps_offset for i in reversed(range(steps))]
    if ts[0] >= cfg.num_train_timesteps:  # SD's steps_offset 1 at 1000 steps would start at t = 1000
        n = cfg.num_train_timesteps
        most = max(s for s in range(1, n + 1) if (s - 1) * (n // s) + cfg.steps_offset < n)
        raise ValueError(f"steps={steps} would start at timestep {ts[0]}, past the last trained one ({n - 1}): "
                         f"'leading' spacing adds steps_offset {cfg.steps_offset}; use at most {most} steps")
    return ts


def check_eta(eta):
    """eta in [0, 1]: beyond 1, 1 - a_prev - sigma^2 (eq. 12) goes negative and its root complex."""
    if not 0 <= eta <= 1:  # also refuses NaN
        raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), not {eta!r}")


def alpha_at(cfg: DDIMConfig, acp: torch.Tensor, t: int) -> float:
    """a_t, with the convention that t < 0 means "before the first step" (the clean image)."""
    if t >= 0:
        return acp[t].item()
    return 1.0 if cfg.set_alpha_to_one else acp[0].item()


def split_prediction(cfg: DDIMConfig, out: torch.Tensor, x: torch.Tensor, a: float):
    """The network output -> (predicted x0, predicted eps), from x_t = sqrt(a) x0 + sqrt(1-a) eps."""
    if cfg.prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    elif cfg.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
        x0 = a ** 0.5 * x - (1 - a) ** 0.5 * out
        eps = a ** 0.5 * out + (1 - a) ** 0.5 * x
    else:
        raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
    return x0, eps


def classifier_free_guidance(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans 2022, eq. 6: out_u + w (out_c - out_u). The one place sdlens writes it."""
    return out_uncond + scale * (out_cond - out_uncond)


def ddim_step(cfg, acp, out, t, t_prev, x, eta=0.0, noise=None):
    """x_t -> x_{t_prev}, DDIM eq. (12):

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16)
    """
    check_eta(eta)
    a, a_prev = alpha_at(cfg, acp, t), alpha_at(cfg, acp, t_prev)
    x0, eps = split_prediction(cfg, out, x, a)
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if sigma > 0:
        x_prev = x_prev + sigma * (noise if noise is not None else torch.randn_like(x))
    return x_prev


def ddim_invert_step(cfg, acp, out, t_prev, t, x):
    """x_{t_prev} -> x_t: the deterministic DDIM step run backwards (eta = 0).

    Uses the prediction made at x_{t_prev} as if it were made at x_t (the approximation of DDIM
    sec. 4.3, and of the Prompt-to-Prompt null-text code), which is exact as steps -> infinity.
    """
    a_prev, a = alpha_at(cfg, acp, t_prev), alpha_at(cfg, acp, t)
    x0, eps = split_prediction(cfg, out, x, a_prev)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * eps


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The sampler's latent dtype: at least float32, whatever the model computes in. At 50 steps a
    DDIM step changes x by about 3% of its norm (sdlens-tiny, w = 7.5); storing x in bf16 / fp16
    (unit roundoff 2^-8 / 2^-11) would add a fresh rounding of all of x at every step,
    an error that accumulates over the steps. With fp32 latents the model's rounding enters only
    through the eps term, whose coefficient is of the size of the step."""
    return torch.promote_types(x.dtype, torch.float32)


def sample(denoise: Callable, x: torch.Tensor, cfg: DDIMConfig, steps: int, eta: float = 0.0,
           generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
           progress: bool = False, prepare: Optional[Callable] = None) -> torch.Tensor:
    """Run DDIM from x_T. `denoise(x, t, step)` returns the model output (eps or v) at x.

    `callback(step, t, x)` may return a tensor that replaces x after each step (local blend
    and similar latent edits use this); `prepare(step, t, x)` one that replaces x before the model
    sees it (Attend-and-Excite's gradient steps on the latents). x is kept in float32 (float64 if given) whatever the
    dtypes of x_T and of the model: see `state_dtype`.
    """
    check_eta(eta)
    x = x.to(state_dtype(x))
    acp = alphas_cumprod(cfg)
    ts = timesteps(cfg, steps)
    ratio = cfg.num_train_timesteps // steps
    it = enumerate(ts)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=steps, desc="DDIM", leave=False)
    for i, t in it:
        if prepare is not None:
            y = prepare(i, t, x)
            x = x if y is None else y.to(x.dtype)
        out = denoise(x, t, i).to(x.dtype)  # fp16 * python float would round the step's terms
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                                dtype=x.dtype).to(x.device)
        x = ddim_step(cfg, acp, out, t, t - ratio, x, eta, noise)
        if callback is not None:
            y = callback(i, t, x)
            x = x if y is None else y
    return x


def invert(denoise: Callable, x0: torch.Tensor, cfg: DDIMConfig, steps: int, progress: bool = False) -> List[torch.Tensor]:
    """DDIM inversion: clean latents -> [x_0, x_{t_1}, ..., x_T], ascending in noise.

    `denoise(x, t, step)` is called at each target timestep t with the current latent, which is
    kept in float32 (float64 if given) as in `sample`.
    """
    x0 = x0.to(state_dtype(x0))
    acp = alphas_cumprod(cfg)
    ts = list(reversed(timesteps(cfg, steps)))
    ratio = cfg.num_train_timesteps // steps
    xs, x = [x0], x0
    it = enumerate(ts)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=steps, desc="DDIM inversion", leave=False)
    for i, t in it:
        out = denoise(x, t, steps - 1 - i).to(x.dtype)
        x = ddim_invert_step(cfg, acp, out, t - ratio, t, x)
        xs.append(x)
    return xs
