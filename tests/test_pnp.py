"""Plug-and-Play: exact injection behaviour, negative prompting, and the PCA feature views."""
import pytest
import torch

import sdlens
from sdlens.editing.features import collect, pca_rgb, resolve_layers
from sdlens.editing.pnp import ATTENTION_LAYERS, inversion_latents, negative_alpha, negative_uncond, translate


@pytest.fixture(scope="module")
def sd(sd1_fixture):
    return sdlens.load(sd1_fixture["folder"])


@pytest.fixture(scope="module")
def zs(sd):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return inversion_latents(sd, image, steps=6)


def spy(log):
    def fn(x, hook):
        rows = hook.ctx.rows
        same = all(torch.equal(x[r], x[rows["source"][0]]) for r in (rows["uncond"][0], rows["cond"][0]))
        log.append((hook.name, hook.ctx.step, same))
    return fn


def test_injection_everywhere_reproduces_the_source(sd, zs):
    feats = sorted({n.rsplit(".", 1)[0] for n in sd.unet.hook_names() if n.endswith("hook_h")})
    attn = sorted({n.rsplit(".", 1)[0] for n in sd.unet.hook_names() if ".attn1." in n})
    log = []
    watch = lambda n: n.endswith("hook_h") or (".attn1." in n and n[-6:] in ("hook_q", "hook_k"))
    translate(sd, None, "a cat", latents=zs, steps=6, feature_layers=feats, attention_layers=attn,
              feature_injection=1.0, attention_injection=1.0, observe={watch: spy(log)})
    assert len(log) == 6 * (len(feats) + 2 * len(attn)) and all(same for _, _, same in log)


def test_injection_only_at_configured_layers_and_steps(sd, zs):
    watch = lambda n: n.endswith("hook_h") or (".attn1." in n and n[-6:] in ("hook_q", "hook_k"))

    def same_set(**kw):
        log = []
        translate(sd, None, "a photo of a dog", latents=zs, steps=6, observe={watch: spy(log)}, **kw)
        assert len({n for n, _, _ in log}) == 22 + 2 * 16  # every watched point was called
        return {(n, s) for n, s, same in log if same}

    # At step 0 the translation starts from the source latent, so layers before the first
    # cross-attention agree by themselves: subtract what a run without injection shows.
    natural = same_set(feature_injection=0.0, attention_injection=0.0)
    injected = same_set(feature_injection=0.5, attention_injection=1 / 3)
    expect = {("output_blocks.4.0.hook_h", s) for s in range(3)}  # int(6 * 0.5) = 3 steps
    expect |= {(f"{l}.{h}", s) for l in ATTENTION_LAYERS for h in ("hook_q", "hook_k") for s in range(2)}
    assert injected == expect | natural and not expect & natural


def test_negative_prompt_formula_by_hand():
    assert negative_alpha("constant", 0.3, 7, 50) == 0.3
    assert negative_alpha("linear", 0.3, 0, 11) == 1.0 and abs(negative_alpha("linear", 0.3, 10, 11) - 0.3) < 1e-12
    assert abs(negative_alpha("linear", 0.3, 5, 11) - 0.65) < 1e-12
    assert abs(negative_alpha("exp", 0.25, 5, 11) - 0.5) < 1e-12 and negative_alpha("exp", 0.25, 10, 11) == 0.25
    e0, en = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(negative_uncond(e0, en, 0.25), torch.tensor([2.5, -1.0]))  # 0.25*e0 + 0.75*en
    with pytest.raises(ValueError, match="schedule"):
        negative_alpha("cosine", 0.5, 0, 10)


def test_negative_prompt_limits(sd1_fixture):
    """alpha = 1 ignores the negative prompt; alpha = 0 is a plain negative prompt (it changes the image).
    In float64: the negative prompt adds a batch row, and in float32 some CPUs' kernels round a
    batch of 4 differently from one of 3 (0.025 after 6 steps of this random model, on AMD EPYC)."""
    sd = sdlens.load(sd1_fixture["folder"], dtype=torch.float64)
    zs = inversion_latents(sd, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)), steps=6)
    plain = translate(sd, None, "a cat", latents=zs, steps=6).images
    a1 = translate(sd, None, "a cat", latents=zs, steps=6, negative_prompt="a dog", alpha=1.0).images
    a0 = translate(sd, None, "a cat", latents=zs, steps=6, negative_prompt="a dog", alpha=0.0).images
    torch.testing.assert_close(a1, plain, atol=1e-5, rtol=0)
    assert (a0 - plain).abs().max() > 1e-3


def test_bad_layer_name(sd, zs):
    with pytest.raises(ValueError, match="no hook_h hook point"):
        translate(sd, None, "a cat", latents=zs, steps=6, feature_layers=["output_blocks.4"])


def test_pca_on_known_structure():
    """Two regions with different feature vectors: the first component separates them, the basis is
    shared (swapped halves get swapped colours) and the result is deterministic."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    left = torch.zeros(16, 8, 8)
    left[:, :, :4], left[:, :, 4:] = a[:, None, None], b[:, None, None]
    left += 0.01 * torch.randn(16, 8, 8, generator=g)
    right = left.flip(-1)
    out = pca_rgb([left, right])
    assert out[0].shape == (3, 8, 8)
    c0 = out[0][0]
    assert (c0[:, :4].mean() - c0[:, 4:].mean()).abs() > 0.9  # the two regions sit at opposite ends
    torch.testing.assert_close(out[1][0], c0.flip(-1))
    again = pca_rgb([left, right])
    assert all(torch.equal(x, y) for x, y in zip(out, again))


def test_feature_collection_shapes(sd, zs):
    names = resolve_layers(sd, ["output_blocks.4", "output_blocks.4.1.transformer_blocks.0.attn1.hook_k"])
    feats = collect(sd, [zs[3], zs[2]], 501, names)
    assert [f.shape for f in feats["output_blocks.4.0.hook_out"]] == [(64, 2, 2)] * 2
    assert [f.shape for f in feats[names[1]]] == [(64, 2, 2)] * 2
    with pytest.raises(ValueError, match="not a hook point"):
        resolve_layers(sd, ["output_blocks.99"])
