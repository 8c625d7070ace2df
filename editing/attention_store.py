"""Record attention probabilities by place and resolution, averaged over sampling steps.

Built on the public hook API: it hooks the `hook_probs` of the attention layers whose maps have
at most `max_size`^2 queries (official P2P `AttentionStore`: 32^2), so the large self-attention
maps are never materialised, and keeps the rows that `hook.ctx.rows["cond"]` names. Each map is
averaged over the calls that recorded it: the sampling steps. Attach it
after an editor's hooks to record the edited maps, as the official store does.

`default_map_size` is the map size that Prompt-to-Prompt and `attention_maps` read by default:
16 x 16 for SD (the official code's absolute size), 1/32 of the image for SDXL (RoyiRa's port).
"""
import math
from typing import Tuple, Union

import torch

KINDS = ("cross_attention", "self_attention")
OFFICIAL_SIDE = 16  # google/prompt-to-prompt: LocalBlend's and the notebooks' 16 x 16 maps, self-attention <= 16^2
Size = Union[int, Tuple[int, int]]  # a side (a square map) or a map's (h, w)


def default_map_size(sd, image_hw) -> Tuple[int, int]:
    """The attention-map (h, w) that P2P's store, self-attention replacement and local blend use for
    `image_hw` = (height, width) in pixels.

    SDXL: RoyiRa/prompt-to-prompt-with-sdxl's `attn_res = (ceil(width / 32), ceil(height / 32))`,
    the maps of the UNet's deepest level (1/8 VAE x 1/4), 32 x 32 at 1024^2. We give it as (h, w):
    their LocalBlend reshapes the row-major queries to (attn_res[0], attn_res[1]) = (w, h), which
    is the same for the square images they run and scrambles a non-square one. Every other model:
    the official code's absolute 16 x 16 (1/32 of SD 1's 512^2, but 16 at any size, as there)."""
    if sd.is_sdxl:
        return math.ceil(image_hw[0] / 32), math.ceil(image_hw[1] / 32)
    return OFFICIAL_SIDE, OFFICIAL_SIDE


def object_map_size(sd, latent_hw) -> Tuple[int, int]:
    """(h, w) of the cross-attention maps that localise objects, for latents of `latent_hw`: those of the
    deepest level with cross-attention in both the encoder and the decoder. That is the papers' choice
    on every public model (SD at 512²: 16 x 16, P2P's notebooks and Attend-and-Excite; SDXL at 1024²:
    32 x 32, RoyiRa's attn_res = 1/32 of the image) and, on sdlens-tiny, its 8 x 8 level: tiny's 16 x 16
    layers attend almost uniformly ("circle" puts 46-50% of its mass on the left half of "a big red
    circle on the left", 52-99% at the 8 x 8 ones). `attention_maps`, the CLI's attention pictures and
    Attend-and-Excite read these by default."""
    unet = sd.unet
    levels = [{unet.hook_info(n).level for n in unet.hook_names(kind="cross_attention", point="probs", place=p)}
              for p in ("down", "up")]
    both = levels[0] & levels[1]
    if not both:
        raise ValueError("this UNet has no level with cross-attention in both its encoder and decoder; pass the map size")
    deepest = max(both)
    name = next(n for n in unet.hook_names(kind="cross_attention", point="probs") if unet.hook_info(n).level == deepest)
    return unet.hook_info(name).map_size(latent_hw)


def as_hw(size: Size) -> Tuple[int, int]:
    """A side s -> (s, s); an (h, w) pair unchanged."""
    return (size, size) if isinstance(size, int) else tuple(size)


class AttentionStore:
    def __init__(self, unet, latent_hw, max_size: Size = 32, cross=True, self_attn=True):
        """`latent_hw`: the latent's (h, w), which fixes every layer's map size. `max_size`: a side s
        (keep maps of at most s^2 queries) or a map's (h, w) (at most h w queries)."""
        self.unet, self.latent_hw = unet, tuple(latent_hw)
        self.max_size = max_size
        mh, mw = as_hw(max_size)
        kinds = (["cross_attention"] if cross else []) + (["self_attention"] if self_attn else [])
        self.sizes = {}
        for kind in kinds:
            for n in unet.hook_names(kind=kind, point="probs"):
                f = unet.hook_info(n).downscale
                hw = (math.ceil(self.latent_hw[0] / f), math.ceil(self.latent_hw[1] / f))
                if hw[0] * hw[1] <= mh * mw:
                    self.sizes[n] = hw
        self.sums, self.counts = {}, {}

    def hook(self, probs, hook):
        # Tensor sums and counts, rows by slice: nothing here waits for the GPU, copies from the host
        # or branches on the step, so a compiled UNet keeps one graph with the store attached.
        rows = slice(None)
        if hook.ctx is not None:
            if "cond" not in hook.ctx.rows:  # an unconditional-only pass (low-memory mode): nothing to keep
                return None
            rows = hook.ctx.slice("cond")
        p = probs[rows].detach().float().mean(1)  # mean over heads
        if hook.name in self.sums:
            self.sums[hook.name].add_(p)
            self.counts[hook.name].add_(1)
        else:
            self.sums[hook.name], self.counts[hook.name] = p, torch.ones((), device=p.device)
        return None

    def allocate(self, rows: int, keys: int, device):
        """Zero sums for `rows` conditional rows and `keys` text tokens, made before the first UNet call.
        A compiled UNet then traces the store once: sums created at the first call changed the store's
        dict, so the second call traced a second graph (twice the compile time of a P2P edit)."""
        for n, (h, w) in self.sizes.items():
            k = keys if self.unet.hook_info(n).kind == "cross_attention" else h * w
            self.sums[n] = torch.zeros(rows, h * w, k, device=device)
            self.counts[n] = torch.zeros((), device=device)

    def hooks(self):
        """{name: fn} to pass to `unet.hooks(...)`, alone or after an editor's hooks."""
        return {n: self.hook for n in self.sizes}

    def largest(self, limit=None) -> int:
        """The largest recorded square map side that is at most `limit` (None: what the store keeps,
        `max_size`; P2P's store keeps the maps it reads, 16 x 16 on SD)."""
        limit = math.isqrt(math.prod(as_hw(self.max_size))) if limit is None else limit
        sides = [h for h, w in self.sizes.values() if h == w and h <= limit]
        if not sides:
            raise ValueError(f"no square attention maps of at most {limit}x{limit} were recorded "
                             f"(sizes: {sorted(set(self.sizes.values()))})")
        return max(sides)

    def aggregate(self, size: Size = 16, places=("down", "mid", "up"), kind="cross_attention"):
        """Maps averaged over steps, heads and the matching layers: [rows, h, w, keys], for `size` a
        side (h = w = size) or an (h, w) pair (non-square images).

        `kind`: "cross_attention" or "self_attention"; `places`: of "down", "mid", "up"."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
        h, w = as_hw(size)
        info = self.unet.hook_info
        maps = [self.sums[n] / self.counts[n] for n in self.sizes
                if n in self.sums and self.sizes[n] == (h, w) and info(n).place in places and info(n).kind == kind]
        if not maps:
            raise ValueError(f"no {kind} maps of {h}x{w} were recorded (sizes: {sorted(set(self.sizes.values()))})")
        m = torch.stack(maps).mean(0)
        return m.reshape(m.shape[0], h, w, m.shape[-1])
