"""MasaCtrl (Cao et al., ICCV 2023): mutual self-attention control for consistent synthesis and
non-rigid editing. The source and the target prompt are sampled together from the same noise;
from step `start_step` on, in the self-attention layers from `start_layer` on, the target's
queries attend to the SOURCE's keys and values, so the target takes the source's content
(colour, texture, identity) while its own prompt sets the layout (pose, shape, position).

Facts from the official code (TencentARC/MasaCtrl @ d0ba16b, masactrl/masactrl.py, masactrl_utils.py):
- Layers are counted over attention calls in execution order: `cur_att_layer` counts every
  attention module call of a UNet call (masactrl_utils.py:23-30, the count is reset after
  `num_att_layers` = all attn1 + attn2 modules, :144), and the test is `cur_att_layer // 2 in
  layer_idx` (masactrl.py:60): each transformer block calls attn1 then attn2, so `// 2` is the
  index of the transformer block = of its self-attention layer, in execution order, over all 16
  of SD (6 down, 1 mid, 9 up; MODEL_TYPE "SD": 16, masactrl.py:15-18). `layer_idx = range(
  start_layer, 16)` (:36); start_layer 10 (playground.ipynb, both gradio apps) = layers 10-15 =
  the decoder's self-attention at its two finest resolutions (SD 512: 32x32 and 64x64 maps).
- Steps: `step_idx = range(start_step, total_steps)` with total_steps = 50 whatever the sampler's
  steps (:20, :37; the gradio apps pass only start_step and start_layer): from step start_step to
  the end. start_step 4 (playground.ipynb, gradio defaults). cur_step counts UNet calls, one per
  sampling step with guidance (diffuser_utils.py:169-189), steps counted from 0 at x_T.
- The batch is [uncond source, uncond target, cond source, cond target] (diffuser_utils.py:161,
  :177); each half is handled alike: `qu, qc = q.chunk(2)` and the queries of the half attend to
  `ku[:num_heads], vu[:num_heads]`, the source row's keys and values (masactrl.py:63-70). The
  source row's queries meet its own keys and values, so the source is not edited; each target
  half attends to the matching source half. Attention is the plain softmax(q k^T scale) v, scale =
  head_dim^-0.5, per head (:45-54), which is exactly what SDPA computes once the target's k, v are
  the source's: so here `hook_k` and `hook_v` of attn1 take the source row's values for the
  target rows, and attention keeps the fast path.
- Mask-guided (MutualSelfAttentionControlMaskAuto, masactrl.py:196-334): during each UNet call the
  cross-attention probabilities of maps with 16 x 16 queries are kept, averaged over heads (:279-280),
  and dropped after the step (:227-229). At an edited layer, if any were kept so far in this call,
  their mean over layers, summed over the word's tokens (ref_token_idx / cur_token_idx, default
  [1]) and min-max normalised per image (:260-271), gives the source's map (row -2: cond source)
  and the target's (row -1: cond target) (:300-301, :312-313); nearest-resized to the layer
  (:303, :315) and cut at `thres` = 0.1 (>= thres is 1; :197, :244-247, :321-323). The target
  queries then attend twice, to the source's foreground keys only and to its background keys only
  (sim + finfo.min outside, :248-250), and the target's own mask picks per query: out = fg M_t +
  bg (1 - M_t) (:324-328), for both halves. Here that mix is applied to the probabilities at
  `hook_probs` (the same, since out = P v is linear in P); it makes those layers use the explicit
  attention path.
- SDXL (run_synthesis_sdxl.py, commit 2a7861d): the same editor with `model_type="SDXL"`, i.e.
  `layer_idx = range(start_layer, 70)` over SDXL's 70 transformer blocks (masactrl.py:15-18, :36;
  SDXL's spatial transformers hold 2 or 10 blocks, each with its attn1, so `// 2` still counts
  self-attention layers). `STEP = 4` and `LAYER_LIST = [44, 54, 64]`: not a list of layers but
  three separate runs, each from one start layer to the last ("hyper paramerter of MasaCtrl for
  SDXL may be not optimal"). 44, 54 and 64 are the first self-attention layers of the decoder's
  2nd, 3rd and 4th spatial transformer (output_blocks.1.1, .2.1, .3.1; `sdxl_start_layers`). SD's
  official 10 is the first of its decoder's 4th (output_blocks.6.1), and so is our default on both.
  The script samples 1024 x 1024 with guidance 7.5, no negative prompt (zeros: SDXL's
  force_zeros_for_empty_prompt) and DDIM with diffusers' `steps_offset` 0, as the SD scripts do;
  here `sd.scheduler` is used as it is. tests/test_sdxl_masactrl.py runs the official editors on
  a small random SDXL and checks our images against them.
- Mask-guided on SDXL: the official masks come from 16 x 16 maps only (masactrl.py:279), and at
  1024 x 1024 SDXL's cross-attention maps are 64 x 64 and 32 x 32, so the official editor would
  quietly make no mask (:295-298). We refuse such sizes; at 512 x 512 or 256 x 256 (a 16 x 16 map
  at level 2 or 1) it runs as on SD, and matches the official MaskAuto (tests/test_sdxl_masactrl.py).
Compiled (`sd.compile()`), plain MasaCtrl keeps one graph: `swap` reads the step as a tensor
(`ctx.at_step`). The mask-guided hooks keep Python state per UNet call (the maps seen so far), so
compiled they make a graph per step until torch's recompile limit and then run eagerly: the images
stay right, only not faster.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..checks import fraction, model, string, whole
from ..schedulers import sample
from .batch import batch_denoiser, check_guidance, follow_inversion, start_noise
from .patch import Patch, apply, select
from ..inversion import Inversion
from ..visualize import SavesImages
from .words import word_positions

MASK_SIZE = 16  # the official mask is made from maps with 16 x 16 queries (masactrl.py:279)
THRESHOLD = 0.1  # official `thres` (masactrl.py:197)


def self_attention_layers(sd):
    """The attn1 modules in execution order. `hook_names` lists points in module order, which for
    this UNet (input_blocks, middle_block, output_blocks, each block's transformer after its
    ResBlock) is the order the forward pass calls them; tests/test_masactrl.py checks it."""
    return [sd.unet.hook_info(n).module for n in sd.unet.hook_names(kind="self_attention", point="k")]


def _layer_infos(sd):
    return [sd.unet.hook_info(n) for n in sd.unet.hook_names(kind="self_attention", point="k")]


def default_start_layer(sd):
    """The official choice transferred to any UNet: the first self-attention layer of the decoder's
    two finest resolutions (levels 0 and 1). SD: 10 of 16, the official number; SDXL (no attention
    at level 0): 64 of 70, the last of the official script's three; sdlens-tiny: 5 of 11."""
    return next(i for i, info in enumerate(_layer_infos(sd)) if info.place == "up" and info.level <= 1)


def decoder_transformer_starts(sd):
    """The first self-attention layer (transformer block 0) of each of the decoder's spatial
    transformers, as indices into `self_attention_layers(sd)`. SDXL: 34, 44, 54, 64, 66, 68."""
    return [i for i, info in enumerate(_layer_infos(sd)) if info.place == "up" and info.transformer_block == 0]


SDXL_TRANSFORMERS = (1, 2, 3)  # run_synthesis_sdxl.py LAYER_LIST = [44, 54, 64]: the decoder's 2nd, 3rd, 4th


def sdxl_start_layers(sd):
    """The official SDXL script's three start layers, found on this UNet: SDXL [44, 54, 64]."""
    starts = decoder_transformer_starts(sd)
    if len(starts) <= max(SDXL_TRANSFORMERS):
        raise ValueError(f"this UNet's decoder has {len(starts)} spatial transformers; the official SDXL "
                         f"start layers need {max(SDXL_TRANSFORMERS) + 1}")
    return [starts[j] for j in SDXL_TRANSFORMERS]


@dataclass
class MasaCtrlResult(SavesImages):
    """`.pil()`: [source, edit] as PIL; `.save(folder)`: source.png, edit.png (all or none)."""
    images: torch.Tensor  # [2, 3, H, W] in [0,1]: the source, then the edit
    latents: torch.Tensor  # [2, C, h, w] final latents
    masks: Optional[torch.Tensor] = None  # mask-guided: the last [2, 16, 16] maps (source, target) in [0, 1]

    def image_names(self, n):
        return ["source.png", "edit.png"]


class MasaCtrl:
    def __init__(self, sd, source_prompt: str, target_prompt: str, *, start_step=4, start_layer=None, steps=50,
                 mask_word: Union[None, str, Sequence[str]] = None, mask_threshold=THRESHOLD):
        """`start_step`: the first sampling step with mutual attention (0 .. steps; steps: none;
        official 4 of 50). `start_layer`: the first self-attention layer, counted in execution order
        over `self_attention_layers(sd)` (0 .. their count; the count: none), the official numbering
        (SD 16 layers, SDXL 70). None: the decoder's two finest resolutions, `default_start_layer`
        (SD: 10, the official; SDXL: 64, one of the official 44, 54, 64; sdlens-tiny: 5).
        `mask_word`: mask-guided MasaCtrl; a word of both prompts, or (source word, target word),
        e.g. ("circle", "star"). `mask_threshold`: the cut of the normalised maps (official 0.1)."""
        model("sd", sd)
        for name, p in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
            string(name, p)
        self.steps = whole("steps", steps, 1, sd.scheduler.num_train_timesteps - sd.scheduler.steps_offset)
        self.start_step = whole("start_step", start_step, 0, steps, f" ({steps}: no step edited)")
        self.layers = self_attention_layers(sd)
        n = len(self.layers)
        start_layer = default_start_layer(sd) if start_layer is None else start_layer
        self.start_layer = whole("start_layer", start_layer, 0, n,
                                f" (this UNet has {n} self-attention layers; {n}: no layer edited)")
        self.sd, self.source, self.target = sd, source_prompt, target_prompt
        self.tokens = None
        if mask_word is not None:
            words = (mask_word, mask_word) if isinstance(mask_word, str) else tuple(mask_word)
            if len(words) != 2 or not all(isinstance(w, str) for w in words):
                raise ValueError(f"mask_word must be a word or a (source word, target word) pair, not {mask_word!r}")
            length = sd.text_encoder.cfg.max_positions
            try:
                self.tokens = (word_positions(sd.tokenizer, source_prompt, words[0], length),
                               word_positions(sd.tokenizer, target_prompt, words[1], length))
            except ValueError as e:
                raise ValueError(f"mask_word: {e}; give a word of both prompts or a (source word, target word) pair") from None
        self.threshold = fraction("mask_threshold", mask_threshold)

    # ---- the edit ----
    PAIRS = (("uncond_source", "uncond_target"), ("source", "target"))  # each half: the target takes its source's

    def patches(self) -> List[Patch]:
        """Mutual self-attention as data: from `start_step` on, at the k and v of the self-attention
        layers from `start_layer` on, the target rows take their source row's, in both halves."""
        edited = torch.arange(self.steps) >= self.start_step
        at = {"kind": "self_attention", "point": {"k", "v"}, "module": set(self.layers[self.start_layer:])}
        if not at["module"]:  # start_layer = the layer count: nothing edited
            return []
        return [Patch(at=at, weight=edited, op="copy", read=src, write=tgt) for src, tgt in self.PAIRS]

    def check_mask_size(self, latent_hw, image_size):
        """Mask-guided needs a cross-attention map of 16 x 16 queries (the official masks are made from
        those only, masactrl.py:279; with none the official editor silently makes no mask, :295-298).
        SD at 512 has one; SDXL at 1024 has 64 x 64 and 32 x 32 maps only, at 512 a 16 x 16 one."""
        unet = self.sd.unet
        infos = [unet.hook_info(n) for n in unet.hook_names(kind="cross_attention", point="probs")]
        maps = sorted({i.map_size(latent_hw) for i in infos}, reverse=True)
        if (MASK_SIZE, MASK_SIZE) not in maps:
            downs = sorted({i.downscale for i in infos}, reverse=True)
            sides = " or ".join(str(MASK_SIZE * d * self.sd.latent_factor) for d in downs)
            raise ValueError(f"mask_word needs a cross-attention map of {MASK_SIZE}x{MASK_SIZE} queries (the official "
                             f"masks are made from those only), and a {image_size[0]}x{image_size[1]} image has "
                             f"{', '.join(f'{h}x{w}' for h, w in maps)}; use a square image of side {sides}")

    # ---- sampling ----
    @torch.no_grad()
    def run(self, guidance_scale=7.5, seed=None, inversion: Optional[Inversion] = None, latents=None,
            height=None, width=None, progress=True) -> MasaCtrlResult:
        """Sample the source and the target together from the same noise -> MasaCtrlResult.

        The noise is `inversion.latents[-1]` (a real image: `invert_image(sd, image, source_prompt,
        method, steps)` with any method; the source row follows it as in Prompt-to-Prompt), else
        `latents` ([1 or 2, C, h, w]), else drawn from `seed` (int, or None for fresh noise) at
        `height` x `width`. `guidance_scale`: w (official 7.5; 1 turns guidance off).
        `progress`: a tqdm bar on stderr."""
        sd = self.sd
        check_guidance(guidance_scale)
        prompts = [self.source, self.target]
        x = start_noise(sd, 2, steps=self.steps, seed=seed, latents=latents, inversion=inversion, height=height,
                        width=width)
        hw = tuple(x.shape[-2:])
        guide = None
        if self.tokens is not None:
            self.check_mask_size(hw, sd.image_size(x))
            guide = MaskGuide(sd, self.tokens, self.threshold, self.start_step, hw)
        denoise = batch_denoiser(sd, prompts, self.steps, guidance_scale, inversion, size=sd.image_size(x))
        # the mask-guided hooks come after the patches: they read the swapped keys
        with apply(sd, self.patches()), sd.unet.hooks(guide.hooks(self.layers[self.start_layer:]) if guide else {}):
            x = sample(denoise, x, sd.scheduler, self.steps, progress=progress,
                       callback=lambda step, t, xt: follow_inversion(inversion, step, xt))
        return MasaCtrlResult(sd.decode_latents(x), x, guide.last_masks if guide else None)


class MaskGuide:
    """Mask-guided MasaCtrl's hooks, made per run. Not data: the mask is made from the cross-attention
    maps seen earlier in the same UNet call and restricts a softmax over the (swapped) keys, a
    product of three hooks' values within one call (see the module's notes, masactrl.py:196-334)."""

    def __init__(self, sd, tokens, threshold, start_step, latent_hw):
        self.sd, self.threshold, self.start_step, self.latent_hw = sd, threshold, start_step, latent_hw
        self.token_ids = [torch.tensor(t, device=sd.device) for t in tokens]  # on the device once
        self.maps, self.maps_step, self.last_masks = [], None, None

    def keep_cross(self, probs, hook):
        """Cross-attention probs [b, heads, q, 77] of maps with 16 x 16 queries: mean over heads,
        kept for the current UNet call (official: per step, one call per step)."""
        ctx = hook.ctx
        if ctx is None or hook.info.map_size(self.latent_hw) != (MASK_SIZE, MASK_SIZE) or "cond" not in ctx.rows:
            return None
        if self.maps_step != ctx.step:
            self.maps, self.maps_step = [], ctx.step
        self.maps.append(probs.float().mean(1))
        return None

    def word_maps(self, ctx):
        """[2, 16, 16]: the source's map of its word and the target's of its word, each min-max normalised."""
        m = torch.stack(self.maps).mean(0).reshape(-1, MASK_SIZE, MASK_SIZE, self.maps[0].shape[-1])
        src, tgt = ctx.rows["source"][0], ctx.rows["target"][0]
        out = torch.stack([m[src][..., self.token_ids[0]].sum(-1), m[tgt][..., self.token_ids[1]].sum(-1)])
        lo, hi = out.flatten(1).min(1).values, out.flatten(1).max(1).values
        return (out - lo[:, None, None]) / (hi - lo)[:, None, None]

    def masked(self, probs, hook, qk):
        """At an edited layer's hook_probs: the target rows' foreground / background mix."""
        ctx = hook.ctx
        if ctx is None or ctx.step < self.start_step or not ctx.rows.get("target") or self.maps_step != ctx.step \
                or not self.maps:
            return None  # official: no 16x16 cross-attention map yet in this step -> plain mutual attention
        q, k = qk["q"], qk["k"]  # this layer's queries and (already swapped) keys
        maps = self.last_masks = self.word_maps(ctx)
        m = F.interpolate(maps[:, None], size=hook.info.map_size(self.latent_hw)).flatten(1) >= self.threshold
        m_src, m_tgt = m[0], m[1].to(torch.float32)[:, None]  # keys; queries
        out = probs.clone()
        for _, tgt in MasaCtrl.PAIRS:
            if ctx.rows.get(tgt):
                ts = ctx.slice(tgt)
                out[ts] = mix(q[ts].float(), k[ts].float(), m_src, m_tgt).to(probs.dtype)
        return out

    def hooks(self, modules):
        """{name: fn}: keep each edited layer's q and k, mix at its probs; keep the 16 x 16 cross maps."""
        unet, hooks = self.sd.unet, {}
        for module in modules:
            qk = {}
            for point in ("q", "k"):
                def keep(x, hook, qk=qk, point=point):
                    qk[point] = x
                hooks.update({n: keep for n in select(unet, {"module": module, "point": point})})
            hooks.update({n: (lambda p, hook, qk=qk: self.masked(p, hook, qk))
                          for n in select(unet, {"module": module, "point": "probs"})})
        hooks.update({n: self.keep_cross for n in unet.hook_names(kind="cross_attention", point="probs")})
        return hooks


# For a demo panel on sdlens-tiny: a position edit with no colour word in the target (tests/test_masactrl.py
# measures the claim over 10 such pairs). `demo(sd)` -> PIL [source, MasaCtrl edit, plain target run].
DEMO = dict(source_prompt="a big blue triangle in the center", target_prompt="a big triangle on the right", seed=102)


def demo(sd, steps=50, **kw):
    d = {**DEMO, **kw}
    # the official start_step 4 (of 50); a demo of fewer steps than that starts at its last step
    res = MasaCtrl(sd, d["source_prompt"], d["target_prompt"], steps=steps, start_step=min(4, steps)).run(
        seed=d["seed"], progress=False)
    g = torch.randn((1, sd.unet.cfg.in_channels) + tuple(res.latents.shape[-2:]),
                    generator=torch.Generator().manual_seed(d["seed"]))
    plain = sd.generate(d["target_prompt"], latents=g, steps=steps, progress=False)[0]
    return res.pil() + [plain]


def mix(q, k, m_src, m_tgt):
    """Official mask-guided attention probabilities for target queries q [r, h, nq, d] against source
    keys k [r, h, nk, d]: softmax over the source's foreground keys (m_src True) for queries where
    m_tgt is 1, over its background keys elsewhere (masactrl.py:241-257, :324-328, as probabilities)."""
    sim = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    low = torch.finfo(sim.dtype).min
    fg = (sim + torch.where(m_src, 1.0, low)).softmax(-1)  # the official biases: mask.masked_fill(mask == 0, min)
    bg = (sim + torch.where(m_src, low, 0.0)).softmax(-1)  # and mask.masked_fill(mask == 1, min)
    return fg * m_tgt + bg * (1 - m_tgt)
