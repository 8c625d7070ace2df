"""The patch layer (editing/patch.py): each op, row groups, step weights, order, selection by HookInfo,
and the one hook point that may add keys (`hook_kv`). Values are checked against the same edit
written by hand on recorded tensors."""
import ast
import glob
import os

import pytest
import torch

from sdlens.editing.patch import Patch, apply, blend, copy, hooks, scale, select
from sdlens.hooks import StepContext

ROWS = {"source": [0], "target": [1, 2]}


def call(sd, patches, step, point, rows=ROWS, seed=0):
    """One UNet call at `step` with the patches attached: (value at `point` before, after the patches)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 16, 16, generator=g)
    c = sd.encode_prompt(["a red circle", "a blue star", "a green square"])
    with sd.unet.record(point) as before, apply(sd, patches), sd.unet.record(point) as after, \
            sd.unet.step_context(StepContext(step=step, t=500, num_steps=4, rows=rows)), torch.no_grad():
        sd.unet(x, 500, c)
    return before[point][0], after[point][0]


def test_ops_are_their_formulas():
    src, dst, w = torch.randn(1, 3), torch.randn(2, 3), torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(copy(src, dst, w), torch.stack([dst[:, 0], src[0, 1].expand(2), src[0, 2].expand(2)], 1))
    assert torch.equal(blend(src, dst, w), src * w + dst * (1 - w))
    assert torch.equal(scale(None, dst, w), torch.where(w != 0, dst * w, dst))
    for op in (copy, blend, scale):  # weight 0 leaves the value alone: what lets eager runs skip a step
        assert torch.equal(op(src, dst, torch.zeros(3)), dst)


def test_copy_writes_the_target_rows_on_the_weighted_steps_only(tiny):
    point = tiny.unet.hook_names(place="up", kind="resblock", point="h")[1]
    module = tiny.unet.hook_info(point).module
    p = Patch(at={"module": module, "point": "h"}, weight=torch.tensor([0.0, 1.0, 0.0, 1.0]), read="source",
              write="target")
    before, after = call(tiny, [p], 1, point)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[0]) and torch.equal(after[2], before[0])
    before, after = call(tiny, [p], 2, point)  # weight 0: untouched
    assert torch.equal(after, before)


def test_patches_on_one_point_apply_in_list_order(tiny):
    point = tiny.unet.hook_names(place="up", kind="resblock", point="h")[1]
    at = {"name": point}
    ones = torch.ones(4)
    first = [Patch(at=at, weight=ones, read="source", write="target"), Patch(at=at, weight=ones * 2, op="scale")]
    before, after = call(tiny, first, 0, point)
    torch.testing.assert_close(after, torch.cat([before[:1] * 2, before[:1].expand(2, -1, -1, -1) * 2]), rtol=0, atol=0)
    second = first[::-1]  # scale all, then copy the (scaled) source: the same here, but via the other order
    before2, after2 = call(tiny, second, 0, point)
    assert torch.equal(after2[1], after2[0]) and torch.equal(after2[0], before2[0] * 2)
    third = [Patch(at=at, weight=ones * 3, op="scale", write="target"), Patch(at=at, weight=ones, read="target",
                                                                             write="source")]
    before3, after3 = call(tiny, third, 0, point, rows={"source": [0], "target": [1]})
    assert torch.equal(after3[0], before3[1] * 3)  # the second patch read what the first wrote


def test_a_patch_needs_its_row_groups_and_a_context(tiny):
    point = tiny.unet.hook_names(place="up", kind="resblock", point="h")[1]
    p = Patch(at={"name": point}, weight=torch.ones(4), read="source", write="target")
    before, after = call(tiny, [p], 0, point, rows={"uncond": [0, 1, 2]})  # e.g. an unconditional-only pass
    assert torch.equal(after, before)
    always = Patch(at={"name": point}, op=lambda s, d, w: d * 0)  # weight None: every call, context or not
    x, c = torch.randn(1, 4, 16, 16), tiny.encode_prompt(["a red circle"])
    with apply(tiny, [always]), tiny.unet.record(point) as got, torch.no_grad():
        tiny.unet(x, 500, c)
    assert got[point][0].abs().max() == 0


def test_selection_is_by_hookinfo_fields(tiny):
    unet = tiny.unet
    assert select(unet, {"kind": "self_attention", "point": {"k", "v"}}) == \
        [n for n in unet.hook_names() if unet.hook_info(n).kind == "self_attention" and unet.hook_info(n).point in ("k", "v")]
    assert select(unet, lambda i: i.place == "mid" and i.point == "probs") == unet.hook_names(place="mid", point="probs")
    with pytest.raises(ValueError, match="unknown HookInfo field 'layer'"):
        Patch(at={"layer": 3})
    with pytest.raises(ValueError, match="op='swap' is unknown"):
        Patch(at={"kind": "skip"}, op="swap")
    with pytest.raises(TypeError, match="weight"):
        Patch(at={"kind": "skip"}, weight=[1, 0])
    with pytest.raises(ValueError, match="selects no hook point"):
        hooks(tiny, [Patch(at={"kind": "skip", "place": "down"})])
    with pytest.raises(TypeError, match="list of Patch"):
        hooks(tiny, Patch(at={"kind": "skip"}))


def test_step_t_is_filled_where_the_context_is_set(tiny):
    ctx = StepContext(step=7, t=1, num_steps=10)
    with tiny.unet.step_context(ctx):
        assert ctx.step_t.item() == 7 and ctx.step_t.device == tiny.device
    ctx.step = 3
    with tiny.unet.step_context(ctx):  # a reused context never carries a stale step
        assert ctx.step_t.item() == 3


def test_hook_kv_may_add_keys_and_no_other_point_may(tiny):
    """Appending a second copy of every key and value leaves self-attention unchanged (softmax over
    [k, k] halves each weight, and each value comes twice): a check of the extension point's plumbing."""
    unet = tiny.unet
    kv = unet.hook_names(kind="self_attention", point="kv")[0]
    out = select(unet, {"module": unet.hook_info(kv).module, "point": "out"})[0]
    x, c = torch.randn(1, 4, 16, 16), tiny.encode_prompt(["a red circle"])
    with torch.no_grad(), unet.record(out) as plain:
        unet(x, 500, c)
    with torch.no_grad(), unet.hooks({kv: lambda v, hook: torch.cat([v, v], dim=-2)}), unet.record(out) as doubled:
        unet(x, 500, c)
    torch.testing.assert_close(doubled[out][0], plain[out][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hook_kv returned"):
        with torch.no_grad(), unet.hooks({kv: lambda v, hook: v[..., :-1]}):  # head_dim must stay
            unet(x, 500, c)
    k = select(unet, {"module": unet.hook_info(kv).module, "point": "k"})[0]
    with pytest.raises(ValueError, match="return None or a tensor of shape"):
        with torch.no_grad(), unet.hooks({k: lambda v, hook: torch.cat([v, v], dim=-2)}):
            unet(x, 500, c)


def test_features_never_import_editing():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "features")
    for path in glob.glob(os.path.join(root, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                assert "editing" not in (node.module or ""), (path, node.module)
