"""Diffusion features: the value at any hook point for a batch of real images, in one call.

The recipe is DIFT's (Tang et al., NeurIPS 2023, `src/models/dift_sd.py`): encode the image, noise
it to timestep t with the forward process x_t = sqrt(a_t) z + sqrt(1 - a_t) eps, run the UNet once
with a text prompt (no guidance), read a layer, and average the features of `ensemble` noise draws
made in one batched call. `inversion="ddim"` reaches t by DDIM inversion instead, which is
deterministic (no ensemble).

Every value comes back as a spatial map [B, C, h, w], so that any hook can be upsampled, compared
or probed the same way:

- ResBlock, transformer and block outputs are maps already;
- attention q / k / v ([B, heads, hw, d]) become [B, heads*d, h, w], head by head;
- attention outputs ([B, hw, C]) become [B, C, h, w];
- attention probabilities ([B, heads, hw, keys]) become [B, heads*keys, h, w]: for cross-attention
  channel `head * 77 + token` is that token's map in that head.

Cross-attention k and v are computed from the prompt alone (77 text tokens, the same for every
image), so they are not image features and asking for them is an error.

SDXL works the same way: the prompt's context comes from `sd.encode_prompt(prompts, size)` with the
images' own size, so its added conditioning (pooled text, size and crop ids) describes them, as
diffusers' SDXL pipeline would for an image of that size.
"""
import difflib
import math
from typing import Dict, List, Optional, Sequence, Union

import torch
from einops import rearrange

from ..hooks import StepContext
from ..schedulers.ddim import alphas_cumprod, ddim_invert_step
from ..checks import whole

# DIFT's SPair-71k setting: SD 2.1 at 768x768, t = 261, up_ft_index 1, ensemble 8 (dift README, eval_spair.py).
DIFT_T = 261


class _Done(Exception):
    """Raised from a hook once every requested point has been seen: the rest of the UNet is skipped,
    as DIFT's own UNet stops after its `up_ft_index` block."""


def is_image_feature(info) -> bool:
    """False for cross-attention k and v, which are made from the prompt alone, and for `hook_kv`, a
    stacked copy of k and v (ask for hook_k or hook_v)."""
    return not (info.kind == "cross_attention" and info.point in ("k", "v")) and info.point != "kv"


def feature_names(unet, **where) -> List[str]:
    """`unet.hook_names(**where)` less the points that are not image features (cross-attention k, v)."""
    return [n for n in unet.hook_names(**where) if is_image_feature(unet.hook_info(n))]


def check_names(sd, names) -> List[str]:
    """A hook name or a list of them -> the list, each checked to be an image feature of this UNet."""
    names = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError("names must be a hook name or a non-empty list of them, e.g. 'output_blocks.5.hook_out'; "
                        "see sd.unet.hook_names() or sdlens.features.paper_layer()")
    known = set(sd.unet.hook_names())
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, sorted(known), n=3)
            raise ValueError(f"names: {n!r} is not a hook point of this UNet" +
                             (f"; did you mean {', '.join(close)}?" if close else "; see sd.unet.hook_names()"))
        info = sd.unet.hook_info(n)
        if not is_image_feature(info):
            raise ValueError(f"names: {n} is made from the prompt's 77 text tokens alone, the same for every image; "
                             f"ask for the cross-attention's hook_q, hook_probs or hook_out instead")
    if len(set(names)) != len(names):
        raise ValueError("names: a hook point is listed twice")
    return names


def to_spatial(value: torch.Tensor, info, latent_hw) -> torch.Tensor:
    """A hook's value -> [B, C, h, w] (see the module docstring). The map side is the latent's divided
    by 2**level, rounded up as the stride-2 convolutions round."""
    if value.ndim == 4 and info.kind in ("resblock", "transformer", "block", "model"):
        return value
    h = math.ceil(latent_hw[0] / info.downscale)
    if info.point == "out":  # attention output, tokens x channels
        return rearrange(value, "b (h w) c -> b c h w", h=h)
    if info.point == "probs":
        return rearrange(value, "b a (h w) k -> b (a k) h w", h=h)
    return rearrange(value, "b a (h w) d -> b (a d) h w", h=h)  # q, k, v: head by head


ENSEMBLE_MAX = 256  # a bound on the noise draws per image (DIFT uses 8): beyond it, an allocator failure


def check_timestep(sd, t) -> int:
    T = sd.scheduler.num_train_timesteps
    return whole("t", t, 0, T - 1, f" (a timestep; DIFT uses {DIFT_T})")


def as_batch(sd, images) -> torch.Tensor:
    """Paths, PIL images or a [B,3,H,W] tensor in [0,1] -> [B,3,H,W] on the model's device.
    Paths are centre-cropped and resized to the model's size (`load_image(path, sd=sd)`)."""
    from ..inversion import load_image
    from ..pipeline import to_tensor
    if isinstance(images, (str, bytes)) or hasattr(images, "__fspath__"):
        images = [images]
    if isinstance(images, (list, tuple)):
        images = [load_image(im, sd=sd) if isinstance(im, str) or hasattr(im, "__fspath__") else im for im in images]
        sizes = {getattr(im, "size", None) for im in images}
        if len(sizes) > 1:
            raise ValueError(f"images must all have one size to be batched, got {sorted(sizes)}; resize them, "
                             f"e.g. load_image(path, sd=sd)")
    x = to_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
    f = sd.latent_factor
    if x.shape[-1] % f or x.shape[-2] % f:
        raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {f}; crop or resize it")
    sd.warn_size(*x.shape[-2:], stacklevel=5)
    return x.to(sd.device, torch.float32)


@torch.no_grad()
def ddim_to(sd, z0: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """DDIM-invert clean latents to timestep t (w = 1, the prompt's context), in steps of 20
    timesteps: SD's 50-step spacing, shifted so that the last step lands on t."""
    cfg, acp = sd.scheduler, alphas_cumprod(sd.scheduler)
    ratio = cfg.num_train_timesteps // 50
    ts = list(range(t % ratio, t + 1, ratio)) if t >= ratio else [t]
    x, prev = z0.float(), -1  # -1: the clean image (alpha_at's convention)
    for i, tt in enumerate(ts):
        with sd.unet.step_context(StepContext(step=len(ts) - 1 - i, t=tt, num_steps=len(ts),
                                              rows={"cond": list(range(len(x)))})):
            out = sd.unet(x, tt, context).float()
        x, prev = ddim_invert_step(cfg, acp, out, prev, tt, x), tt
    return x


@torch.no_grad()
def extract(sd, images, names: Union[str, Sequence[str]], *, t: int = DIFT_T, prompt: Union[str, Sequence[str]] = "",
            ensemble: int = 1, seed: int = 0, inversion: Optional[str] = None, posterior: str = "sample",
            max_rows: int = 8, progress: bool = False) -> Dict[str, torch.Tensor]:
    """{hook name: [B, C, h, w] float32 features} for B images at timestep t.

    images: a path, a PIL image, a list of either (one size) or a [B,3,H,W] tensor in [0,1].
    prompt: one for all images or one per image ("" as DIFT's default; its SPair script prompts
    with the category). ensemble: noise draws averaged per image (DIFT: 8). seed fixes the draws.
    inversion: None (forward-process noise, DIFT) or "ddim" (deterministic; ensemble must be 1).
    posterior: "sample" (DIFT's OneStepSDPipeline: `vae.encode(x).latent_dist.sample()`, one draw per
    row, so the ensemble also averages over the VAE posterior) or "mean" (the posterior mean, as
    `sd.encode_image`; a deliberate deviation for features without the VAE's noise; inversion uses it).
    The draws: `g = torch.Generator().manual_seed(seed)`, then `torch.randn([B * ensemble, C, h, w],
    generator=g)` for the posterior, then the same for the diffusion noise; row r belongs to image
    r // ensemble, whatever `max_rows` and the device.
    max_rows bounds memory: the B x ensemble rows go through the UNet at most `max_rows` at a time,
    and only the requested points are kept, reduced to their ensemble mean as each chunk ends.
    """
    names = check_names(sd, names)
    t = check_timestep(sd, t)
    whole("ensemble", ensemble, 1, ENSEMBLE_MAX, " (DIFT uses 8; each draw is one more UNet row per image)")
    whole("max_rows", max_rows, 1)
    if inversion not in (None, "ddim"):
        raise ValueError(f"inversion must be None (forward-process noise, as DIFT) or 'ddim', got {inversion!r}")
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' (DIFT) or 'mean', got {posterior!r}")
    if inversion == "ddim" and ensemble != 1:
        raise ValueError("ensemble must be 1 with inversion='ddim': DDIM inversion is deterministic, every draw is the same")
    x = as_batch(sd, images)
    B = x.shape[0]
    prompts = [prompt] * B if isinstance(prompt, str) else list(prompt)
    if len(prompts) != B or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or one string per image ({B}), got {prompt!r}")
    mean, logvar = (torch.cat(v) for v in zip(*(sd.vae.encode(2 * x[i:i + max_rows] - 1) for i in range(0, B, max_rows))))
    scale = sd.vae.cfg.scaling_factor
    context = sd.encode_prompt(prompts, size=tuple(x.shape[-2:]))  # SDXL: the images' size in its time ids
    if inversion == "ddim":
        z = torch.cat([ddim_to(sd, mean[i:i + max_rows] * scale, t, context[i:i + max_rows]) for i in range(0, B, max_rows)])
    infos = {n: sd.unet.hook_info(n) for n in names}
    hw = mean.shape[-2:]
    owner = torch.arange(B, device=mean.device).repeat_interleave(ensemble)  # row -> image
    # All draws at once, on the CPU, so that neither max_rows nor the device changes them.
    g = torch.Generator().manual_seed(seed)
    shape = (B * ensemble,) + tuple(mean.shape[1:])
    vae_noise, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a = alphas_cumprod(sd.scheduler)[t]  # float32 tensor arithmetic, as DDPM's add_noise does it
    sums: Dict[str, torch.Tensor] = {}
    rows = list(range(0, B * ensemble, max_rows))
    if progress:
        from tqdm.auto import tqdm
        rows = tqdm(rows, desc="features", leave=False)
    for start in rows:
        idx, r = owner[start:start + max_rows], slice(start, start + max_rows)
        if inversion == "ddim":
            zc = z[idx]
        else:  # DIFT: images repeated `ensemble` times, fresh draws per row
            zc = mean[idx]
            if posterior == "sample":  # DiagonalGaussianDistribution.sample: mean + exp(logvar / 2) eps
                zc = zc + torch.exp(0.5 * logvar[idx]) * vae_noise[r].to(zc)
            zc = (zc * scale).to(sd.latent_dtype)
            zc = a ** 0.5 * zc + (1 - a) ** 0.5 * noise[r].to(zc)
        seen = {}

        def keep(value, hook):
            seen[hook.name] = to_spatial(value, infos[hook.name], hw).float()
            if len(seen) == len(names):
                raise _Done

        try:
            with sd.unet.hooks({n: keep for n in names}), \
                    sd.unet.step_context(StepContext(step=0, t=t, num_steps=1, rows={"cond": list(range(len(idx)))})):
                sd.unet(zc, t, context[idx])
        except _Done:
            pass
        for n, v in seen.items():
            if n not in sums:
                sums[n] = torch.zeros((B,) + v.shape[1:], device=v.device)
            sums[n].index_add_(0, idx, v)
    return {n: sums[n] / ensemble for n in names}
