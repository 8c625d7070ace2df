"""FreeU (Si et al., CVPR 2024): free quality from re-weighting what the decoder concatenates.

At the two deepest decoder levels, before each decoder block concatenates the features coming up
the decoder (the "backbone") with the encoder's skip, FreeU
- multiplies the first half of the backbone's channels by b (b1 at the deepest level, b2 at the
  next), which strengthens the denoising backbone;
- scales the lowest frequencies of the skip by s (s1, s2): in the centred 2-D spectrum of each
  channel the 2x2 block around DC is multiplied by s, the rest kept. This mitigates "the
  oversmoothing effect in the enhanced denoising process" that b alone gives (diffusers'
  `enable_freeu` docstring, unet_2d_condition.py:799-804).

Here both are Patches (always on, every row) on the decoder blocks' `hook_backbone` and `hook_skip`
points, chosen by `HookInfo.kind` and `HookInfo.level`: `with freeu(sd): sd.generate(...)`, and
every editing method run inside the `with`, runs with FreeU.

The reference is diffusers 0.42.1 `enable_freeu` (`unet_2d_condition.py:790-812`), checked image
for image in tests/test_freeu.py. Its facts, and where ours is the same:
- which layers: `apply_freeu(resolution_idx, ...)` (`utils/torch_utils.py:191-215`) acts at every
  resnet of `up_blocks[0]` (resolution_idx 0: b1, s1) and of `up_blocks[1]` (1: b2, s2)
  (`unet_2d_blocks.py:2433-2444` CrossAttnUpBlock2D, `:2550-2559` UpBlock2D; resolution_idx = i
  in the up-block loop, `unet_2d_condition.py:461`), and up_blocks[0] is the deepest decoder level.
  Ours: the `hook_backbone` and `hook_skip` of every decoder block at `level` = len(channel_mult) - 1
  and at the level above it: the same places (num_res_blocks + 1 blocks per level, one per resnet;
  the first block's backbone is the middle block's output, a level's first after the deepest gets
  the upsampled features, as diffusers' resnet 0);
- the backbone: `hidden_states[:, :C // 2] * b` with C the current block's channel count
  (torch_utils.py:207-208): `scale_backbone`;
- the skip: `fourier_filter(x, threshold=1, scale=s)` (torch_utils.py:155-188): `fourier_filter`.

ChenyangSi/FreeU's own code (demo/free_lunch_utils.py:97-102, 235-240) picks the layers differently,
by the backbone's channel count (1280 -> b1 on 640 channels, 640 -> b2 on 320), which on SD 1/2
also hits up_blocks[2]'s first resnet and up_blocks[3]'s first (and on SDXL up_blocks[1]'s and
up_blocks[2]'s first): not the same layers. The default here is diffusers', the reference the
issue names. The channel rule cannot be written for UNets of other widths anyway (sdlens-tiny).

Differences from diffusers, both deliberate:
- diffusers turns FreeU off everywhere if any of b1, b2, s1, s2 is 0 (a Python truthiness test,
  unet_2d_blocks.py:2420-2425, 2537-2542). Here 0 means 0 (s = 0 removes the skip's lowest frequencies).
- diffusers' filter always computes in float32 (torch_utils.py:165-171), also for a float64 model;
  here float32 for float16 / bfloat16 / float32 values, float64 for float64.
"""
from contextlib import contextmanager
from functools import partial
from typing import Dict, List

import torch
from torch.fft import fftn, fftshift, ifftn, ifftshift

from ..checks import model, number
from .patch import Patch, apply

# ChenyangSi/FreeU README.md:161-173 ("FreeU Parameters"), the values diffusers' docs use too
# (docs/source/en/using-diffusers/image_quality.md). SD 1.x takes SD 1.5's (SD 1.4's are b1 1.3, b2 1.4,
# s1 0.9, s2 0.2: pass them). A UNet of its own widths (sdlens-tiny, "SD architecture, custom widths")
# has no published values: it takes SD 1.5's (our choice: tiny has SD 1's block types, CLIP text, eps).
VALUES = {"SD 1.x": dict(b1=1.5, b2=1.6, s1=0.9, s2=0.2),
          "SD 2.x": dict(b1=1.4, b2=1.6, s1=0.9, s2=0.2),
          "SDXL": dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)}
DEFAULT = VALUES["SD 1.x"]
# half the side of the scaled block of frequencies: apply_freeu passes threshold=1 (torch_utils.py:209, 213)
THRESHOLD = 1


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Multiply the centred 2*threshold x 2*threshold block of each channel's 2-D spectrum by `scale`.

    As diffusers' `fourier_filter` (utils/torch_utils.py:155-188), operation for operation: full
    complex `fftn` over (H, W) (not rfft: see below), `fftshift`, a real mask of ones with `scale` at
    rows and columns [n // 2 - threshold, n // 2 + threshold) (Python slicing, so on a side of 1 the
    block is that one frequency), `ifftshift`, `ifftn`, the real part, cast back. With threshold 1
    the block is DC and the -1 frequencies, not conjugate-symmetric, so the inverse is complex and
    only its real part is kept (torch_utils.py:186): an rfft version gives other numbers. The mask
    is [H, W] and broadcasts, where diffusers builds it [B, C, H, W]: the same products."""
    x_in = x
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # torch_utils.py:165-171 (fftn of float16 is ComplexHalf)
    freq = fftshift(fftn(x, dim=(-2, -1)), dim=(-2, -1))
    H, W = x.shape[-2:]
    mask = torch.ones((H, W), dtype=x.dtype, device=x.device)
    crow, ccol = H // 2, W // 2
    mask[crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    out = ifftn(ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x_in.dtype)


def scale_backbone(src, dst, w, *, b):
    """Patch op: the first half of the channels times b (torch_utils.py:207-208, C // 2 of this block's
    backbone). A new tensor; diffusers writes in place, the same values."""
    half = dst.shape[1] // 2
    return torch.cat([dst[:, :half] * b, dst[:, half:]], dim=1)


def filter_skip(src, dst, w, *, s):
    """Patch op: the skip's lowest frequencies times s (torch_utils.py:209, 213)."""
    return fourier_filter(dst, THRESHOLD, s)


def freeu_values(sd, b1=None, b2=None, s1=None, s2=None) -> Dict[str, float]:
    """The four factors, each None replaced by the published value for `sd.family` (see VALUES)."""
    base = VALUES.get(sd.family, DEFAULT)
    given = dict(b1=b1, b2=b2, s1=s1, s2=s2)
    return {k: base[k] if v is None else number(k, v) for k, v in given.items()}


def patches(sd, b1, b2, s1, s2) -> List[Patch]:
    """FreeU as Patches: at the deepest decoder level (diffusers' resolution_idx 0) b1 and s1, at the
    next (1) b2 and s2; weight None (always on), every row."""
    deepest = len(sd.unet.cfg.channel_mult) - 1
    out = []
    for level, b, s in ((deepest, b1, s1), (deepest - 1, b2, s2)):
        if level < 0:  # a one-level UNet has no second stage
            continue
        out += [Patch(at={"kind": "backbone", "level": level}, op=partial(scale_backbone, b=b)),
                Patch(at={"kind": "skip", "level": level}, op=partial(filter_skip, s=s))]
    return out


def freeu(sd, *, b1=None, b2=None, s1=None, s2=None):
    """`with freeu(sd): sd.generate(...)`: inside, every UNet call of `sd` runs with FreeU.

    b1, b2: backbone factors of the deepest decoder level and the next; s1, s2: the skips'
    low-frequency factors there. Any finite numbers; None: the ChenyangSi/FreeU README's values for
    the model's family (SD 1.x: SD 1.5's b1 1.5, b2 1.6, s1 0.9, s2 0.2; SD 2.x: 1.4, 1.6, 0.9, 0.2;
    SDXL: 1.3, 1.4, 0.9, 0.2; other widths, sdlens-tiny among them: SD 1.5's). The `with` yields the
    values used. The layers are diffusers' (by decoder level), not the official code's (by channel
    count): see the module's notes. On exit the UNet is as before, exactly. The arguments are checked
    here, at the call, not at the `with`."""
    model("sd", sd)
    return _active(sd, freeu_values(sd, b1, b2, s1, s2))


@contextmanager
def _active(sd, values):
    with apply(sd, patches(sd, **values)):
        yield values
