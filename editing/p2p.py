"""Prompt-to-Prompt (Hertz et al., ICLR 2023): edit an image by editing its cross-attention.

The source prompt and the target prompt(s) are sampled together from the same noise. While they
run, the target's attention probabilities are taken from the source's:

- replace (word swap): target cross-attention := source's, per word for a chosen step range;
- refine (added words): aligned tokens take the source map, new tokens keep their own;
- re-weight: scale chosen words' cross-attention columns (any mode, negative values too);
- self-attention at small maps (<= 16x16 by default) := source's for the first steps;
- local blend: outside a mask from chosen words' maps, the target latent follows the source.

Defaults follow the official notebooks: 50 steps, guidance 7.5, cross_replace_steps 0.8,
self_replace_steps 0.4 (0.2 in some examples), blend threshold 0.3, start_blend 0.2. Everything
runs through the public hook API; the sampler's `StepContext.rows` says which batch rows are the
source and the targets, and only their conditional rows are edited.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..hooks import StepContext
from ..schedulers import sample
from .attention_store import AttentionStore
from .inversion import Inversion
from .words import refine_mapper, token_ids, word_positions

MODES = ("replace", "refine", "reweight")
Steps = Union[float, Tuple[float, float], Dict[str, Union[float, Tuple[float, float]]]]


def _range(v, steps):
    lo, hi = (0.0, v) if isinstance(v, (int, float)) else v
    return int(lo * steps), int(hi * steps)


def cross_alphas(tokenizer, targets, cross_steps: Steps, steps, length=77):
    """[steps, n_targets, length]: 1 where a target token takes the source's cross-attention.

    A dict gives ranges per word of the target prompts, with "default_" for the rest (official
    `get_time_words_attention_alpha`)."""
    spec = cross_steps if isinstance(cross_steps, dict) else {"default_": cross_steps}
    alphas = torch.zeros(steps, len(targets), length)
    lo, hi = _range(spec.get("default_", 1.0), steps)
    alphas[lo:hi] = 1.0
    for word, v in spec.items():
        if word == "default_":
            continue
        lo, hi = _range(v, steps)
        for i, prompt in enumerate(targets):
            try:
                pos = word_positions(tokenizer, prompt, word)
            except ValueError:
                continue
            alphas[:, i, pos] = 0.0
            alphas[lo:hi, i, pos] = 1.0
    return alphas


def equalizer(tokenizer, targets, weights: Dict[str, float], length=77):
    """[n_targets, length]: 1 everywhere but the chosen words' columns (official `get_equalizer`)."""
    eq = torch.ones(len(targets), length)
    for i, prompt in enumerate(targets):
        for word, w in weights.items():
            eq[i, word_positions(tokenizer, prompt, word)] = w
    return eq


@dataclass
class LocalBlend:
    """Words whose attention marks the region that may change; `words[i]` for prompt i (source first)."""
    words: Sequence[Sequence[str]]
    threshold: float = 0.3
    substruct_words: Optional[Sequence[Sequence[str]]] = None
    start_blend: float = 0.2

    def weights(self, tokenizer, prompts, words, length=77):
        w = torch.zeros(len(prompts), length)
        for i, (prompt, ws) in enumerate(zip(prompts, words)):
            for word in ([ws] if isinstance(ws, str) else ws):
                w[i, word_positions(tokenizer, prompt, word)] = 1.0
        return w

    def mask(self, maps, weight, latent_hw):
        """maps [n, 16, 16, 77] -> boolean mask [n, 1, h, w] (official LocalBlend.get_mask)."""
        m = (maps * weight[:, None, None, :]).sum(-1)[:, None]
        m = F.max_pool2d(m, 3, 1, padding=1)
        m = F.interpolate(m, size=latent_hw)
        m = m / m.flatten(1).max(-1).values.clamp_min(1e-12)[:, None, None, None]
        return m > self.threshold


@dataclass
class EditResult:
    images: torch.Tensor  # [n, 3, H, W] in [0,1]: the source first, then the targets
    latents: torch.Tensor  # [n, C, h, w] final latents
    store: AttentionStore  # attention of the conditional rows, averaged over steps
    mask: Optional[torch.Tensor] = None  # the last local-blend mask [n-1, 1, h, w], if any


class PromptToPrompt:
    def __init__(self, sd, source: str, targets: List[str], mode="replace", cross_replace_steps: Steps = 0.8,
                 self_replace_steps: Union[float, Tuple[float, float]] = 0.4, self_max_size=16,
                 equalize: Optional[Dict[str, float]] = None, blend: Optional[LocalBlend] = None, steps=50):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        if mode == "reweight" and not equalize:
            raise ValueError("mode 'reweight' needs word weights, e.g. equalize={'car': 2.0}")
        tok, n = sd.tokenizer, sd.text_encoder.cfg.max_positions
        self.sd, self.source, self.targets, self.mode, self.steps = sd, source, list(targets), mode, steps
        if mode in ("replace", "reweight"):
            src_len = len(token_ids(tok, source))
            for t in self.targets:
                if len(token_ids(tok, t)) != src_len:
                    raise ValueError(f"word swap needs prompts of the same token count: {source!r} has {src_len}, "
                                     f"{t!r} has {len(token_ids(tok, t))}; use mode 'refine' to add or remove words")
            self.refine = False
        else:
            self.refine = True
            pairs = [refine_mapper(tok, source, t, n) for t in self.targets]
            self.mapper = torch.stack([p[0] for p in pairs]) if pairs else torch.zeros(0, n, dtype=torch.long)
            self.map_alphas = torch.stack([p[1] for p in pairs]) if pairs else torch.zeros(0, n)
        self.cross = cross_alphas(tok, self.targets, cross_replace_steps, steps, n)
        self.self_range = _range(self_replace_steps, steps)
        self.self_max_size = self_max_size
        self.eq = equalizer(tok, self.targets, equalize) if equalize else None
        self.blend = blend
        if blend is not None:
            prompts = [source] + self.targets
            self.blend_w = blend.weights(tok, prompts, blend.words)
            self.sub_w = blend.weights(tok, prompts, blend.substruct_words) if blend.substruct_words else None

    # ---- the hooks ----
    def edit_cross(self, probs, hook):
        ctx = hook.ctx
        if ctx is None or not ctx.rows.get("target"):
            return None
        a = self.cross[ctx.step]
        if not a.any():  # past every word's range: the target keeps its own maps (official: re-weighting too)
            return None
        src, tgt = ctx.rows["source"][0], ctx.rows["target"]
        base, own = probs[src], probs[tgt]  # [h, q, k], [T, h, q, k]
        dev = probs.device
        if self.refine:  # aligned tokens take the source map, new tokens keep their own
            idx = self.mapper.to(dev)
            repl = torch.stack([base[..., idx[i]] for i in range(len(tgt))])
            a_map = self.map_alphas.to(dev, probs.dtype)[:, None, None, :]
            repl = repl * a_map + own * (1 - a_map)
        else:  # word swap: the token positions match one to one
            repl = base.expand_as(own)
        if self.eq is not None:
            repl = repl * self.eq.to(dev, probs.dtype)[:, None, None, :]
        out = probs.clone()
        if a.all():
            out[tgt] = repl
        else:
            a = a.to(dev, probs.dtype)[:, None, None, :]
            out[tgt] = repl * a + own * (1 - a)
        return out

    def edit_self(self, probs, hook):
        ctx = hook.ctx
        if ctx is None or not ctx.rows.get("target") or not self.self_range[0] <= ctx.step < self.self_range[1]:
            return None
        out = probs.clone()
        out[ctx.rows["target"]] = probs[ctx.rows["source"][0]]
        return out

    def hooks(self, latent_hw):
        unet = self.sd.unet
        hooks = {lambda n: n.endswith("attn2.hook_probs"): self.edit_cross}
        small = [n for n in unet.hook_names() if n.endswith("attn1.hook_probs")
                 and max(-(-s // unet.downscale(n)) for s in latent_hw) <= self.self_max_size]
        hooks.update({n: self.edit_self for n in small})
        return hooks

    # ---- sampling ----
    @torch.no_grad()
    def run(self, guidance_scale=7.5, seed=None, latents=None, inversion: Optional[Inversion] = None,
            low_memory=False, store_size=32, height=None, width=None, progress=False):
        """Sample the source and the targets together from the same noise -> EditResult."""
        sd, steps = self.sd, self.steps
        prompts = [self.source] + self.targets
        n = len(prompts)
        if inversion is not None:
            if inversion.steps != steps:
                raise ValueError(f"the inversion has {inversion.steps} steps, the edit {steps}; use the same number")
            x = inversion.latents[-1].expand(n, -1, -1, -1).clone()
        elif latents is not None:
            x = latents.expand(n, -1, -1, -1).clone() if latents.shape[0] == 1 else latents
        else:
            height, width = sd.check_size(height, width)
            f = sd.latent_factor
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            x = torch.randn((1, sd.unet.cfg.in_channels, height // f, width // f), generator=g).expand(n, -1, -1, -1).clone()
        x = x.to(sd.device, sd.latent_dtype)
        hw = tuple(x.shape[-2:])
        cond = sd.encode_prompt(prompts)
        empty = sd.encode_prompt([""] * n)
        store = AttentionStore(sd.unet, hw, max_size=store_size)
        if self.blend is not None and 16 not in {s[0] for s in store.sizes.values()}:
            raise ValueError("local blend needs 16x16 cross-attention maps; this image size has none")
        tgt = list(range(1, n))

        def uncond_at(step):
            if inversion is not None and inversion.uncond is not None:
                return inversion.uncond[step].expand(n, -1, -1)
            return empty

        def denoise(xt, t, step):
            u = uncond_at(step)
            ctx = lambda rows: StepContext(step=step, t=int(t), num_steps=steps, rows=rows)
            if guidance_scale == 1.0:
                sd.unet.ctx = ctx({"cond": list(range(n)), "source": [0], "target": tgt})
                return sd.unet(xt, t, cond)
            if low_memory:  # two passes of n rows instead of one of 2n
                sd.unet.ctx = ctx({"uncond": list(range(n))})
                eu = sd.unet(xt, t, u)
                sd.unet.ctx = ctx({"cond": list(range(n)), "source": [0], "target": tgt})
                ec = sd.unet(xt, t, cond)
            else:
                sd.unet.ctx = ctx({"uncond": list(range(n)), "cond": list(range(n, 2 * n)), "source": [n],
                                   "target": [n + i for i in tgt]})
                eu, ec = sd.unet(torch.cat([xt, xt]), t, torch.cat([u, cond])).chunk(2)
            return eu + guidance_scale * (ec - eu)

        start_blend = int(self.blend.start_blend * steps) if self.blend is not None else steps
        last_mask = []

        def callback(step, t, xt):
            if inversion is not None and inversion.direct:
                xt = xt.clone()
                xt[0] = inversion.source_latent_after(step)[0]  # = adding the per-step offset
            if self.blend is not None and step >= start_blend and n > 1:
                maps = store.aggregate(16)
                mask = self.blend.mask(maps, self.blend_w.to(maps.device), hw)
                mask = mask[:1] | mask[1:]  # union of the source's and each target's region
                if self.sub_w is not None:
                    sub = self.blend.mask(maps, self.sub_w.to(maps.device), hw)
                    mask = mask & ~(sub[:1] | sub[1:])
                xt = xt.clone()
                xt[1:] = xt[:1] + mask.to(xt.dtype) * (xt[1:] - xt[:1])
                last_mask[:] = [mask]
            return xt

        hooks = {**store.hooks()}
        edit_hooks = self.hooks(hw)
        try:
            with sd.unet.hooks(hooks), sd.unet.hooks(edit_hooks):
                x = sample(denoise, x, sd.scheduler, steps, callback=callback, progress=progress)
        finally:
            sd.unet.ctx = None
        return EditResult(sd.decode_latents(x), x, store, last_mask[0] if last_mask else None)
