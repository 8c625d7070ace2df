"""Attend-and-Excite (Chefer et al., "Attend-and-Excite: Attention-Based Semantic Guidance for
Text-to-Image Diffusion Models", SIGGRAPH 2023): before each of the first sampling steps, move the
latents along the gradient of a loss that asks every chosen word's cross-attention map to have a
strong peak somewhere, so that no subject of the prompt is neglected. No weights change.

Reference: diffusers 0.42 `StableDiffusionAttendAndExcitePipeline`
(pipelines/deprecated/stable_diffusion_attend_and_excite/pipeline_stable_diffusion_attend_and_excite.py,
`A:` line numbers below), numerically the official yuval-alaluf/Attend-and-Excite @ 163efdf on SD 1.4
(/work/notes-refs.md section 4.1). What it does at step i, for each prompt of the batch separately:

1. a conditional-only UNet call at batch 1 with autograd on (A:948-962), recording the cross-attention
   probabilities of the layers whose maps are `attn_res` (A:94-97: every place, down, mid and up);
2. their mean over layers and heads (A:111-119), tokens 1:-1 (75 of 77: padding included) times 100,
   softmax over those tokens; per chosen token (index - 1 after the slice) reflect-pad by 1, a 3x3
   Gaussian of sigma 0.5 whose exponent is ((x - mean) / (2 sigma))^2, i.e. 4 sigma^2, not the
   textbook 2 sigma^2 (A:1051-1113), and the map's maximum (A:619-640);
3. loss = max over tokens of max(0, 1 - maximum) (A:656-661);
4. at the threshold steps ({0: 0.05, 10: 0.5, 20: 0.8}, A:773), while the loss is above 1 - threshold,
   gradient steps and new forwards, at most 20 iterations, then one more forward (A:670-722);
5. for i < max_iter_to_alter (25) and loss != 0: x -= step_size[i] grad (A:984-990, 663-668), with
   step_size = scale_factor sqrt(linspace(1, 0.5, len(timesteps))) (A:927-929; with DDIM
   len(timesteps) is the step count: 50 steps give 20, ..., 20 sqrt(0.5));
then the ordinary guided step from the updated latents (A:994-1010).

The gradient step is `generate`'s `prepare` callback (DDIM only); the maps are recorded with
`unet.record(..., detach=False)`, so the hooks keep the autograd graph.

Choices of ours:
- The loss is computed in float32 whatever the UNet's dtype (diffusers computes it in the UNet's
  dtype; the same on float32 models): optimise in fp32.
- The first refinement iteration reuses the forward just made at the same latents (diffusers repeats
  it; the values are the same).
- `attn_res=None`: the maps of the deepest UNet level with cross-attention in both the encoder and
  the decoder (`default_attn_res`). On SD and SDXL that is level 2 of the latent, 1/32 of the image:
  16 x 16 at 512^2 (the paper's) and 32 x 32 at 1024^2, which is diffusers' own rule for
  attn_res=None, (ceil(w / 32), ceil(h / 32)) (A:921-922), at every size. sdlens-tiny (64 x 64
  images, latent factor 4) has cross-attention maps of 16 x 16, 8 x 8 and 4 x 4 (the middle block)
  only, none at 1/32 of the image (2 x 2); the same rule picks its level 1, 8 x 8 (2 encoder and 3
  decoder layers, as SD's 16 x 16), and `attn_res=16` takes its finest level instead.
- `attn_res` is (h, w). diffusers' None rule gives (w / 32, h / 32) and reshapes the row-major queries
  as (attn_res[0], attn_res[1]), which scrambles a non-square image's maps; square ones are the same.
"""
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import fraction, model, number, whole
from ..hooks import StepContext
from .attention_store import object_map_size
from .words import word_positions

THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}  # A:773 and the official config.py: step -> wanted maximum
MAX_REFINEMENT_STEPS = 20  # A:678
SOFTMAX_SCALE = 100  # A:626
SIGMA, KERNEL_SIZE = 0.5, 3  # A:1064-1065, official config.py
PLACES = ("up", "down", "mid")  # A:645: the order diffusers sums the layers in


def default_attn_res(sd, latent_hw) -> Tuple[int, int]:
    """(h, w) of the maps Attend-and-Excite reads by default: `object_map_size` (the deepest level with
    cross-attention in both the encoder and the decoder; see the module docstring)."""
    return object_map_size(sd, latent_hw)


def map_layers(sd, latent_hw, attn_res) -> List[str]:
    """The cross-attention probability points whose maps are `attn_res` (h, w) for latents of
    `latent_hw`, in diffusers' summation order: up, down, mid, each in execution order."""
    unet = sd.unet
    names = unet.hook_names(kind="cross_attention", point="probs")
    found = [n for n in names if unet.hook_info(n).map_size(latent_hw) == tuple(attn_res)]
    if not found:
        sizes = sorted({unet.hook_info(n).map_size(latent_hw) for n in names})
        raise ValueError(f"attn_res {tuple(attn_res)}: no cross-attention maps of that size for "
                         f"{latent_hw[0]}x{latent_hw[1]} latents; these exist: {sizes}")
    return sorted(found, key=lambda n: PLACES.index(unet.hook_info(n).place))  # stable: execution order kept


def gaussian_kernel(dtype=torch.float32) -> torch.Tensor:
    """diffusers' `GaussianSmoothing` weight [1, 1, 3, 3] (A:1082-1093), computed as it does, in float32:
    the product over both dimensions of exp(-((x - mean) / (2 sigma))^2) / (sigma sqrt(2 pi)), normalised
    to sum 1. With sigma 0.5 the 1-D weights are [e^-1, 1, e^-1] / (1 + 2 e^-1)."""
    kernel = 1
    grids = torch.meshgrid([torch.arange(KERNEL_SIZE, dtype=torch.float32)] * 2, indexing="ij")
    for g in grids:
        mean = (KERNEL_SIZE - 1) / 2
        kernel = kernel * (1 / (SIGMA * math.sqrt(2 * math.pi)) * torch.exp(-(((g - mean) / (2 * SIGMA)) ** 2)))
    return (kernel / kernel.sum()).view(1, 1, KERNEL_SIZE, KERNEL_SIZE).to(dtype)


def aggregate(store: Dict[str, List[torch.Tensor]], names: Sequence[str], attn_res) -> torch.Tensor:
    """One UNet call's recorded probabilities [1, heads, h w, keys] -> their mean over layers and heads
    [h, w, keys], as diffusers: every head of every layer is one map, summed in `names`' order (A:111-119)."""
    h, w = attn_res
    maps = torch.cat([store[n][-1].float().reshape(-1, h, w, store[n][-1].shape[-1]) for n in names])
    return maps.sum(0) / maps.shape[0]


def max_attention(maps: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """[h, w, keys] aggregated maps -> [len(indices)] the smoothed maximum of each token's map (A:619-640).

    The softmax runs over tokens 1:-1 (without <|startoftext|> and the last position, so padding and
    <|endoftext|> compete too), scaled by 100: a token's map is high where it wins that competition."""
    text = F.softmax(maps[:, :, 1:-1] * SOFTMAX_SCALE, dim=-1)
    images = text[:, :, [i - 1 for i in indices]].permute(2, 0, 1)[:, None]  # [tokens, 1, h, w]
    smoothed = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), gaussian_kernel().to(images))
    return smoothed.flatten(1).max(1).values


def excite_loss(maxes: torch.Tensor) -> torch.Tensor:
    """max over tokens of max(0, 1 - maximum) (A:656-661): the most neglected token. diffusers takes
    Python's max of a list, which sends the gradient to the first of two exactly equal maxima;
    torch's splits it between them, a difference only at exact ties."""
    return (1.0 - maxes).clamp(min=0).max()


def step_sizes(scale_factor, steps) -> np.ndarray:
    """scale_factor sqrt(linspace(1, 0.5, N)), N = the sampler's number of timesteps (A:927-929)."""
    return scale_factor * np.sqrt(np.linspace(1.0, 0.5, steps))


class _Exciter:
    """The `denoiser` and `prepare` of one `generate` call. generate calls `denoiser(context, w, steps)`
    once, before sampling: it hands over the text context and the step count that `prepare` needs,
    then returns the model's ordinary guided denoiser."""

    def __init__(self, sd, indices, attn_res, names, thresholds, max_iter_to_alter, scale_factor):
        self.sd, self.indices, self.attn_res, self.names = sd, indices, attn_res, set(names)
        self.order = list(names)
        self.thresholds, self.max_iter, self.scale_factor = thresholds, max_iter_to_alter, scale_factor

    def denoiser(self, context, guidance_scale, steps):
        self.cond = context[-len(self.indices):]  # the conditional rows are the last B, guided or not
        self.steps, self.step_size = steps, step_sizes(self.scale_factor, steps)
        return self.sd.denoiser(context, guidance_scale, steps)

    def loss_at(self, z, row, step, t):
        """A fresh leaf at z's values, and the loss of its conditional-only UNet call (batch 1)."""
        z = z.detach().clone().requires_grad_(True)
        unet = self.sd.unet
        ctx = StepContext(step=step, t=int(t), num_steps=self.steps, rows={"cond": [0]})
        with unet.step_context(ctx), unet.record(self.names.__contains__, detach=False) as store:
            unet(z, t, self.cond[row:row + 1])
        return z, excite_loss(max_attention(aggregate(store, self.order, self.attn_res), self.indices[row]))

    def prepare(self, step, t, x):
        if step >= self.max_iter and step not in self.thresholds:
            return None  # diffusers still makes the forward to log the loss (A:955-968); nothing uses it
        ss = float(self.step_size[step])
        update = lambda z, loss: z - ss * torch.autograd.grad(loss, [z])[0]
        rows = []
        with torch.enable_grad():
            for row in range(x.shape[0]):
                z, loss = self.loss_at(x[row:row + 1], row, step, t)
                if step in self.thresholds and loss > 1.0 - self.thresholds[step]:  # iterative refinement
                    target, it = max(0.0, 1.0 - self.thresholds[step]), 0
                    while loss > target:  # tested before the update: one update more than needed, as A:681
                        it += 1
                        if it > 1:  # the first iteration's forward is the one just made
                            z, loss = self.loss_at(z, row, step, t)
                        if loss != 0:
                            z = update(z, loss)
                        if it >= MAX_REFINEMENT_STEPS:
                            break
                    z, loss = self.loss_at(z, row, step, t)  # the loss at the refined latents (A:709-718)
                if step < self.max_iter and loss != 0:
                    z = update(z, loss)
                rows.append(z.detach())
        return torch.cat(rows)


def token_indices(sd, prompts: List[str], words) -> List[List[int]]:
    """Token positions to excite, per prompt. `words`: a word (or a word index), a list of them for
    every prompt, or one such list per prompt. A word of several tokens excites each of them."""
    def check(w):
        if isinstance(w, bool) or not isinstance(w, (str, numbers.Integral)):
            raise TypeError(f"words must be words (strings) or word indices, not {w!r}")
        return w

    if isinstance(words, (str, numbers.Integral)) and not isinstance(words, bool):
        per_prompt = [[words]] * len(prompts)
    elif isinstance(words, (list, tuple)) and words and all(isinstance(w, (list, tuple)) for w in words):
        if len(words) != len(prompts):
            raise ValueError(f"words has {len(words)} lists for {len(prompts)} prompts; give one list per prompt, "
                             "or one list for all")
        per_prompt = [list(w) for w in words]
    elif isinstance(words, (list, tuple)):
        per_prompt = [list(words)] * len(prompts)
    else:
        raise TypeError(f"words must be a word, a list of words or one list per prompt, not {type(words).__name__}")
    n = sd.text_encoder.cfg.max_positions
    out = []
    for prompt, ws in zip(prompts, per_prompt):
        if not ws:
            raise ValueError(f"words: no word to excite for the prompt {prompt!r}")
        try:
            positions = [p for w in ws for p in word_positions(sd.tokenizer, prompt, check(w), n)]
        except ValueError as e:  # the same class (WordNotInPrompt too), naming the argument
            raise type(e)(f"words: {e}") from None
        out.append(list(dict.fromkeys(positions)))  # a word named twice counts once
    return out


def check_attn_res(attn_res) -> Optional[Tuple[int, int]]:
    if attn_res is None:
        return None
    pair = (attn_res, attn_res) if isinstance(attn_res, numbers.Integral) else attn_res
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise TypeError(f"attn_res must be None, a map side or an (h, w) pair, not {attn_res!r}")
    # reflect padding by 1 needs at least 2 pixels a side
    return tuple(whole("attn_res", s, 2, hint=" (pixels of the attention map a side)") for s in pair)


def check_thresholds(thresholds) -> Dict[int, float]:
    if thresholds is None:
        return dict(THRESHOLDS)
    if not isinstance(thresholds, dict):
        raise TypeError(f"thresholds must be a dict {{step: wanted maximum attention}}, e.g. {THRESHOLDS}, "
                        f"not {type(thresholds).__name__}")
    return {whole("thresholds step", k, 0): fraction(f"thresholds[{k!r}]", v) for k, v in thresholds.items()}


def attend_and_excite(sd, prompt: Union[str, List[str]], words, *, max_iter_to_alter=25, thresholds=None,
                      scale_factor=20, attn_res=None, **kw):
    """Generate with Attend-and-Excite: `sd.generate(prompt, **kw)` (DDIM) whose latents are pushed,
    before each of the first `max_iter_to_alter` steps, towards a strong cross-attention peak for each
    of `words`. Returns what `sd.generate` returns and takes its keywords (steps, guidance_scale, seed,
    latents, height, width, output, progress, ...), except `sampler`, `denoiser` and `prepare`.

    words: the prompt's words to excite (diffusers' `token_indices`, found with `editing.words`):
      a word or word index, a list of them, or one list per prompt of a batch.
    max_iter_to_alter: the steps 0 .. max_iter_to_alter - 1 get a gradient step (25, A:771).
    thresholds: {step: t}: at those steps, refine until every word's maximum is >= t, at most 20
      iterations; None is {0: 0.05, 10: 0.5, 20: 0.8} (A:773). Steps are sampling steps whatever
      their number (the defaults are for 50); steps past the end are never reached.
    scale_factor: the gradient step at step i is scale_factor sqrt(linspace(1, 0.5, steps))[i] (20).
    attn_res: the (h, w) (or side) of the cross-attention maps the loss reads; None: `default_attn_res`
      (16 x 16 on SD at 512^2, 32 x 32 on SDXL at 1024^2, 8 x 8 on sdlens-tiny at 64^2).

    Cost: each step adds a forward and backward pass of the UNet at batch 1 per prompt, and the
    refinement steps up to 21 more each."""
    model("sd", sd)
    for k in ("sampler", "denoiser", "prepare"):
        if k in kw:
            raise TypeError(f"attend_and_excite() takes no {k}=: it samples with DDIM and its own prepare step")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, not {prompt!r}")
    indices = token_indices(sd, list(prompts), words)
    max_iter_to_alter = whole("max_iter_to_alter", max_iter_to_alter, 0)
    thresholds = check_thresholds(thresholds)
    scale_factor = number("scale_factor", scale_factor, 0)
    height, width = sd.check_size(kw.get("height"), kw.get("width"))
    f = sd.latent_factor
    latent_hw = (height // f, width // f)
    attn_res = check_attn_res(attn_res) or default_attn_res(sd, latent_hw)
    names = map_layers(sd, latent_hw, attn_res)
    ex = _Exciter(sd, indices, attn_res, names, thresholds, max_iter_to_alter, scale_factor)
    return sd.generate(prompt, denoiser=ex.denoiser, prepare=ex.prepare, **kw)
