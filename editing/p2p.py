"""Prompt-to-Prompt (Hertz et al., ICLR 2023): edit an image by editing its cross-attention.

The source prompt and the target prompt(s) are sampled together from the same noise. While they
run, the target's attention probabilities are taken from the source's:

- replace (word swap): target cross-attention := source's, per word for a chosen step range;
- refine (added words): aligned tokens take the source map, new tokens keep their own;
- re-weight: scale chosen words' cross-attention columns (any mode, negative values too);
- self-attention at small maps (<= 16x16 by default) := source's for the first steps;
- local blend: outside a mask from chosen words' maps, the target latent follows the source.

SDXL follows RoyiRa/prompt-to-prompt-with-sdxl (the port users cite): the 16 x 16 above becomes its
`attn_res`, 1/32 of the image (32 x 32 at 1024^2: the deepest level, all its down, mid and up
layers, every transformer block), for the store, the self-attention limit and local blend
(`attention_store.default_map_size`); words are found with the CLIP-L tokenizer, as theirs are,
and only the conditional rows are edited, as everywhere here.

Defaults follow the official notebooks (google/prompt-to-prompt `prompt-to-prompt_stable.ipynb`,
`null_text_w_ptp.ipynb`): 50 steps, guidance 7.5, cross_replace_steps 0.8, self_replace_steps 0.4
(0.2 in some examples), blend threshold 0.3, start_blend 0.2. Where the official code has a rule,
ours follows it, and `shared/oracles/p2p` checks it image for image on sdlens-tiny:
- cross-attention schedules have N + 1 rows and replace `int(f (N + 1))` of them (ptp_utils
  `get_time_words_attention_alpha`); self-attention replaces `int(f N)` steps of maps with at most
  16 x 16 queries (`replace_self_attention`);
- word swaps use the official replacement mapper (words may differ in token count), refinement
  the official alignment (`seq_aligner.get_mapper`);
- the attention store records the maps *after* the edit, as the official store does (it keeps the
  very tensor the edit then overwrites in place), so local blend reads the edited target maps.
Everything runs through the public hook API and `hook_info`; the sampler's `StepContext.rows` says
which batch rows are the source and the targets, and only their conditional rows are edited.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

import math

from ..checks import model, string, whole
from ..schedulers import sample
from .attention_store import AttentionStore, Size, as_hw, default_map_size
from .batch import batch_denoiser, check_guidance, follow_inversion, start_noise
from .patch import Patch, apply, blend
from ..inversion import Inversion
from ..visualize import SavesImages
from .words import WordNotInPrompt, refine_mapper, replace_mapper, token_ids, word_positions

MODES = ("replace", "refine", "reweight")
Steps = Union[float, Tuple[float, float], Dict[str, Union[float, Tuple[float, float]]]]


def fraction_range(v, name):
    """A fraction f (meaning (0, f)) or a pair (start, end) of fractions of the steps -> (start, end)."""
    pair = (0.0, v) if isinstance(v, (int, float)) else v
    try:
        lo, hi = (float(x) for x in pair)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a fraction or a (start, end) pair of fractions, not {v!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):  # also false for NaN
        raise ValueError(f"{name} {v!r} must be fractions of the steps with 0 <= start <= end <= 1")
    return lo, hi


def _rows(v, n, name):
    lo, hi = fraction_range(v, name)
    return int(lo * n), int(hi * n)


def cross_alphas(tokenizer, targets, cross_steps: Steps, steps, length=77):
    """[steps + 1, n_targets, length]: 1 where a target token takes the source's cross-attention
    at that step (row i is used at step i; the last row never is).

    As the official `get_time_words_attention_alpha`: N + 1 rows, of which `int(f (N + 1))` are
    replaced, so f = 0.85 at 50 steps replaces 43 steps, not 42. A dict gives ranges per word of
    the target prompts, with "default_" for the rest; a word must be in at least one target."""
    spec = dict(cross_steps) if isinstance(cross_steps, dict) else {"default_": cross_steps}
    rows = steps + 1
    alphas = torch.zeros(rows, len(targets), length)
    lo, hi = _rows(spec.get("default_", 1.0), rows, "cross_replace_steps")
    alphas[lo:hi] = 1.0
    for word, v in spec.items():
        if word == "default_":
            continue
        lo, hi = _rows(v, rows, f"cross_replace_steps[{word!r}]")
        found = 0
        for i, prompt in enumerate(targets):
            try:
                pos = word_positions(tokenizer, prompt, word, length)
            except WordNotInPrompt:  # a word of another target: fine, it must be in at least one
                continue
            found += 1
            alphas[:, i, pos] = 0.0
            alphas[lo:hi, i, pos] = 1.0
        if not found:
            raise ValueError(f"cross_replace_steps names {word!r}, which is in no target prompt {targets}")
    return alphas


def equalizer(tokenizer, targets, weights: Dict[str, float], length=77):
    """[n_targets, length]: 1 everywhere but the chosen words' columns (official `get_equalizer`)."""
    eq = torch.ones(len(targets), length)
    for word, w in weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"equalize[{word!r}] = {w!r}; word weights must be finite numbers")
        for i, prompt in enumerate(targets):
            eq[i, word_positions(tokenizer, prompt, word, length)] = w
    return eq


@dataclass
class LocalBlend:
    """Words whose attention marks the region that may change; `words[i]` for prompt i (source first).

    As the official `LocalBlend` of `null_text_w_ptp.ipynb`: the mask is the mean of the 16 x 16
    cross-attention maps (SDXL: RoyiRa's attn_res maps, `default_map_size`), summed over the chosen
    words, max-pooled 3 x 3, resized to the latent,
    divided by its maximum and cut at `threshold`; the union of the source's and each target's.
    `substruct_words` mark a region that must not change: their mask skips the pooling and is cut
    at the second threshold when `threshold` is a pair (official `th=(.3, .3)`). Blending starts
    at step `int(start_blend N)` (the stable notebook's LocalBlend, and RoyiRa's SDXL one, blend
    from step 0: start_blend=0)."""
    words: Sequence[Sequence[str]]
    threshold: Union[float, Tuple[float, float]] = 0.3
    substruct_words: Optional[Sequence[Sequence[str]]] = None
    start_blend: float = 0.2

    def thresholds(self):
        th = (self.threshold, self.threshold) if isinstance(self.threshold, (int, float)) else tuple(self.threshold)
        if len(th) != 2 or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in th):
            raise ValueError(f"LocalBlend threshold {self.threshold!r} must be a fraction in [0, 1] or a pair of them")
        return th

    def weights(self, tokenizer, prompts, words, length=77):
        if len(words) != len(prompts):
            raise ValueError(f"LocalBlend needs one word list per prompt (source first): {len(prompts)} prompts, "
                             f"{len(words)} lists")
        w = torch.zeros(len(prompts), length)
        for i, (prompt, ws) in enumerate(zip(prompts, words)):
            for word in ([ws] if isinstance(ws, str) else ws):
                w[i, word_positions(tokenizer, prompt, word, length)] = 1.0
        return w

    def mask(self, maps, weight, latent_hw, threshold, pool=True):
        """maps [n, 16, 16, 77] (any map size) -> boolean mask [n, 1, h, w] (official LocalBlend.get_mask)."""
        m = (maps * weight[:, None, None, :]).sum(-1)[:, None]
        if pool:
            m = F.max_pool2d(m, 3, 1, padding=1)
        m = F.interpolate(m, size=latent_hw)
        m = m / m.flatten(1).max(-1).values.clamp_min(1e-12)[:, None, None, None]
        return m > threshold


@dataclass
class EditResult(SavesImages):
    """`.pil()`: the images as PIL; `.save(folder)`: source.png, target_1.png, ... (all or none)."""
    images: torch.Tensor  # [n, 3, H, W] in [0,1]: the source first, then the targets
    latents: torch.Tensor  # [n, C, h, w] final latents
    store: AttentionStore  # attention of the conditional rows after the edit, averaged over steps
    mask: Optional[torch.Tensor] = None  # the last local-blend mask [n-1, 1, h, w], if any

    def image_names(self, n):
        return ["source.png"] + [f"target_{i}.png" for i in range(1, n)]


class PromptToPrompt:
    def __init__(self, sd, source: str, targets: List[str], mode="replace", cross_replace_steps: Steps = 0.8,
                 self_replace_steps: Union[float, Tuple[float, float]] = 0.4, self_max_size: Optional[Size] = None,
                 equalize: Optional[Dict[str, float]] = None, blend: Optional[LocalBlend] = None, steps=50):
        """`targets`: edited prompts. `mode`: replace (word swap: the same number of words), refine
        (added or removed words) or reweight (the same prompt, re-weighted by `equalize`, which any
        mode takes too). `cross_replace_steps`: a fraction of the steps, a (start, end) pair, or a
        dict of them per word with "default_". `self_replace_steps`: a fraction or a pair, for maps
        of at most `self_max_size`^2 queries (a side, or an (h, w) pair: h w queries; None: the
        model's `default_map_size`, 16 on SD as the official code, 1/32 of the image on SDXL)."""
        model("sd", sd)
        string("source", source)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
            raise TypeError(f"targets must be a list of prompts (empty: reconstruct the source), not {targets!r}")
        for i, t in enumerate(targets):
            string(f"targets[{i}]", t)
        if mode == "reweight" and not equalize:
            raise ValueError("mode 'reweight' needs word weights, e.g. equalize={'car': 2.0}")
        whole("steps", steps, 1, sd.scheduler.num_train_timesteps)
        tok, n = sd.tokenizer, sd.text_encoder.cfg.max_positions
        self.sd, self.source, self.targets, self.mode, self.steps = sd, source, list(targets), mode, steps
        self.mapper = self.map_alphas = self.swap = None
        if mode == "refine":  # aligned tokens take the source map, new tokens keep their own
            pairs = [refine_mapper(tok, source, t, n) for t in self.targets]
            self.mapper = torch.stack([p[0] for p in pairs])
            self.map_alphas = torch.stack([p[1] for p in pairs])
        elif mode == "reweight":
            src_len = len(token_ids(tok, source))
            for t in self.targets:
                if len(token_ids(tok, t)) != src_len:
                    raise ValueError(f"mode 'reweight' needs prompts of the same token count: {source!r} has "
                                     f"{src_len}, {t!r} has {len(token_ids(tok, t))}; use 'replace' or 'refine'")
        else:  # official AttentionReplace: a [77, 77] mapper; the identity (same tokens) skips the product
            maps = torch.stack([replace_mapper(tok, source, t, n) for t in self.targets]) if self.targets else None
            self.swap = None if maps is None or torch.equal(maps, torch.eye(n).expand_as(maps)) else maps
        self.cross = cross_alphas(tok, self.targets, cross_replace_steps, steps, n)
        self.self_range = _rows(self_replace_steps, steps, "self_replace_steps")
        self.self_max_size = self_max_size
        self.eq = equalizer(tok, self.targets, equalize) if equalize else None
        self.blend = blend
        if blend is not None:
            prompts = [source] + self.targets
            self.blend_th = blend.thresholds()
            fraction_range(blend.start_blend, "LocalBlend start_blend")
            self.blend_w = blend.weights(tok, prompts, blend.words)
            self.sub_w = blend.weights(tok, prompts, blend.substruct_words) if blend.substruct_words else None

    # ---- the edit, as patches ----
    # Cross-attention: a blend per step and per token (the official `repl * alpha + own * (1 - alpha)`,
    # 0/1 weights give exactly one or the other), of a map remapped from the source's (refine's
    # alignment, a word swap's mapper, re-weighting); past every word's range the target keeps its
    # own maps (official: re-weighting too). Self-attention: a copy on the first steps, at the maps of
    # at most `self_max_size`^2 queries.
    def patches(self, latent_hw) -> List[Patch]:
        """The edit for a latent of `latent_hw` (which fixes each layer's map size), as patches."""
        sd = self.sd
        mv = lambda x: None if x is None else x.to(sd.device)
        mapper, swap = mv(self.mapper), mv(self.swap)
        map_alphas = None if self.map_alphas is None else mv(self.map_alphas)[:, None, None, :]
        eq = None if self.eq is None else mv(self.eq)[:, None, None, :]

        def cross(base, own, a):  # base [1, h, q, k] (the source), own [T, h, q, k]
            dt = own.dtype
            if mapper is not None:  # refine (official: attn_base[:, :, mapper].permute(2, 0, 1, 3))
                repl = blend(base[0][..., mapper].permute(2, 0, 1, 3), own, map_alphas)
            elif swap is not None:  # a swap of words with different token counts
                repl = torch.einsum("hqw,twn->thqn", base[0], swap.to(dt))
            else:  # the token positions match one to one
                repl = base.expand_as(own)
            return blend(repl if eq is None else repl * eq.to(dt), own, a)

        size = self.self_max_size
        if size is None:
            size = default_map_size(sd, (latent_hw[0] * sd.latent_factor, latent_hw[1] * sd.latent_factor))
        mh, mw = as_hw(size)
        lo, hi = self.self_range
        steps = torch.arange(self.steps)
        small_self = lambda i: (i.kind == "self_attention" and i.point == "probs"
                                and math.prod(i.map_size(latent_hw)) <= mh * mw)
        return [Patch(at=dict(kind="cross_attention", point="probs"), weight=self.cross[:, :, None, None, :],
                      op=cross, read="source", write="target"),
                Patch(at=small_self, weight=(lo <= steps) & (steps < hi), op="copy", read="source", write="target")]

    # ---- sampling ----
    @torch.no_grad()
    def run(self, guidance_scale=7.5, seed=None, latents=None, inversion: Optional[Inversion] = None,
            low_memory=False, store_size: Optional[Size] = None, height=None, width=None, progress=True):
        """Sample the source and the targets together from the same noise -> EditResult.

        The noise is `inversion.latents[-1]` (a real image, from `invert_image` with this editor's
        source prompt and steps), else `latents` ([1 or n, C, h, w]), else drawn from `seed`
        (an int, or None for fresh noise) at `height` x `width` (multiples of 8; default the
        model's size). `guidance_scale`: w, any finite number (1 turns guidance off; official 7.5).
        `low_memory`: unconditional and conditional rows in two passes. `store_size`: the largest
        map side (or (h, w)) the attention store keeps; None: `default_map_size`, what local blend and
        the pictures read, 16 on SD (the official store keeps up to 32, and recording SD's 32 x 32
        self-attention maps would take them off the fused attention path, for maps nothing reads) and
        RoyiRa's attn_res on SDXL (32 x 32 at 1024^2, where their store's constant 32^2 is the same).
        `progress`: a tqdm bar on stderr."""
        sd, steps = self.sd, self.steps
        prompts = [self.source] + self.targets
        n = len(prompts)
        check_guidance(guidance_scale)
        x = start_noise(sd, n, steps=steps, seed=seed, latents=latents, inversion=inversion, height=height, width=width)
        hw = tuple(x.shape[-2:])
        map_hw = default_map_size(sd, sd.image_size(x))  # what local blend reads
        store = AttentionStore(sd.unet, hw, max_size=map_hw if store_size is None else store_size)
        store.allocate(n, sd.text_encoder.cfg.max_positions, sd.device)
        if self.blend is not None and map_hw not in store.sizes.values():
            why = "RoyiRa's SDXL LocalBlend: 1/32 of the image" if sd.is_sdxl else "official LocalBlend"
            fix = f"store_size={store_size!r} must keep them" if store_size is not None else \
                "use a square image of the model's size"
            raise ValueError(f"local blend needs {map_hw[0]}x{map_hw[1]} cross-attention maps ({why}), and the store "
                             f"keeps {sorted(set(store.sizes.values()))} of a {hw[0]}x{hw[1]} latent; {fix}")
        denoise = batch_denoiser(sd, prompts, steps, guidance_scale, inversion, low_memory, sd.image_size(x))

        start_blend = int(self.blend.start_blend * steps) if self.blend is not None else steps
        last_mask = []
        if self.blend is not None:  # on the device once, not at every step
            blend_w = self.blend_w.to(sd.device)
            sub_w = None if self.sub_w is None else self.sub_w.to(sd.device)

        def callback(step, t, xt):
            xt = follow_inversion(inversion, step, xt)
            if self.blend is not None and step >= start_blend and n > 1:
                maps = store.aggregate(map_hw)
                mask = self.blend.mask(maps, blend_w, hw, self.blend_th[0])
                mask = mask[:1] | mask[1:]  # union of the source's and each target's region
                if sub_w is not None:  # official: no pooling, the second threshold
                    sub = self.blend.mask(maps, sub_w, hw, self.blend_th[1], pool=False)
                    mask = mask & ~(sub[:1] | sub[1:])
                xt = xt.clone()
                xt[1:] = xt[:1] + mask.to(xt.dtype) * (xt[1:] - xt[:1])
                last_mask[:] = [mask]
            return xt

        # The store is attached after the edit, so it records the edited maps (official semantics).
        with apply(sd, self.patches(hw)), sd.unet.hooks(store.hooks()):
            x = sample(denoise, x, sd.scheduler, steps, callback=callback, progress=progress)
        return EditResult(sd.decode_latents(x), x, store, last_mask[0] if last_mask else None)
