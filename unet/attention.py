"""Attention, the transformer block and the spatial transformer of the SD UNet.

Names follow CompVis `ldm/modules/attention.py` (`attn1` self-, `attn2` cross-attention,
`to_q/to_k/to_v/to_out.0`, `ff.net.0.proj`, `ff.net.2`), so checkpoints load without renaming.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import HookPoint, KeyValuePoint


class Attention(nn.Module):
    """Multi-head attention. Self-attention when `context` is None, cross-attention otherwise.

    The explicit `softmax(q k^T / sqrt(d)) v` is the reference path; it runs only when a hook is
    attached to `hook_probs`, because only then must the [batch, heads, queries, keys] matrix
    exist. Otherwise `F.scaled_dot_product_attention` computes the same thing without it.

    `upcast` (SD 2.x's `upcast_attention`; SD 2.1-v overflows fp16 in q k^T) runs the attention in
    float32 on both paths, so `hook_probs` then sees float32 probabilities and hooking it does
    not change the numerics. The result is cast back to the model's dtype before `to_out`.
    """

    def __init__(self, query_dim, context_dim=None, heads=8, head_dim=64, upcast=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale, self.upcast = heads, head_dim ** -0.5, upcast
        self.is_cross = context_dim is not None  # attn2 attends to the text, attn1 to the image itself
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_kv = KeyValuePoint()  # the one place a hook may add keys and values (StyleAligned)
        self.hook_probs, self.hook_out = HookPoint(), HookPoint()

    def forward(self, x, context=None):
        context = x if context is None else context
        # Plain reshapes, not einops: dynamo traces einops' pattern parsing at every call, which made
        # compiling the UNet 4-6x slower (85% of the traced bytecode on sdlens-tiny).
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # b n (h d) -> b h n d
        q = self.hook_q(split(self.to_q(x)))
        k = self.hook_k(split(self.to_k(context)))
        v = self.hook_v(split(self.to_v(context)))
        if self.hook_kv.fns:
            k, v = self.hook_kv(torch.stack([k, v])).unbind(0)
        dtype = v.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        if self.hook_probs.fns:
            scores = (q * self.scale) @ k.transpose(-1, -2)  # scaling q is cheaper than the scores
            out = self.hook_probs(scores.softmax(dim=-1)) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.hook_out(self.to_out(out.to(dtype).transpose(1, 2).flatten(2)))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives the value and the gate."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim, heads, head_dim, context_dim, upcast=False):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, head_dim, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.hook_out = HookPoint()  # the block's tokens [B, HW, C] (generic-diffusion-feature's "-vit-blockK-out")

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return self.hook_out(x + self.ff(self.norm3(x)))


class SpatialTransformer(nn.Module):
    """Image features [B,C,H,W] -> tokens [B,HW,C] -> transformer blocks -> back, plus a residual.

    SD 1/2 have one transformer block in each; SDXL has `depth` 2 or 10 (`transformer_blocks.0-9`).
    SD 1 projects in and out with 1x1 convolutions, SD 2 with Linear layers on the tokens (the
    same map, stored with a different weight shape).
    """

    def __init__(self, channels, heads, context_dim, linear=False, upcast=False, groups=32, depth=1):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim, upcast) for _ in range(depth)])
        self.proj_out = proj()
        self.hook_out = HookPoint()

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).unflatten(2, (h, w))  # b (h w) c -> b c h w
        if not self.linear:
            y = self.proj_out(y)
        return self.hook_out(x + y)
