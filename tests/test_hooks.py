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
