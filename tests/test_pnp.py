"""Plug-and-Play: exact injection behaviour, negative prompting, and the PCA feature views."""

import pytest
import torch

import sdlens
from sdlens.features.pca import collect, pca_rgb, resolve_layers
from sdlens.editing.pnp import ATTENTION_LAYERS, inversion_latents, negative_alpha, negative_uncond, translate
from sdlens.schedulers import invert, timesteps


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


def test_negative_prompt_schedules_are_the_official_ones():
    """Plug-and-play ldm/models/diffusion/ddim.py:56-68 by hand, a_i = alpha * f(i), 11 steps:
    linear f = flip(linspace(0, 1, 11)) = 1 - i/10, exp f = exp(-6 i/10), constant f = 1."""
    close = lambda a, b: abs(a - b) < 1e-12
    assert [negative_alpha("constant", 0.3, i, 11) for i in (0, 5, 10)] == [0.3, 0.3, 0.3]
    assert close(negative_alpha("linear", 0.5, 0, 11), 0.5)  # alpha is the initial value
    assert close(negative_alpha("linear", 0.5, 2, 11), 0.4)  # 0.5 * 0.8
    assert close(negative_alpha("linear", 0.5, 5, 11), 0.25)
    assert close(negative_alpha("linear", 0.5, 10, 11), 0.0)  # ... down to 0
    assert close(negative_alpha("linear", 1.0, 4, 11), 0.6)
    assert close(negative_alpha("exp", 0.5, 0, 11), 0.5)
    assert close(negative_alpha("exp", 0.5, 5, 11), 0.024893534183931972)  # 0.5 e^-3
    assert close(negative_alpha("exp", 0.5, 10, 11), 0.0012393760883331792)  # 0.5 e^-6
    assert close(negative_alpha("exp", 1.0, 1, 4), 0.1353352832366127)  # e^-2
    # one step: linspace(0, 1, 1) = [0], so linear gives 0 and exp gives alpha
    assert negative_alpha("linear", 0.7, 0, 1) == 0.0 and negative_alpha("exp", 0.7, 0, 1) == 0.7
    e0, en = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(negative_uncond(e0, en, 0.25), torch.tensor([2.5, -1.0]))  # 0.25*e0 + 0.75*en
    with pytest.raises(ValueError, match="alpha_schedule"):
        negative_alpha("cosine", 0.5, 0, 10)


def test_translate_uses_the_schedule_at_each_step(sd, zs, monkeypatch):
    """Step i of the translation combines eps("") and eps(negative) with a_i (ddim.py:184, :236)."""
    import sdlens.editing.pnp as pnp
    seen, orig = [], pnp.negative_uncond
    monkeypatch.setattr(pnp, "negative_uncond", lambda e0, en, a: seen.append(a) or orig(e0, en, a))
    translate(sd, None, "a cat", latents=zs, steps=6, negative_prompt="a dog", alpha=0.5, alpha_schedule="linear")
    assert [round(a, 12) for a in seen] == [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]  # 0.5 * (1 - i/5)


def test_source_row_is_conditioned_on_the_empty_prompt(sd, zs):
    """Both official codes: pnp-diffusers pnp.py:54 (pnp_guidance_embeds = ""), and the LDM code sets
    a real image's prompt to "" (run_features_extraction.py:130), whatever the inversion prompt."""
    contexts = []
    h = sd.unet.register_forward_pre_hook(lambda m, args: contexts.append(args[2]))
    try:
        translate(sd, None, "a cat", latents=zs, steps=6, inversion_prompt="a photo of a dog")
        translate(sd, None, "a cat", latents=zs, steps=6, source_prompt="a photo of a dog")
    finally:
        h.remove()
    empty, dog = sd.encode_prompt([""])[0], sd.encode_prompt(["a photo of a dog"])[0]
    assert not torch.equal(empty, dog)
    assert len(contexts) == 12 and all(torch.equal(c[0], empty) for c in contexts[:6])
    assert all(torch.equal(c[0], dog) for c in contexts[6:])  # the opt-in: the source row retraces the inversion


def test_fine_inversion_keeps_the_latents_at_the_sampling_timesteps(sd):
    """6 sampling steps: timesteps 1, 167, 333, 499, 665, 831 (ratio 1000 // 6 = 166, offset 1). A 12-step
    inversion passes 1, 84, 167, 250, 333, 416, 499, 582, 665, 748, 831, 914 (ratio 83), so its
    latents 1, 3, 5, 7, 9, 11 are kept, and the last one (t = 914) is not used: sampling starts at 831,
    as pnp-diffusers starts from noisy_latents_{timesteps[0]} (pnp.py:89)."""
    cfg = sd.scheduler
    assert timesteps(cfg, 6)[::-1] == [1, 167, 333, 499, 665, 831]
    assert timesteps(cfg, 12)[::-1] == [1, 84, 167, 250, 333, 416, 499, 582, 665, 748, 831, 914]
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    z0 = sd.encode_image(image)
    with torch.no_grad():
        fine = invert(sd.denoiser(sd.encode_prompt([""]), 1.0, 12), z0, cfg, 12)
    sd.unet.ctx = None
    kept = inversion_latents(sd, image, steps=6, inversion_steps=12)
    assert len(kept) == 7 and all(torch.equal(a, fine[i]) for a, i in zip(kept, [0, 1, 3, 5, 7, 9, 11]))
    # translate accepts the whole fine trajectory and keeps the same latents
    a = translate(sd, None, "a cat", latents=fine, steps=6)
    b = translate(sd, None, "a cat", latents=kept, steps=6)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.guidance_latents, kept))
    # and inverts that way by itself when given the image
    c = translate(sd, image, "a cat", steps=6, inversion_steps=12)
    assert torch.equal(c.images, b.images)


@pytest.mark.parametrize("kw, name", [
    (dict(alpha=float("nan")), "alpha"), (dict(alpha=float("inf")), "alpha"), (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"), (dict(feature_injection=2.0), "feature_injection"),
    (dict(feature_injection=float("nan")), "feature_injection"), (dict(attention_injection=-0.5), "attention_injection"),
    (dict(attention_injection=float("nan")), "attention_injection"), (dict(alpha_schedule="cosine"), "alpha_schedule"),
    (dict(inversion_steps=3), "inversion_steps"),  # fewer than the 6 sampling steps
    (dict(inversion_steps=10), "inversion_steps"),  # 1, 101, 201, ...: misses 167
    (dict(inversion_steps=12.0), "inversion_steps"), (dict(inversion_steps=1000), "inversion_steps"),
])
def test_translate_rejects_bad_arguments(sd, kw, name):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=name) as e:
        translate(sd, image, "a cat", steps=6, **kw)
    assert "\n" not in str(e.value)


def test_translate_rejects_latents_of_another_schedule(sd, zs):
    with pytest.raises(ValueError, match="guidance latents"):
        translate(sd, None, "a cat", latents=zs[:5], steps=6)  # 4 steps
    with pytest.raises(ValueError, match="guidance latents"):
        translate(sd, None, "a cat", latents=zs, steps=4)  # 6 steps do not pass 1, 251, 501, 751


def test_cli_rejects_bad_pnp_arguments(sd1_fixture, tmp_path, capsys):
    """Through `main`, what `python -m sdlens` runs (the parser's refusal exits with 2 itself)."""
    from PIL import Image

    from sdlens.__main__ import main
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    base = ["pnp", "--model", sd1_fixture["folder"], "--image", str(image), "--prompt", "a cat", "--steps", "2"]
    for extra, name in ((["--feature-injection", "2"], "--feature-injection"),  # refused by the parser
                        (["--inversion-steps", "1"], "inversion_steps")):
        out = tmp_path / name.strip("-")
        try:
            code = main([*base, *extra, "--out", str(out)])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and name in err, err
        assert not out.exists()


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
