"""The SD UNet (CompVis `ldm/modules/diffusionmodules/openaimodel.py`), written to be read.

Layout of the module tree, which is also the layout of the checkpoint keys:

    time_embed.{0,2}                     MLP on the sinusoidal timestep embedding
    input_blocks.0.0                     conv_in
    input_blocks.N.{0: ResBlock, 1: SpatialTransformer}  or  input_blocks.N.0.op (downsample)
    middle_block.{0: ResBlock, 1: SpatialTransformer, 2: ResBlock}
    output_blocks.N.{0: ResBlock, 1: SpatialTransformer, 1|2: Upsample}
    out.{0: GroupNorm, 2: conv}
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import HookedModule, HookPoint
from .attention import SpatialTransformer
from .config import UNetConfig


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5), cos half first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the timestep embedding, GroupNorm-SiLU-conv, plus a skip.

    `hook_h` sees the residual branch before the skip add: the feature Plug-and-Play injects.
    """

    def __init__(self, channels, emb_channels, out_channels, groups=32):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        self.hook_h, self.hook_out = HookPoint(), HookPoint()

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.hook_h(self.out_layers(h))
        return self.hook_out(self.skip_connection(x) + h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # `size` is the matching skip's size, so latents not divisible by 8 still line up.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Block(nn.ModuleList):
    """One numbered entry of input/middle/output_blocks: layers that each take what they need."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(HookedModule):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch, level):
            return SpatialTransformer(ch, cfg.num_heads[level], cfg.context_dim,
                                      cfg.use_linear_in_transformer, cfg.upcast_attention, groups)

        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)

        last = len(cfg.channel_mult) - 1
        self.middle_block = Block([ResBlock(ch, emb_dim, ch, groups), transformer(ch, last),
                                   ResBlock(ch, emb_dim, ch, groups)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.hook_out = HookPoint()
        self.setup_hooks()

    def downscale(self, name: str) -> int:
        """How many times smaller than the latent the feature map at hook `name` is (1, 2, 4, ...).

        Editing methods use it to pick layers by resolution before running anything, e.g. to keep
        the explicit attention path away from the 64x64 self-attention of a 512 image.
        """
        R, last = self.cfg.num_res_blocks, len(self.cfg.channel_mult) - 1
        parts = name.split(".")
        if parts[0] == "input_blocks":
            n = int(parts[1])
            level = 0 if n == 0 else (n - 1) // (R + 1) + ((n - 1) % (R + 1) == R)  # a downsample ends its level
        elif parts[0] == "middle_block":
            level = last
        elif parts[0] == "output_blocks":
            n = int(parts[1])
            level = last - n // (R + 1)  # hook points all sit before a block's upsampler
        else:
            level = 0
        return 2 ** level

    def forward(self, x, t, context):
        """x: [B,C,h,w] latents, t: timestep(s), context: [B,77,D] text. Returns eps or v."""
        if context.ndim != 3 or context.shape[-1] != self.cfg.context_dim:  # else a matmul error deep inside
            raise ValueError(f"context must be [B, tokens, {self.cfg.context_dim}] text embeddings, "
                             f"got shape {tuple(context.shape)}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        context = context.to(x.dtype)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.hook_out(self.out(h))
