"""Record attention probabilities by place and resolution, averaged over sampling steps.

Built on the public hook API: it hooks `attn1/attn2.hook_probs` of the layers whose maps are at
most `max_size` x `max_size` (official P2P: 32x32), so the large self-attention maps are never
materialised, and keeps the rows that `hook.ctx.rows["cond"]` names.
"""
import torch


def place(name: str) -> str:
    """down / mid / up, from the checkpoint path (input_blocks / middle_block / output_blocks)."""
    return {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}.get(name.split(".")[0], "?")


class AttentionStore:
    def __init__(self, unet, latent_hw, max_size=32, cross=True, self_attn=True):
        """`latent_hw`: the latent's (h, w), which fixes every layer's map size."""
        self.unet, self.latent_hw = unet, tuple(latent_hw)
        kinds = (["attn2"] if cross else []) + (["attn1"] if self_attn else [])
        self.sizes = {}
        for n in unet.hook_names():
            if n.endswith("hook_probs") and n.split(".")[-2] in kinds:
                f = unet.downscale(n)
                hw = (-(-self.latent_hw[0] // f), -(-self.latent_hw[1] // f))
                if max(hw) <= max_size:
                    self.sizes[n] = hw
        self.sums = {}
        self.steps = set()

    def hook(self, probs, hook):
        rows = None
        if hook.ctx is not None:
            rows = hook.ctx.rows.get("cond")
            if rows is None:  # an unconditional-only pass (low-memory mode): nothing to keep
                return None
        p = (probs[rows] if rows is not None else probs).detach().float().mean(1)  # mean over heads
        if hook.name in self.sums:
            self.sums[hook.name].add_(p)
        else:
            self.sums[hook.name] = p
        if hook.ctx is not None:
            self.steps.add(hook.ctx.step)
        return None

    def hooks(self):
        """{name: fn} to pass to `unet.hooks(...)`, alone or merged with an editor's hooks."""
        return {n: self.hook for n in self.sizes}

    def largest(self, limit=16) -> int:
        """The largest recorded map side that is at most `limit` (the usual aggregation size)."""
        return max(s[0] for s in self.sizes.values() if s[0] <= limit)

    def aggregate(self, size=16, places=("down", "mid", "up"), kind="attn2"):
        """Maps averaged over steps, heads and the matching layers: [rows, size, size, keys]."""
        maps = [self.sums[n] / max(1, len(self.steps)) for n in self.sizes
                if n in self.sums and self.sizes[n] == (size, size) and place(n) in places and f".{kind}." in n]
        if not maps:
            raise ValueError(f"no {kind} maps of {size}x{size} were recorded (sizes: {sorted(set(self.sizes.values()))})")
        m = torch.stack(maps).mean(0)
        return m.reshape(m.shape[0], size, size, m.shape[-1])
