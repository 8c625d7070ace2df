"""The GPU path, checked on a CPU: a compiled UNet makes one graph for all steps, hooks compile in
(and attaching or detaching them never leaves a stale graph), and the editing hooks neither wait
for the device nor copy anything from the host inside a step.

Graphs are counted with dynamo's own counters. These tests compile with the "eager" and
"aot_eager" backends: they trace exactly what inductor would be given (the graph count is the
backend's input), in seconds instead of the minute inductor's C++ build of sdlens-tiny takes on
2 cores. Inductor itself: `python -m pytest -m bench tests/test_compile.py` (a benchmark).
"""
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sdlens
from sdlens.editing import LocalBlend, PromptToPrompt
from sdlens.editing.masactrl import MasaCtrl
from sdlens.editing.pnp import translate
from sdlens.hooks import StepContext

SRC, TGT = "a big red circle", "a big blue circle"


def graphs():
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh():
    """A fresh sdlens-tiny and a fresh dynamo cache, so the counts are this test's alone."""
    torch._dynamo.reset()
    counters.clear()
    yield sdlens.load()
    torch._dynamo.reset()


def test_generate_compiles_once_and_hooks_compile_in(fresh):
    """A 10-step generate runs on one graph: the timestep reaches the compiled code as a tensor.
    (Before, t was a Python int: 8 graphs, then the recompile limit and eager steps.) Observe-only
    hooks add one graph for their set, and detaching them brings back the plain one. Hooks that
    change values are checked the same way by the P2P test below."""
    sd = fresh
    want = sd.generate(SRC, steps=10, seed=0, output="tensor", progress=False)
    sd.compile(backend="eager")
    got = sd.generate(SRC, steps=10, seed=0, output="tensor", progress=False)
    assert graphs() == 1 and counters["frames"]["total"] == 1, dict(counters["stats"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # observe-only hooks compile in: one more graph for the new hook set, and every step reuses it
    names = sd.unet.hook_names(kind="block", point="out")[::3] + sd.unet.hook_names(kind="cross_attention", point="q")[:2]
    with sd.unet.record(lambda n: n in names) as store:
        again = sd.generate(SRC, steps=10, seed=0, output="tensor", progress=False)
    assert graphs() == 2, dict(counters["stats"])
    assert sorted(store) == sorted(names) and all(len(v) == 10 for v in store.values())
    torch.testing.assert_close(again, want, atol=1e-5, rtol=0)
    # detached, the hooks are gone: the plain graph is reused and sees nothing
    with sd.unet.record(lambda n: n in names[:1]) as none_left:
        pass
    assert torch.equal(sd.generate(SRC, steps=10, seed=0, output="tensor", progress=False), got)
    assert graphs() == 2 and not none_left
    sd.compile(backend=None)
    with sd.unet.record(lambda n: n in names) as eager:
        sd.generate(SRC, steps=10, seed=0, output="tensor", progress=False)
    for n in names:  # the compiled hooks saw what the eager ones see, call by call
        torch.testing.assert_close(torch.stack(store[n]), torch.stack(eager[n]), atol=1e-5, rtol=0)


def test_p2p_graph_count_is_bounded_and_the_same_at_any_step_count(fresh):
    """A refine edit with re-weighting and local blend: one graph (before the attention store allocated
    its sums ahead of the first call, creating them there made a second graph), and a 13-step edit after a 10-step one compiles nothing new (any other count
    would do: the per-step tables are padded). The compiled edit equals the eager one (aot_eager: the
    in-place hook writes are functionalised)."""
    sd = fresh
    edit = lambda steps: PromptToPrompt(sd, SRC, ["a big blue circle on grass"], mode="refine", equalize={"blue": 2.0},
                                        blend=LocalBlend([["circle"], ["circle"]]), steps=steps)
    want = edit(10).run(seed=3, progress=False).images
    sd.compile(backend="aot_eager")
    got = edit(10).run(seed=3, progress=False).images
    at_10 = graphs()
    assert at_10 == 1 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    edit(13).run(seed=3, progress=False)
    assert graphs() == at_10, dict(counters["stats"])


class HostTraffic(TorchDispatchMode):
    """What inside a UNet call would copy from the host while the model lives on another device (on
    a GPU each such copy waits for it): an operation given a CPU tensor (`x.to(device)` of a CPU
    table), a tensor made from Python data (`torch.tensor(...)`) and an index given as a list (which
    torch turns into a tensor on the host). The last two bypass dispatch, so they are patched."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops = []
        for name in ("tensor", "as_tensor"):
            made = getattr(torch, name)
            monkeypatch.setattr(torch, name, lambda *a, _made=made, _name=name, **k: self.note(_name) or _made(*a, **k))
        for name in ("__getitem__", "__setitem__"):
            op = getattr(torch.Tensor, name)

            def indexed(x, index, *rest, _op=op, _name=name):
                if any(isinstance(i, list) for i in (index if isinstance(index, tuple) else (index,))):
                    self.note(f"{_name} with a list")
                return _op(x, index, *rest)
            monkeypatch.setattr(torch.Tensor, name, indexed)
        self.active = False

    def note(self, what):
        if self.active:
            self.ops.append(what)

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in flat):
            self.note(str(func))
        return func(*args, **kwargs or {})


@pytest.fixture
def on_meta(monkeypatch):
    """sdlens-tiny on the meta device, with every UNet call watched by `HostTraffic`. On meta a
    decision on data (`.item()`, `if a.any()`) raises, as it would wait for a GPU."""
    sd = sdlens.load()
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to("meta")
    watch = HostTraffic(monkeypatch)
    core = sd.unet.core

    def watched(*args):
        with watch:
            return core(*args)
    monkeypatch.setattr(sd.unet, "core", watched)
    return sd, watch


def test_the_editing_hooks_make_no_host_copies_or_syncs(on_meta):
    sd, watch = on_meta
    image = torch.rand(1, 3, 64, 64)
    PromptToPrompt(sd, SRC, [TGT], steps=3, equalize={"blue": 2.0}).run(seed=0, progress=False)  # replace
    PromptToPrompt(sd, "a red circle", ["a blueish circle"], steps=3).run(seed=0, progress=False)  # swap, 1 vs 2 tokens
    PromptToPrompt(sd, SRC, ["a big blue circle on grass"], mode="refine", steps=3,
                   blend=LocalBlend([["circle"], ["circle"]])).run(seed=0, low_memory=True, progress=False)
    translate(sd, image, TGT, steps=3, inversion_steps=3, negative_prompt="blurry", progress=False)
    MasaCtrl(sd, SRC, "a big circle on the right", steps=3, start_step=1, start_layer=0).run(seed=0, progress=False)
    assert watch.ops == []
    # the check itself: each way of copying from the host is caught
    x, c = torch.zeros(2, 4, 16, 16, device="meta"), torch.zeros(2, 77, sd.unet.cfg.context_dim, device="meta")
    point = sd.unet.hook_names(kind="resblock", point="h")[0]
    for hook, caught in ((lambda h, hook: h[[1, 0]], "__getitem__ with a list"),
                         (lambda h, hook: h * torch.ones(1).to(h.device), "aten._to_copy.default"),
                         (lambda h, hook: h * torch.tensor(2.0, device=h.device), "tensor")):
        watch.ops.clear()
        with sd.unet.hooks({point: hook}):
            sd.unet(x, 5, c)
        assert watch.ops == [caught]


def test_channels_last_runs_and_agrees():
    """Channels-last weights and latents (`bench/gpu.py --channels-last` times them on a GPU): the UNet
    forces no layout, so it runs and agrees with the default layout; its token reshapes are then views."""
    sd = sdlens.load()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    c = sd.encode_prompt([SRC, TGT])
    with torch.no_grad():
        want = sd.unet(x, 500, c)
        sd.unet.to(memory_format=torch.channels_last)
        got = sd.unet(x.to(memory_format=torch.channels_last), 500, c)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_step_context_slices_and_step_tables():
    ctx = StepContext(step=2, rows={"cond": [2, 3], "odd": [1, 3]}, step_t=torch.tensor(2))
    assert ctx.slice("cond") == slice(2, 4)
    assert ctx.slice("odd") == [1, 3]  # not consecutive: the list, which indexes the same rows
    ctx.rows["none"] = []
    assert ctx.slice("none") == slice(0, 0)
    table = torch.arange(12).reshape(6, 2)
    assert torch.equal(ctx.at_step(table), table[2])


def test_load_compile_flag():
    assert sdlens.load(compile=True).unet._compiled is not None
    with pytest.raises(TypeError, match="compile"):
        sdlens.load(compile="max-autotune")


@pytest.mark.bench
def test_inductor_matches_eager():
    """The real compiler (inductor, C++ on a CPU): a 10-step generate and a P2P edit within 1e-4 of
    eager, on one and on at most two graphs."""
    torch._dynamo.reset()
    counters.clear()
    sd = sdlens.load()
    want = sd.generate(SRC, steps=10, seed=0, output="tensor", progress=False)
    edit = lambda: PromptToPrompt(sd, SRC, [TGT], steps=10).run(seed=3, progress=False).images
    want_edit = edit()
    sd.compile()
    torch.testing.assert_close(sd.generate(SRC, steps=10, seed=0, output="tensor", progress=False), want, atol=1e-4, rtol=0)
    assert graphs() == 1
    torch.testing.assert_close(edit(), want_edit, atol=1e-4, rtol=0)
    assert graphs() <= 3


@pytest.mark.bench
def test_every_editing_method_compiles_to_a_few_graphs():
    """PnP (inversion + translation), MasaCtrl and null-text on a compiled UNet: a few graphs each, none
    added by a run at another step count (measured: PnP 2, MasaCtrl 1, null-text 1)."""
    torch._dynamo.reset()
    counters.clear()
    sd = sdlens.load().compile(backend="eager")
    image = sd.generate(SRC, steps=2, seed=1, output="tensor", progress=False)
    jobs = {"pnp": lambda n: translate(sd, image, TGT, steps=n, inversion_steps=n, progress=False),
            "masactrl": lambda n: MasaCtrl(sd, SRC, "a big circle on the right", steps=n, start_step=2).run(
                seed=0, progress=False),
            "null-text": lambda n: sdlens.editing.invert_image(sd, image, SRC, "null-text", n, progress=False)}
    for name, job in jobs.items():
        before = graphs()
        job(10)
        made = graphs() - before
        job(20)
        assert 1 <= made <= 2 and graphs() - before == made, (name, made, dict(counters["stats"]))
