"""Named hook points: the public API that every analysis and editing method uses.

Modelled on TransformerLens' `hook_points.py`. A `HookPoint` is an identity module placed inline
(`q = self.hook_q(q)`); its name is its module path, for example
`output_blocks.4.1.transformer_blocks.0.attn1.hook_probs`. A hook is `fn(value, hook)`: it returns
None to observe or a tensor to replace the value. `hook.name` is the point's name and `hook.ctx`
is the sampler's per-step `StepContext`.

Hooks are global state on the model, so they are only attached through `model.hooks(...)`, a
context manager that always detaches them, even when the body raises. The same holds for the step
context: the sampler sets it with `model.step_context(ctx)`, which always restores the previous one.

Every point also knows where it is (`model.hook_info(name)`: place, block, level, kind), recorded
when the model is built. Code that picks layers asks that, never the name's spelling.
"""
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .checks import kind


@dataclass
class StepContext:
    """What the sampler knows about the current UNet call; hooks read it as `hook.ctx`.

    `rows` names groups of batch rows, e.g. {"uncond": [0, 1], "cond": [2, 3]}. Editing methods
    add their own groups ("source", "target") when they build the batch. Each group is a run of
    consecutive rows, so `ctx.slice("cond")` indexes it as a view: a list index would be copied
    to the device as an index tensor at every hook call.

    `step_t` is `step` as a 0-d int64 tensor on the model's device, filled in where the context is
    set (`model.step_context`), so a context is complete before any hook sees it. Hooks that change with the step should read their per-step values from a table on the
    device with `ctx.at_step(table)` instead of branching on the Python int `step`: a compiled UNet
    (`sd.compile()`) would guard on that int and build a new graph at every step.
    """
    step: int = 0
    t: int = 0
    num_steps: int = 1
    rows: Dict[str, List[int]] = field(default_factory=dict)
    step_t: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    _slices: dict = field(default_factory=dict, compare=False, repr=False)  # group -> slice, made once

    def at_step(self, table: torch.Tensor) -> torch.Tensor:
        """Row `step` of a per-step `table` (on the model's device), gathered on the device. Plain
        `table[ctx.step_t]` would not do: indexing with a 0-d tensor reads it back as a Python int,
        which waits for the GPU and makes a compiled graph specialise on the step."""
        return table.index_select(0, self.step_t.reshape(1))[0]

    def eager_skip(self, active_steps) -> bool:
        """True when a hook may return None at once: not compiling, and `active_steps[step]` (a per-run
        Python list) says the hook does nothing at this step. The decision is free in eager mode (a
        Python int, no wait for the device). Compiled code must not take it (a graph per step), so
        there the hook runs and its table, read with `at_step`, leaves the values as they are."""
        return not torch.compiler.is_compiling() and not active_steps[self.step]

    def slice(self, group: str):
        """The rows of `group` as a slice, to index with (KeyError if there is no such group), worked out
        once per context, not at every hook call. Rows that are not consecutive (a sampler of your own
        may interleave them) come back as the list, which indexes the same rows at the cost of an
        index copy."""
        if group not in self._slices:
            rows = list(self.rows[group])
            consecutive = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
            self._slices[group] = (slice(rows[0], rows[0] + len(rows)) if rows else slice(0, 0)) if consecutive else rows
        return self._slices[group]


@dataclass(frozen=True)
class HookInfo:
    """Where a hook point sits in the model, recorded when the model is built.

    kind: "resblock", "self_attention", "cross_attention", "transformer_block" (one transformer
    block's tokens), "transformer" (a spatial transformer's output), "block" (the output of one
    numbered input/middle/output block), "backbone" and "skip" (what a decoder block concatenates:
    the features coming up the decoder and the encoder's skip; FreeU's two inputs) or "model" (the
    model's output). point: the value seen, "h", "out", "q", "k", "v", "kv" (keys and values stacked,
    the one point that may add keys), "probs", "backbone" or "skip".
    place: "down", "mid", "up", or "" for the model output. block: the index in input_blocks /
    output_blocks (0 for the middle block, -1 for the model output). level: the feature map is
    2**level times smaller than the latent (`downscale`). transformer_block: for points inside a
    spatial transformer's `transformer_blocks.K`, K (SDXL has 2 or 10 per transformer, SD 1/2 one);
    -1 elsewhere. MasaCtrl's layer count and the papers' "block N" tables need it."""
    name: str
    module: str
    point: str
    kind: str
    place: str
    block: int
    level: int
    transformer_block: int = -1

    @property
    def downscale(self) -> int:
        return 2 ** self.level

    def map_size(self, latent_hw) -> tuple:
        """(h, w) of this point's feature map for a latent of `latent_hw`: each downsample halves a
        side rounding up (a stride-2 convolution with padding 1), so ceil(h / 2**level)."""
        f = self.downscale
        return -(-latent_hw[0] // f), -(-latent_hw[1] // f)


class HookPoint(nn.Module):
    """Identity unless hook functions are attached."""

    def __init__(self):
        super().__init__()
        self.fns: List[Callable] = []
        self.name: Optional[str] = None
        self.info: Optional[HookInfo] = None  # set by the owning model when it is built
        self.owner = None  # set by HookedModule; a plain attribute, not a submodule

    @property
    def ctx(self) -> Optional[StepContext]:
        return None if self.owner is None else self.owner.ctx

    # nn.Module.__call__ costs microseconds per call; a hook point with nothing attached must cost
    # nothing measurable (there are ~200 in a UNet forward), so we skip it.
    def __call__(self, x):
        if not self.fns:
            return x
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                if not isinstance(out, torch.Tensor) or not self.shape_ok(out.shape, x.shape):
                    raise ValueError(f"hook on {self.name} returned {type(out).__name__} "
                                     f"{getattr(out, 'shape', '')}; return None or {self.expected(x.shape)}")
                if out.dtype != x.dtype or out.device != x.device:  # else the next layer fails far from here
                    raise TypeError(f"hook on {self.name} returned a {out.dtype} tensor on {out.device}; return one "
                                    f"of {x.dtype} on {x.device}, e.g. out.to(x)")
                x = out
        return x

    forward = __call__

    @staticmethod
    def shape_ok(got, shape) -> bool:
        return got == shape

    @staticmethod
    def expected(shape) -> str:
        return f"a tensor of shape {tuple(shape)}"

    def extra_repr(self):
        return f"{len(self.fns)} fns" if self.fns else ""


class KeyValuePoint(HookPoint):
    """An attention layer's keys and values, stacked: [2, batch, heads, keys, head_dim].

    The one point whose hooks may return MORE keys (a larger dim -2) than they were given: the
    explicit extension point for attending to extra keys and values (StyleAligned's shared
    attention appends the reference image's). Every other dimension, the dtype and the device must
    stay; every other hook point keeps its shape. The model stacks k and v only when a hook is
    attached, so an empty point costs nothing."""

    @staticmethod
    def shape_ok(got, shape) -> bool:
        return len(got) == len(shape) and got[:-2] == shape[:-2] and got[-1] == shape[-1] and got[-2] >= shape[-2]

    @staticmethod
    def expected(shape) -> str:
        return f"keys and values of shape {tuple(shape[:-2])} + (keys >= {shape[-2]}, {shape[-1]})"


Selector = Union[str, Callable[[str], bool]]


class HookedModule(nn.Module):
    """Mixin for a model that owns hook points: naming, attaching, recording."""

    ctx: Optional[StepContext] = None

    def setup_hooks(self, infos: Optional[Dict[str, HookInfo]] = None):
        """Name every HookPoint by its module path and give it its `HookInfo`. Call at the end of
        __init__; `infos` maps names to where the points are (the model knows, having built them)."""
        self._hook_points = {}
        for name, m in self.named_modules():
            if isinstance(m, HookPoint):
                m.name = name
                m.info = (infos or {}).get(name)
                object.__setattr__(m, "owner", self)  # avoid registering a parent as a child
                self._hook_points[name] = m

    def hook_names(self, **where) -> List[str]:
        """All hook point names, or those whose `HookInfo` fields equal `where`, e.g.
        `hook_names(kind="cross_attention", point="probs")` or `hook_names(place="up", kind="resblock")`."""
        bad = [k for k in where if k not in HookInfo.__dataclass_fields__ and k != "downscale"]
        if bad:
            raise TypeError(f"hook_names() got unknown field {bad[0]!r}; fields: "
                            f"{', '.join(HookInfo.__dataclass_fields__)}, downscale")
        return [n for n, hp in self._hook_points.items()
                if all(hp.info is not None and getattr(hp.info, k) == v for k, v in where.items())]

    def hook_info(self, name: str) -> HookInfo:
        """Where hook point `name` is: place, block, level, kind (see `HookInfo`)."""
        info = self.hook_point(name).info
        if info is None:
            raise KeyError(f"hook point {name!r} has no recorded place; its model did not pass infos to setup_hooks")
        return info

    @contextmanager
    def step_context(self, ctx: Optional[StepContext]):
        """`with model.step_context(StepContext(...)):` what hooks see as `hook.ctx` inside; the
        previous context comes back on exit, even when the body raises."""
        if ctx is not None:  # filled here, at every entry, so a reused context never carries a stale step
            device = next(self.parameters()).device
            ctx.step_t = torch.full((), ctx.step, dtype=torch.long, device=device)
        prev, self.ctx = self.ctx, ctx
        try:
            yield ctx
        finally:
            self.ctx = prev

    def hook_point(self, name: str) -> HookPoint:
        if name not in self._hook_points:
            raise KeyError(f"no hook point {name!r}; see model.hook_names()")
        return self._hook_points[name]

    def _select(self, sel: Selector) -> List[HookPoint]:
        if not (isinstance(sel, str) or callable(sel)):
            raise TypeError(f"a hook point selector must be a hook point name or a predicate on names, "
                            f"not {kind(sel)}; see model.hook_names()")
        if callable(sel):
            found = [hp for n, hp in self._hook_points.items() if sel(n)]
        else:
            found = [self.hook_point(sel)]
        return found

    @contextmanager
    def hooks(self, fwd_hooks: Dict[Selector, Callable]):
        """`with model.hooks({name_or_predicate: fn}):` attach, run, always detach."""
        if not isinstance(fwd_hooks, Mapping):
            raise TypeError(f"fwd_hooks must be a dict {{hook point name or predicate: fn(value, hook)}}, "
                            f"not {kind(fwd_hooks)}")
        for sel, fn in fwd_hooks.items():  # checked before any is attached: else the error comes mid-forward
            if not callable(fn):
                raise TypeError(f"the hook function for {sel!r} must be callable as fn(value, hook), not {kind(fn)}")
        attached = []
        try:
            for sel, fn in fwd_hooks.items():
                for hp in self._select(sel):
                    hp.fns.append(fn)
                    attached.append((hp, fn))
            yield self
        finally:
            for hp, fn in attached:
                hp.fns.remove(fn)

    @contextmanager
    def record(self, names: Selector, detach: bool = True):
        """Record every value seen at the chosen points, over any number of calls.

        `with unet.record(lambda n: n.endswith("attn2.hook_probs")) as store: ...` leaves
        `store[name]` as a list with one tensor per call (per firing of the point).
        """
        store: Dict[str, List[torch.Tensor]] = {}
        latest: Dict[str, List[torch.Tensor]] = {}

        # The hooks only write this call's values into `latest`; the model's forward hooks, which run
        # eagerly around the (possibly compiled) forward, move them to the lists (and so does the
        # exit, for a call that raised). Appending inside the hooks would make a compiled UNet guard
        # on the lists' lengths and build a graph per call.
        def save(x, hook):  # a list made in this call: appending to it guards on nothing
            latest.setdefault(hook.name, []).append(x.detach() if detach else x)

        def flush(*_):
            for name, xs in latest.items():
                store.setdefault(name, []).extend(xs)
            latest.clear()

        handles = [self.register_forward_pre_hook(flush), self.register_forward_hook(flush)]
        try:
            with self.hooks({names: save}):
                yield store
        finally:
            flush()
            for h in handles:
                h.remove()

    def run_with_cache(self, *args, names: Selector = lambda n: not n.endswith(("hook_probs", "hook_kv")), **kwargs):
        """One forward pass; returns (output, {name: value}) for the chosen hook points.

        By default it records every point except the attention probabilities (`hook_probs`):
        those are [batch, heads, queries, keys], gigabytes at 512x512, and hooking them switches
        attention to the explicit path; nor `hook_kv`, a stacked copy of `hook_k` and `hook_v`.
        Pass `names` to record them."""
        with self.record(names) as store:
            out = self(*args, **kwargs)
        return out, {k: v[-1] for k, v in store.items()}
