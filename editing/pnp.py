"""Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023): text-driven image-to-image
translation that keeps the guidance image's structure by injecting its features.

The guidance image is DDIM-inverted (empty prompt by default) and its latents at the sampling
timesteps are kept, in memory. Each sampling step then makes one batched UNet call with the rows

    source (the inverted latent, prompt "") | unconditional | [negative] | conditional

and hooks copy the source row into the translation rows:
- the ResBlock feature `hook_h` of decoder layer 4 (`output_blocks.4.0`) for the first
  `feature_injection` = 0.8 of the steps;
- self-attention queries and keys (`hook_q`, `hook_k` of `attn1`) in decoder layers 4-11 for the
  first `attention_injection` = 0.5 of the steps. Only q and k are replaced, so attention keeps
  the fast SDPA path: no attention matrix is materialised.
Defaults are the official ones (pnp-diffusers `config_pnp.yaml`: 50 steps, guidance 7.5,
pnp_f_t 0.8, pnp_attn_t 0.5; the LDM code uses guidance 10 for real images), and so are:
- the source row's prompt "": pnp-diffusers pnp.py:54 (pnp_guidance_embeds) whatever the inversion
  prompt was; the LDM code sets the prompt of a real image to "" (run_features_extraction.py:128-130).
- a 999-step inversion ("we use 999 steps for the best reconstruction", plug-and-play
  feature-extraction-real.yaml:4 and run_features_extraction.py:224; pnp-diffusers preprocess.py:211),
  sampled at 50 steps from the latents it passes through at the 50 sampling timesteps (pnp.py:89, :96).
  Measured on sdlens-tiny (the oracle's scene, 50 steps, CPU): against a 50-step inversion it costs
  999 instead of 50 UNet calls (19 s instead of 0.85 s; the whole translation 21.5 s instead of
  2.5 s), moves the translated image by at most 0.044 (PSNR 38.9 dB between the two) and raises the
  PSNR of the plain 50-step DDIM reconstruction from the inverted latent (w = 1, "") against the
  VAE round trip from 53.2 to 59.2 dB (against the input both are 32.9 dB: the VAE's limit).
  `inversion_steps=steps` (`--inversion-steps 50`) is the cheap choice; `inversion_latents` uses
  it unless told otherwise.
- the negative-prompt alpha schedules of the LDM code (see `negative_alpha`); pnp-diffusers' own
  negative prompt is `alpha=0`, the default.
Checked on sdlens-tiny against the official code run from the same image (docs/editing.md, Plug-and-Play):
`oracle.py --steps 10 --nt-steps 10 --full --cases a,b,c,d` gives "PnP parity: PASS | (a) inversion
latents max 1.4e-04 | (b) PnP image max 9.0e-05 | ..." (pnp-diffusers for b, the "" source row and
the negative prompt; the LDM schedules for linear/exp); with all defaults, translate() matches
pnp-diffusers' defaults (999-step preprocess.py, 50-step pnp.py) to 1.8e-5.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..checks import finite_tensors, fraction, instance, model, number, string, tensor_shape
from ..features.layers import FEATURE_LAYERS, SDXL_FIRST_BLOCK, default_feature_layers  # noqa: F401 (re-exported)
from ..hooks import StepContext
from ..inversion import (INVERSION_STEPS, check_inversion_steps, inversion_latents,  # noqa: F401 (re-exported)
                         keep_sampling_latents, schedule_timesteps)
from ..schedulers import classifier_free_guidance, sample
from ..visualize import SavesImages
from .patch import Patch, apply, select

# The official list for SD (pnp-diffusers: decoder layers 4-11). `decoder_self_attention` is the
# default rule; on SD it gives exactly these (tests/test_pnp.py checks it).
ATTENTION_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in range(4, 12))
# SDXL has no official PnP. Our choice, by level: SD's layer 4 is the second decoder block at maps of
# 1/4 of the latent (16x16 at 512²); SDXL's at 1/4 (32x32 at 1024²) is its first decoder level, so the
# feature is output_blocks.1.0 and the self-attention every decoder attn1 from block 1 on (blocks 1-5:
# 10 + 10 + 2 + 2 + 2 = 26 layers), the same resolutions SD's 4-11 cover (1/4 and finer).
SCHEDULES = ("constant", "linear", "exp")


def decoder_self_attention(sd, first=None):
    """attn1 of every decoder layer from `first` on: SD's layers 4-11, and the same rule elsewhere
    (first = 4; SDXL: 1, see SDXL_FIRST_BLOCK)."""
    first = (SDXL_FIRST_BLOCK if sd.is_sdxl else 4) if first is None else first
    infos = [sd.unet.hook_info(n) for n in sd.unet.hook_names(place="up", kind="self_attention", point="q")]
    return [i.module for i in infos if i.block >= first]


def negative_alpha(schedule: str, alpha: float, step: int, steps: int) -> float:
    """Weight a of eps("") at sampling step `step` (0 = the noisiest) in eps~ = a eps("") + (1 - a) eps(negative),
    as the official LDM code (MichalGeyer/plug-and-play ldm/models/diffusion/ddim.py:56-68, the schedule;
    :184, indexed by the step; :236, a weights the empty-prompt branch). With f = step / (steps - 1):

        constant: a = alpha                    (np.ones * alpha)
        linear:   a = alpha (1 - f)            (np.flip(np.linspace(0, 1, steps)) * alpha: alpha down to 0)
        exp:      a = alpha exp(-6 f)          (np.exp(-6 * np.linspace(0, 1, steps)) * alpha)

    So alpha is the initial weight of the empty prompt (pnp-real.yaml:14: "initial strength ... lower =
    stronger"), and linear and exp hand the unconditional branch over to the negative prompt as the
    steps go. With one step linspace(0, 1, 1) = [0]: linear gives 0 and exp gives alpha, as there.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"alpha_schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return alpha
    if steps == 1:
        return 0.0 if schedule == "linear" else alpha
    frac = step / (steps - 1)
    return alpha * (1.0 - frac) if schedule == "linear" else alpha * math.exp(-6.0 * frac)


def negative_uncond(eps_empty, eps_negative, alpha):
    return alpha * eps_empty + (1 - alpha) * eps_negative


@dataclass
class PnPResult(SavesImages):
    """`.pil()`: the translation as PIL; `.save(folder)`: pnp.png (all or none)."""
    images: torch.Tensor  # [1, 3, H, W] in [0,1]
    latents: torch.Tensor
    guidance_latents: list  # the guidance image's inverted z_0, z_{t_1}, ..., z_{t_N} at the sampling timesteps

    def image_names(self, n):
        return ["pnp.png"] if n == 1 else [f"pnp_{i:02d}.png" for i in range(n)]


def check_layers(sd, feature_layers, attention_layers):
    """Each feature layer must have a `hook_h` (a ResBlock), each attention layer a `hook_q` (attention)."""
    for layers, point in ((feature_layers, "h"), (attention_layers, "q")):
        for layer in layers:
            if not select(sd.unet, {"module": layer, "point": point}):
                raise ValueError(f"layer {layer!r} has no hook_{point} hook point; see sd.unet.hook_names()")


def patches(steps, feature_injection, attention_injection, feature_layers, attention_layers) -> List[Patch]:
    """The injections as patches: the translated rows take the source row's `hook_h` at the feature
    layers for the first int(steps f) steps, and its self-attention q and k at the attention layers
    for the first int(steps a) (pnp-diffusers pnp.py: `int(n_timesteps * pnp_f_t)`)."""
    step_ids = torch.arange(steps)
    return [Patch(at={"module": set(feature_layers), "point": "h"}, weight=step_ids < int(steps * feature_injection),
                  read="source", write="translated"),
            Patch(at={"module": set(attention_layers), "point": {"q", "k"}},
                  weight=step_ids < int(steps * attention_injection), read="source", write="translated")]


def pnp_denoiser(sd, zs, context, neg, alpha_schedule, alpha, guidance_scale, steps):
    """One UNet call per step over source | uncond | [negative] | cond (the source row at the guidance
    image's latent of this step's noise level, the others at x), then guidance."""
    n = context.shape[0] - 1  # rows after the source
    rows = {"source": [0], "uncond": [1], "cond": [n], "translated": list(range(1, 1 + n)),
            **({"negative": [2]} if neg else {})}

    def denoise(x, t, step):
        with sd.unet.step_context(StepContext(step=step, t=int(t), num_steps=steps, rows=rows)):
            out = sd.unet(torch.cat([zs[steps - step], x.expand(n, -1, -1, -1)]), t, context)
        eps_u, eps_c = out[1:2], out[-1:]
        if neg:
            eps_u = negative_uncond(eps_u, out[2:3], negative_alpha(alpha_schedule, alpha, step, steps))
        return classifier_free_guidance(eps_u, eps_c, guidance_scale)
    return denoise


def check_guidance_latents(sd, latents):
    """`latents`: a list of [1, C, h, w] tensors of one shape, finite (checked once, here where they enter:
    a wrong one was an error from inside the UNet, or a batch of 2 was accepted)."""
    instance("latents", latents, (list, tuple), "a list of [1, C, h, w] latents (inversion_latents) or None")
    if len(latents) < 2:
        raise ValueError(f"latents must hold at least z_0 and one noisier latent, got {len(latents)}")
    c = sd.unet.cfg.in_channels
    first = tensor_shape("latents[0]", latents[0], (1, c, None, None), f"[1, {c}, h, w]")
    for i, z in enumerate(latents[1:], 1):
        tensor_shape(f"latents[{i}]", z, tuple(first.shape), f"[{', '.join(map(str, first.shape))}] (as latents[0])")
    finite_tensors("latents", latents)


@torch.no_grad()
def translate(sd, image, prompt, *, inversion_prompt="", source_prompt="", negative_prompt=None, alpha=0.0,
              alpha_schedule="constant", feature_injection=0.8, attention_injection=0.5,
              feature_layers: Optional[Sequence[str]] = None, attention_layers: Optional[Sequence[str]] = None,
              guidance_scale=7.5, steps=50, inversion_steps=INVERSION_STEPS, latents: Optional[list] = None,
              observe: Optional[dict] = None, progress=True) -> PnPResult:
    """Translate `image` (PIL / [1,3,H,W] in [0,1]) to `prompt`.

    `inversion_steps`: steps of the DDIM inversion of `image`, 999 as the official codes (trade-off
    measured above); its latents at the `steps` sampling timesteps are kept.
    `latents`: the guidance latents of any inversion that passes through the sampling timesteps (from
    `inversion_latents`, or its raw N'-step trajectory), instead of inverting `image`.
    `source_prompt`: conditions the source row ("" as both official codes; `inversion_prompt` makes the
    source row retrace the inversion). `observe`: extra hooks attached after the injections, so they
    see the injected values.
    Ranges: `alpha`, `feature_injection`, `attention_injection` in [0, 1]; `alpha_schedule` constant,
    linear or exp; `steps` 1 to 999; `inversion_steps` at least `steps` and passing through all of its
    timesteps (`steps` itself, or 999); `guidance_scale` a number (official 7.5).
    `feature_layers`, `attention_layers`: None for the defaults (SD: decoder layer 4 and 4-11, the
    official ones; SDXL: our choice, see SDXL_FIRST_BLOCK).
    `progress`: tqdm bars on stderr for the inversion and the sampling."""
    model("sd", sd)
    for name, value in (("prompt", prompt), ("inversion_prompt", inversion_prompt), ("source_prompt", source_prompt)):
        string(name, value)
    if negative_prompt is not None:
        string("negative_prompt", negative_prompt)
    for name, value in (("alpha", alpha), ("feature_injection", feature_injection),
                        ("attention_injection", attention_injection)):
        fraction(name, value)
    number("guidance_scale", guidance_scale)
    if alpha_schedule not in SCHEDULES:
        raise ValueError(f"alpha_schedule {alpha_schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    schedule_timesteps(sd, steps, "steps")
    if latents is None:
        check_inversion_steps(sd, steps, inversion_steps)
    else:
        check_guidance_latents(sd, latents)
        check_inversion_steps(sd, steps, len(latents) - 1, f"the guidance latents' step count")
    attention_layers = decoder_self_attention(sd) if attention_layers is None else attention_layers
    feature_layers = default_feature_layers(sd) if feature_layers is None else feature_layers
    check_layers(sd, feature_layers, attention_layers)
    if latents is None:
        zs = inversion_latents(sd, image, inversion_prompt, steps, inversion_steps, progress)
    else:
        zs = keep_sampling_latents(sd, latents, steps)
    size = sd.image_size(zs[0])
    texts = ([negative_prompt] if negative_prompt is not None else []) + [prompt]
    # the unconditional row is the model's empty prompt: "" on SD, zeros on SDXL (force_zeros_for_empty_prompt)
    context = torch.cat([sd.encode_prompt([source_prompt], size), sd.encode_negative(None, 1, size),
                         sd.encode_prompt(texts, size)])
    denoise = pnp_denoiser(sd, zs, context, negative_prompt is not None, alpha_schedule, alpha, guidance_scale, steps)
    with apply(sd, patches(steps, feature_injection, attention_injection, feature_layers, attention_layers)), \
            sd.unet.hooks(observe or {}):
        x = sample(denoise, zs[-1], sd.scheduler, steps, progress=progress)
    return PnPResult(sd.decode_latents(x), x, zs)
