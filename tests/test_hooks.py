"""The hook contract of shared/DESIGN.md, checked on a small SD 1 UNet."""
import pytest
import torch

import sdlens
from sdlens.unet import UNetConfig, UNetModel

CFG = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_heads=(8, 8, 8, 8), context_dim=64)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    m = UNetModel(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), 301, torch.randn(2, 77, 64, generator=g)


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs)


def test_names_follow_checkpoint_paths(unet):
    names = set(unet.hook_names())
    for n in ("input_blocks.1.0.hook_h", "input_blocks.1.0.hook_out", "input_blocks.1.1.hook_out",
              "output_blocks.4.1.transformer_blocks.0.attn1.hook_probs", "middle_block.1.transformer_blocks.0.attn2.hook_q",
              "output_blocks.11.1.transformer_blocks.0.attn2.hook_v", "hook_out"):
        assert n in names
    attn = {n.rsplit(".", 1)[0] for n in names if ".attn" in n}
    assert len(attn) == 32  # 16 transformers x (attn1, attn2), as in SD 1.5
    assert all(f"{a}.{h}" in names for a in attn for h in ("hook_q", "hook_k", "hook_v", "hook_probs", "hook_out"))
    resblocks = {n.rsplit(".", 1)[0] for n in names if n.endswith("hook_h")}
    assert len(resblocks) == 8 + 2 + 12 and all(f"{r}.hook_out" in names for r in resblocks)


def test_identity_hook_changes_nothing(unet, inputs):
    ref = run(unet, inputs)
    # Every point but hook_probs (hooking it switches to the explicit attention path, tested below).
    with unet.hooks({lambda n: not n.endswith("hook_probs"): lambda x, hook: x}):
        out = run(unet, inputs)
    assert torch.equal(out, ref)
    with unet.hooks({lambda n: True: lambda x, hook: x}):
        torch.testing.assert_close(run(unet, inputs), ref, atol=1e-5, rtol=1e-5)


def test_replacing_hook_changes_output(unet, inputs):
    ref = run(unet, inputs)
    with unet.hooks({"output_blocks.4.0.hook_h": lambda x, hook: torch.zeros_like(x)}):
        out = run(unet, inputs)
    assert (out - ref).abs().max() > 1e-3


def test_probs_rows_sum_to_one_and_shapes(unet, inputs):
    _, cache = unet.run_with_cache(*inputs, names=lambda n: n.endswith("hook_probs"))
    assert len(cache) == 32
    p = cache["input_blocks.1.1.transformer_blocks.0.attn2.hook_probs"]
    assert p.shape == (2, 8, 16 * 16, 77)  # [batch, heads, queries, keys]
    p1 = cache["input_blocks.1.1.transformer_blocks.0.attn1.hook_probs"]
    assert p1.shape == (2, 8, 256, 256)
    for v in cache.values():
        torch.testing.assert_close(v.sum(-1), torch.ones_like(v.sum(-1)))


def test_explicit_and_sdpa_paths_agree(unet, inputs):
    fast = run(unet, inputs)
    with unet.hooks({lambda n: n.endswith("hook_probs"): lambda x, hook: None}):
        slow = run(unet, inputs)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    # the explicit path really ran: editing the probabilities changes the output
    with unet.hooks({lambda n: n.endswith("attn2.hook_probs"): lambda x, hook: torch.ones_like(x) / x.shape[-1]}):
        assert (run(unet, inputs) - fast).abs().max() > 1e-4


def test_hooks_detached_even_on_error(unet, inputs):
    with pytest.raises(RuntimeError, match="boom"):
        with unet.hooks({"hook_out": lambda x, hook: x * 2}):
            raise RuntimeError("boom")
    assert all(not unet.hook_point(n).fns for n in unet.hook_names())
    ref = run(unet, inputs)

    def bad(x, hook):
        raise KeyError("inside")
    with pytest.raises(KeyError):
        with unet.hooks({"input_blocks.1.0.hook_h": bad}):
            run(unet, inputs)
    assert not unet.hook_point("input_blocks.1.0.hook_h").fns
    assert torch.equal(run(unet, inputs), ref)


def test_bad_hook_name_and_bad_return(unet, inputs):
    with pytest.raises(KeyError, match="hook_names"):
        with unet.hooks({"input_blocks.1.0.hook_nope": lambda x, h: None}):
            pass
    with pytest.raises(ValueError, match="return None or a tensor"):
        with unet.hooks({"hook_out": lambda x, h: x[:1]}):
            run(unet, inputs)


def test_sampler_context_reaches_hooks(fixture):
    """During generate, hooks see step index, timestep, step count and the CFG row groups."""
    sd = sdlens.load(fixture["folder"])
    seen = []
    with sd.unet.hooks({"hook_out": lambda x, hook: seen.append((hook.ctx.step, hook.ctx.t, hook.ctx.num_steps,
                                                                    hook.ctx.rows, x.shape[0]))}):
        sd.generate(["a", "b"], steps=5, seed=0, height=64, width=64, progress=False)
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
    assert [s[1] for s in seen] == [801, 601, 401, 201, 1]
    assert all(s[2] == 5 and s[3] == {"uncond": [0, 1], "cond": [2, 3]} and s[4] == 4 for s in seen)
    assert sd.unet.ctx is None


def test_record_over_steps(fixture):
    sd = sdlens.load(fixture["folder"])
    with sd.unet.record(lambda n: n.endswith("output_blocks.4.0.hook_h")) as store:
        sd.generate("a", steps=3, seed=0, height=64, width=64, progress=False)
    (name, values), = store.items()
    assert name == "output_blocks.4.0.hook_h" and len(values) == 3


def test_hook_info_matches_the_tensors(unet):
    """Every point's recorded level is the size of what it sees (a non-square latent, so rows and
    columns are checked apart), its kind is its module's type, and its block holds that module."""
    from sdlens.unet.attention import Attention, BasicTransformerBlock, SpatialTransformer
    from sdlens.unet.model import Block, ResBlock
    x, ctx = torch.randn(1, 4, 16, 24), torch.randn(1, 77, 64)
    _, cache = unet.run_with_cache(x, 301, ctx, names=lambda n: True)
    assert set(cache) == set(unet.hook_names())
    types = {"resblock": ResBlock, "transformer": SpatialTransformer, "block": Block, "skip": Block, "backbone": Block,
             "self_attention": Attention, "cross_attention": Attention, "transformer_block": BasicTransformerBlock}
    for name, v in cache.items():
        info = unet.hook_info(name)
        h, w = -(-16 // info.downscale), -(-24 // info.downscale)
        assert info.map_size((16, 24)) == (h, w)
        if info.kind in ("self_attention", "cross_attention"):
            # [B, n, C], [B, heads, n, ...] or, for kv, [2, B, heads, n, d]
            tokens = v.shape[1] if info.point == "out" else v.shape[3] if info.point == "kv" else v.shape[2]
            if info.point in ("q", "probs", "out") or info.kind == "self_attention":
                assert tokens == h * w, name
            assert unet.get_submodule(info.module).is_cross == (info.kind == "cross_attention")
        elif info.kind == "transformer_block":  # tokens [B, h w, C]
            assert v.shape[1] == h * w, name
        else:
            assert v.shape[-2:] == (h, w), name
        if info.kind == "model":
            assert name == "hook_out" and info.place == ""
            continue
        module = unet.get_submodule(info.module)
        assert isinstance(module, types[info.kind]), name
        blocks = {"down": unet.input_blocks, "mid": [unet.middle_block], "up": unet.output_blocks}[info.place]
        assert any(m is module for m in blocks[info.block].modules()), name
    assert unet.hook_info("input_blocks.3.hook_out").level == 1  # a Downsample block's output is one level down
    assert unet.hook_info("output_blocks.2.hook_out").level == 2  # an Upsample block's output is one level up


def test_hook_names_filter_gives_the_official_p2p_layers():
    """On SD 1.x at 512 px the official LocalBlend reads down_cross[2:4] + up_cross[:3], its 16x16
    cross-attention maps: input_blocks 7-8 and output_blocks 3-5 (downscale 4 of a 64x64 latent)."""
    with torch.device("meta"):
        sd1 = UNetModel(sdlens.unet.SD1)
    cross = sd1.hook_names(kind="cross_attention", point="probs")
    assert len(cross) == 16
    at16 = [(sd1.hook_info(n).place, sd1.hook_info(n).block) for n in cross if sd1.hook_info(n).downscale == 4]
    assert at16 == [("down", 7), ("down", 8), ("up", 3), ("up", 4), ("up", 5)]
    assert [sd1.hook_info(n).block for n in sd1.hook_names(place="up", kind="self_attention", point="q")] == list(range(3, 12))
    with pytest.raises(TypeError, match="unknown field 'layer'"):
        sd1.hook_names(layer=3)


def test_step_context_is_restored_even_on_error(unet):
    from sdlens.hooks import StepContext
    outer = StepContext(step=1)
    with unet.step_context(outer):
        with pytest.raises(RuntimeError, match="boom"):
            with unet.step_context(StepContext(step=2)):
                assert unet.hook_point("hook_out").ctx.step == 2
                raise RuntimeError("boom")
        assert unet.ctx is outer
    assert unet.ctx is None
