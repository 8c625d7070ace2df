"""Record attention probabilities by place and resolution, averaged over sampling steps.

Built on the public hook API: it hooks the `hook_probs` of the attention layers whose maps have
at most `max_size`^2 queries (official P2P `AttentionStore`: 32^2), so the large self-attention
maps are never materialised, and keeps the rows that `hook.ctx.rows["cond"]` names. Each map is
averaged over the calls that recorded it: the sampling steps. Attach it
after an editor's hooks to record the edited maps, as the official store does.
"""
import math

import torch

KINDS = ("cross_attention", "self_attention")


class AttentionStore:
    def __init__(self, unet, latent_hw, max_size=32, cross=True, self_attn=True):
        """`latent_hw`: the latent's (h, w), which fixes every layer's map size."""
        self.unet, self.latent_hw = unet, tuple(latent_hw)
        kinds = (["cross_attention"] if cross else []) + (["self_attention"] if self_attn else [])
        self.sizes = {}
        for kind in kinds:
            for n in unet.hook_names(kind=kind, point="probs"):
                f = unet.hook_info(n).downscale
                hw = (math.ceil(self.latent_hw[0] / f), math.ceil(self.latent_hw[1] / f))
                if hw[0] * hw[1] <= max_size ** 2:
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

    def hooks(self):
        """{name: fn} to pass to `unet.hooks(...)`, alone or after an editor's hooks."""
        return {n: self.hook for n in self.sizes}

    def largest(self, limit=16) -> int:
        """The largest recorded square map side that is at most `limit` (the usual aggregation size)."""
        sides = [h for h, w in self.sizes.values() if h == w and h <= limit]
        if not sides:
            raise ValueError(f"no square attention maps of at most {limit}x{limit} were recorded "
                             f"(sizes: {sorted(set(self.sizes.values()))})")
        return max(sides)

    def aggregate(self, size=16, places=("down", "mid", "up"), kind="cross_attention"):
        """Maps averaged over steps, heads and the matching layers: [rows, size, size, keys].

        `kind`: "cross_attention" or "self_attention"; `places`: of "down", "mid", "up"."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
        info = self.unet.hook_info
        maps = [self.sums[n] / self.counts[n] for n in self.sizes
                if n in self.sums and self.sizes[n] == (size, size) and info(n).place in places and info(n).kind == kind]
        if not maps:
            raise ValueError(f"no {kind} maps of {size}x{size} were recorded (sizes: {sorted(set(self.sizes.values()))})")
        m = torch.stack(maps).mean(0)
        return m.reshape(m.shape[0], size, size, m.shape[-1])
