"""The SD UNet (CompVis `ldm/modules/diffusionmodules/openaimodel.py`), written to be read.

Layout of the module tree, which is also the layout of the checkpoint keys:

    time_embed.{0,2}                     MLP on the sinusoidal timestep embedding
    input_blocks.0.0                     conv_in
    input_blocks.N.{0: ResBlock, 1: SpatialTransformer}  or  input_blocks.N.0.op (downsample)
    middle_block.{0: ResBlock, 1: SpatialTransformer, 2: ResBlock}
    output_blocks.N.{0: ResBlock, 1: SpatialTransformer, 1|2: Upsample}
    out.{0: GroupNorm, 2: conv}
    label_emb.0.{0,2}                    SDXL: MLP on the added conditioning (pooled text, sizes, crop)

SDXL's added conditioning travels inside the context, as one extra row after the text tokens
(`pack_added_cond`): every method that concatenates, slices or optimises contexts (P2P's batch,
null-text's unconditional embedding) then handles it with no code of its own, and cross-attention
still sees the 77 text tokens.
"""
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import kind, tensor, tensor_shape, whole
from ..hooks import HookedModule, HookInfo, HookPoint
from .attention import Attention, BasicTransformerBlock, SpatialTransformer
from .config import UNetConfig


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5), cos half first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pack_added_cond(tokens, pooled, time_ids, cfg: UNetConfig):
    """SDXL's context: text tokens [B, 77, D] plus one row [pooled text | 6 time ids | zeros].

    time_ids are (original height, width, crop top, left, target height, width) in pixels, as sgm's
    conditioner and diffusers' `add_time_ids` order them."""
    b, _, d = tokens.shape
    row = tokens.new_zeros(b, 1, d)
    row[:, 0, :cfg.pooled_dim] = pooled
    row[:, 0, cfg.pooled_dim:cfg.pooled_dim + 6] = time_ids.to(tokens)
    return torch.cat([tokens, row], dim=1)


def unpack_added_cond(context, cfg: UNetConfig):
    """The inverse of `pack_added_cond`: (tokens, pooled, time_ids)."""
    row = context[:, -1]
    return context[:, :-1], row[:, :cfg.pooled_dim], row[:, cfg.pooled_dim:cfg.pooled_dim + 6]


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


class Block(nn.Module):
    """One numbered entry of input/middle/output_blocks: layers `0`, `1`, ... (the checkpoint's
    numbering), each given what it needs, then `hook_out` on the block's output.

    A block also records where it is: `place` (down/mid/up), `index`, the resolution `level` of its
    layers and `out_level` of its output (one more after a Downsample, one less after an Upsample).
    """

    def __init__(self, layers, place, index, level):
        super().__init__()
        if place == "up":  # what the block concatenates: the decoder's features and the encoder's skip
            # (registered first, so hook_names lists them in the order the forward pass calls them)
            self.hook_backbone, self.hook_skip = HookPoint(), HookPoint()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.layers = list(layers)  # a plain list (the modules are registered above), for forward
        self.place, self.index, self.level = place, index, level
        self.out_level = level + any(isinstance(m, Downsample) for m in layers) - any(isinstance(m, Upsample) for m in layers)
        self.hook_out = HookPoint()

    def forward(self, x, emb, context, size=None):
        for layer in self.layers:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return self.hook_out(x)


KINDS = {ResBlock: "resblock", SpatialTransformer: "transformer", BasicTransformerBlock: "transformer_block",
         Block: "block"}


def locate_hooks(model) -> dict:
    """{hook name: HookInfo} from the module tree: each point's kind comes from the module that owns
    it, its place and level from the Block around it. Nothing is read from the names."""
    infos = {}

    def visit(module, path, block, sub=-1):
        block = module if isinstance(module, Block) else block
        for child_name, child in module.named_children():
            name = f"{path}.{child_name}" if path else child_name
            if not isinstance(child, HookPoint):  # a transformer block passes on its index in transformer_blocks
                visit(child, name, block, int(child_name) if isinstance(child, BasicTransformerBlock) else sub)
                continue
            if isinstance(module, Attention):
                kind = "cross_attention" if module.is_cross else "self_attention"
            elif isinstance(module, Block) and child_name in ("hook_backbone", "hook_skip"):
                kind = child_name[len("hook_"):]
            else:
                kind = KINDS.get(type(module), "model")
            if block is None:
                place, index, level = "", -1, 0
            else:
                level = block.out_level if module is block and child_name == "hook_out" else block.level
                place, index = block.place, block.index
            infos[name] = HookInfo(name=name, module=path, point=child_name[len("hook_"):], kind=kind,
                                   place=place, block=index, level=level, transformer_block=sub)

    visit(model, "", None)
    return infos


class UNetModel(HookedModule):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch, level):
            return SpatialTransformer(ch, cfg.num_heads[level], cfg.context_dim, cfg.use_linear_in_transformer,
                                      cfg.upcast_attention, groups, cfg.depth(level))
        if cfg.adm_in_channels:  # sgm: label_emb = Sequential(Sequential(linear, SiLU, linear))
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        block = lambda layers, place, level: Block(layers, place, len(blocks[place]), level)
        blocks = {"down": [], "up": []}
        blocks["down"].append(block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)], "down", 0))
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                blocks["down"].append(block(layers, "down", level))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                blocks["down"].append(block([Downsample(ch)], "down", level))
                skip_channels.append(ch)
        self.input_blocks = nn.ModuleList(blocks["down"])

        last = len(cfg.channel_mult) - 1
        self.middle_block = Block([ResBlock(ch, emb_dim, ch, groups), transformer(ch, last),
                                   ResBlock(ch, emb_dim, ch, groups)], "mid", 0, last)

        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                blocks["up"].append(block(layers, "up", level))
        self.output_blocks = nn.ModuleList(blocks["up"])

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.hook_out = HookPoint()
        self.setup_hooks(locate_hooks(self))

    def forward(self, x, t, context):
        """x: [B,C,h,w] latents, t: timestep(s), context: [B,77,D] text. Returns eps or v.

        The model boundary for precision: it computes (and its hooks see values) in the dtype of
        its parameters, takes latents and context of any float dtype, and returns the prediction
        in float32 (float64 for a float64 model). Samplers then keep their state in float32
        whatever the model's dtype: a DDIM step moves x by a few percent, which fp16 / bf16
        latents (11 / 8 bit mantissas) would partly round away at every step.

        This wrapper stays eager: it checks the input and turns a Python timestep into a tensor
        before `core` (the part `compile()` compiles) sees it. A compiled function guards on the
        value of every Python int it is given, so an int t would build a new graph at each step.
        The checks are of types and shapes only (no read of the data, which would wait for a GPU at
        every step): a wrong input is a ValueError naming it, not an error from inside conv2d or attention.
        """
        c = self.cfg.in_channels
        tensor_shape("x", x, (None, c, None, None), f"[B, {c}, h, w] latents")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating-point latents, not {x.dtype}")
        tensor("context", context, "a [B, tokens, D] tensor of text embeddings (sd.encode_prompt)")
        if context.ndim != 3 or context.shape[-1] != self.cfg.context_dim:  # else a matmul error deep inside
            extra = " plus SDXL's added-conditioning row (sd.encode_prompt makes it)" if self.cfg.adm_in_channels else ""
            raise ValueError(f"context must be [B, tokens, {self.cfg.context_dim}] text embeddings{extra}, "
                             f"got shape {tuple(context.shape)}")
        b = x.shape[0]
        if context.shape[0] != b:
            raise ValueError(f"x has shape {tuple(x.shape)} and context {tuple(context.shape)}: one context row per "
                             f"latent, so context must be [{b}, tokens, {self.cfg.context_dim}]")
        if isinstance(t, torch.Tensor):
            if t.numel() not in (1, b):
                raise ValueError(f"t must be one timestep or one per latent (1 or {b} values for x of shape "
                                 f"{tuple(x.shape)}), got shape {tuple(t.shape)}")
            t = t.to(x.device).reshape(-1).expand(b)
        elif isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"t must be a timestep, a number or a tensor of 1 or B of them, not {kind(t)}")
        else:  # a fill kernel: torch.tensor(t, device=...) would copy from the host and wait for the GPU
            t = torch.full((x.shape[0],), t, device=x.device)
        return self.core(x, t, context) if self._compiled is None else self._compiled(self, x, t, context)

    _compiled = None

    def compile(self, **kwargs):
        """Compile `core` with `torch.compile(**kwargs)`; returns the model. One graph serves every
        step (timesteps arrive as tensors). Hooks compile into it: attaching or detaching one makes
        torch build (or reuse) the graph for the new set, never a stale one. A hook that branches
        on Python values that change per call (`hook.ctx.step`) gets a graph per value until torch's
        recompile limit (8), then runs eagerly: results stay right, only slower. Read per-step
        tensors with `hook.ctx.at_step(table)` instead, as the editing methods do. `compile(backend=None)`
        undoes it. (This replaces `nn.Module.compile`, which would compile the eager `forward` too.)
        The unbound `UNetModel.core` is compiled, so a deep copy of the model runs its own weights."""
        if kwargs.get("backend", "inductor") is None:
            self._compiled = None
        else:
            self._compiled = torch.compile(UNetModel.core, **kwargs)
        return self

    def core(self, x, t, context):
        """The network: t is a [B] tensor. Called by `forward`."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        if self.cfg.adm_in_channels:  # SDXL: emb += MLP([pooled text, embedded sizes and crop])
            context, pooled, time_ids = unpack_added_cond(context, self.cfg)
            # the sizes are embedded from float32: in bf16, 1000 would already be 1000 but 1001 not
            # detached: they are sizes, not something null-text inversion may optimise with the row
            ids = timestep_embedding(time_ids.detach().float().reshape(-1), self.cfg.time_id_dim).reshape(len(x), -1)
            emb = emb + self.label_emb(torch.cat([pooled.to(dtype), ids.to(dtype)], dim=1))
        x, context = x.to(dtype), context.to(dtype)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([block.hook_backbone(h), block.hook_skip(skips.pop())], dim=1)
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.hook_out(self.out(h)).to(torch.promote_types(dtype, torch.float32))

    def hook_shapes(self, height: int, width: int, batch: int = 1) -> dict:
        """{hook name: shape} for a [batch, C, height, width] latent, from a forward on the meta device
        (shapes only: no memory, no arithmetic, a fraction of a second even for SD's UNet)."""
        for n, v in (("height", height), ("width", width), ("batch", batch)):
            whole(n, v, 1, hint=" (latent pixels)")
        with torch.device("meta"):
            twin = UNetModel(self.cfg)
            x = torch.zeros(batch, self.cfg.in_channels, height, width)
            context = torch.zeros(batch, 77 + bool(self.cfg.adm_in_channels), self.cfg.context_dim)
        with twin.record(lambda n: True) as store:  # hook_probs too: on meta it costs nothing
            twin(x, 1, context)
        return {n: tuple(v[0].shape) for n, v in store.items()}

    def describe(self, height: int, width: int) -> str:
        """A table of every hook point for a `height` x `width` LATENT (the image's size divided by
        `sd.latent_factor`): name, kind, place, block, the side of its feature map and its shape at
        batch 1. `print(sd.unet.describe(64, 64))` for SD at 512x512; `python -m sdlens hooks`."""
        shapes = self.hook_shapes(height, width)
        infos = {n: self.hook_info(n) for n in shapes}
        # The map at a level is the shape of its spatial points; attention points live at that level.
        maps = {i.level: shapes[n][-2:] for n, i in infos.items() if len(shapes[n]) == 4 and "attention" not in i.kind}
        rows = [("hook point", "kind", "place", "block", "map", "shape")]
        for n, i in infos.items():
            h, w = maps[i.level]
            rows.append((n, i.kind, i.place or "-", str(i.block), f"{h}x{w}", str(list(shapes[n]))))
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
