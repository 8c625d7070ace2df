"""Edits as data: the patch layer every editing method is written on.

A hook-based diffusion paper mostly says "at these layers, on these steps, these batch rows take
(a function of) those rows' values". A `Patch` says exactly that, and nothing else:

    Patch(at={"kind": "self_attention", "point": {"k", "v"}},   # which hook points, by HookInfo field
          weight=torch.arange(50) >= 4,                         # per step: 0 = leave the value alone
          read="source", write="target",                        # row groups of StepContext.rows
          op="copy")                                            # copy | blend | scale | fn(src, dst, w)

`hooks(sd, patches)` compiles a list of patches into `{hook name: fn}` for `sd.unet.hooks(...)`
(or `with apply(sd, patches):`). What the compiled hooks keep, so that editing stays fast:
- the per-step weights are one table on the model's device, moved once, read with `ctx.at_step`
  (a compiled UNet keeps one graph for every step, and nothing waits for the device);
- row groups are slices, worked out once per UNet call (`StepContext.slice`);
- a step whose weights are all 0 leaves the value unchanged, so an eager run skips it with a Python
  decision (`ctx.eager_skip`) and a compiled one runs it with weight 0: no data-dependent branch;
- several patches on one point apply in the order of the list, each to what the previous one left.

Selection is by `HookInfo` fields, never by spelling: `at` maps field names to a value or a set of
values (`{"module": {"output_blocks.4.0"}, "point": "h"}`), or is a predicate on `HookInfo`.
Preparation is a pure function of the patches: no setup that only works in one order.

What does not fit as data stays a hook function beside its patches: Prompt-to-Prompt's local blend
(a mask made from the maps of the current step, applied to the latents after the step) and
mask-guided MasaCtrl (a softmax restricted by a mask made from cross-attention maps of the same
UNet call, a data-dependent product of two hooks' values).
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..hooks import HookInfo

Op = Union[str, Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]]


def copy(src, dst, w):
    """dst := src where the weight is not 0 (exact values, no arithmetic); w None (always on): src."""
    return src.expand_as(dst) if w is None else torch.where(w != 0, src, dst)


def blend(src, dst, w):
    """w src + (1 - w) dst, written as P2P's official `attn_replace * alpha + attn_base * (1 - alpha)`
    (so 0/1 weights give exactly one or the other); w None (always on) is weight 1: src."""
    if w is None:
        return src.expand_as(dst)
    w = w.to(dst.dtype)
    return src * w + dst * (1 - w)


def scale(src, dst, w):
    """dst * w where the weight is not 0 (`src` unused): re-weighting; w None is weight 1: dst."""
    return dst if w is None else torch.where(w != 0, dst * w.to(dst.dtype), dst)


OPS = {"copy": copy, "blend": blend, "scale": scale}


@dataclass(frozen=True)
class Patch:
    """One edit: at hook points `at`, on the steps where `weight` is not 0, the rows of group `write`
    become `op(src, dst, w)`, with dst their value, src the rows of group `read` (one row, broadcast,
    or as many as `write`; None: dst itself) and w = `weight[step]`.

    at: {HookInfo field: value or set of values} or a predicate on HookInfo.
    weight: [steps, ...] per-step weights that broadcast against dst ([rows, ...] of the point's
      value); None: always on, every call, with or without a step context (FreeU), and op gets w=None.
    read, write: names of groups in the sampler's `StepContext.rows`; write=None: every row. A patch
      applies to a UNet call only if the call's context names both groups (an unconditional-only
      pass, for one, has no "target").
    op: "copy", "blend", "scale" (see the functions of those names) or `fn(src, dst, w) -> new dst`.
      An op must return dst unchanged where w is 0: eager runs skip such steps.
    """
    at: Union[Mapping[str, Any], Callable[[HookInfo], bool]]
    weight: Optional[torch.Tensor] = None
    op: Op = "copy"
    read: Optional[str] = None
    write: Optional[str] = None

    def __post_init__(self):
        if not callable(self.at) and not isinstance(self.at, Mapping):
            raise TypeError(f"Patch at= must be a {{HookInfo field: value}} dict or a predicate, not {type(self.at).__name__}")
        if isinstance(self.at, Mapping):
            bad = [k for k in self.at if k not in HookInfo.__dataclass_fields__]
            if bad:
                raise ValueError(f"Patch at= names unknown HookInfo field {bad[0]!r}; fields: "
                                 f"{', '.join(HookInfo.__dataclass_fields__)}")
        if not callable(self.op) and self.op not in OPS:
            raise ValueError(f"Patch op={self.op!r} is unknown; use one of {', '.join(OPS)} or a function")
        if self.weight is not None and (not isinstance(self.weight, torch.Tensor) or self.weight.ndim < 1):
            raise TypeError("Patch weight= must be a [steps, ...] tensor of per-step weights, or None (always on)")

    def selects(self, info: HookInfo) -> bool:
        if callable(self.at):
            return bool(self.at(info))
        return all(getattr(info, k) in v if isinstance(v, (set, frozenset, list, tuple)) else getattr(info, k) == v
                   for k, v in self.at.items())


def select(unet, at) -> List[str]:
    """The hook point names a selection picks (a dict of HookInfo fields or a predicate)."""
    probe = Patch(at=at)
    return [n for n in unet.hook_names() if probe.selects(unet.hook_info(n))]


def step_table(sd, values: torch.Tensor) -> torch.Tensor:
    """A per-step table (one row per sampling step on dim 0) on the model's device, moved once per run,
    padded with zero rows to the scheduler's 1000 timesteps + 1 (P2P's cross schedule has steps + 1
    rows): a compiled graph is specialised on the table's shape, so padding lets an edit of any step
    count reuse the graphs of another."""
    rows = sd.scheduler.num_train_timesteps + 1
    if values.shape[0] > rows:
        raise ValueError(f"a per-step table has {values.shape[0]} rows; at most {rows} (one per timestep)")
    pad = values.new_zeros((rows - values.shape[0],) + tuple(values.shape[1:]))
    return torch.cat([values, pad]).to(sd.device)


class _Compiled:
    """A patch made ready to run: its op as a function, its table on the device, its active steps."""

    def __init__(self, sd, p: Patch):
        # The hooks read only what is here, never `p.weight`: a compiled UNet guards on the shape of
        # every tensor a hook touches, and the unpadded weights' shape changes with the step count.
        self.op = OPS.get(p.op) if isinstance(p.op, str) else p.op
        self.read, self.write, self.always = p.read, p.write, p.weight is None
        self.table = self.active = None
        if p.weight is not None:
            self.table = step_table(sd, p.weight)
            self.active = [bool(w.any()) for w in p.weight]

    def applies(self, ctx) -> bool:
        for group in (self.read, self.write):
            if group is not None and (ctx is None or not ctx.rows.get(group)):
                return False
        if self.always:
            return True
        if ctx is None:
            return False
        # eager: skip an all-zero step (a Python list, free); compiled: no branch on the step (a graph per
        # step), the table's zero row leaves the value alone. Past the table's steps its rows are zeros.
        return torch.compiler.is_compiling() or (ctx.step < len(self.active) and self.active[ctx.step])

    def __call__(self, x, ctx):
        w = None if self.table is None else ctx.at_step(self.table)
        dst = slice(None) if self.write is None else ctx.slice(self.write)
        src = None if self.read is None else x[ctx.slice(self.read)]
        return dst, self.op(x[dst] if src is None else src, x[dst], w)


def hooks(sd, patches: Sequence[Patch]) -> Dict[str, Callable]:
    """{hook name: fn} that applies `patches` (in list order where several select one point)."""
    if isinstance(patches, Patch) or not all(isinstance(p, Patch) for p in patches):
        raise TypeError("patches must be a list of Patch")
    by_point: Dict[str, List[_Compiled]] = {}
    for p in patches:
        c = _Compiled(sd, p)
        names = select(sd.unet, p.at)
        if not names:
            raise ValueError(f"a patch selects no hook point (at={p.at!r}); see sd.unet.hook_info(name) for the fields")
        for n in names:
            by_point.setdefault(n, []).append(c)
    return {n: _point_fn(cs) for n, cs in by_point.items()}


def _point_fn(compiled: List[_Compiled]):
    def fn(x, hook):
        ctx, out, owned = hook.ctx, None, False  # owned: `out` is a tensor of ours, safe to write into
        for c in compiled:
            if not c.applies(ctx):
                continue
            rows, value = c(x if out is None else out, ctx)
            if rows == slice(None):  # every row: the op's result is the value (it may be a view of x)
                out, owned = value, False
            else:
                if not owned:  # never write into the value the model handed us, nor into a view of it
                    out, owned = (x if out is None else out).clone(), True
                out[rows] = value
        return out
    return fn


@contextmanager
def apply(sd, patches: Sequence[Patch]):
    """`with apply(sd, patches):` the patches are attached to `sd.unet` inside, and always detached."""
    with sd.unet.hooks(hooks(sd, patches)):
        yield
