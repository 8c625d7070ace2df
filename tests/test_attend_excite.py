"""Attend-and-Excite: the same images as diffusers' StableDiffusionAttendAndExcitePipeline from the same
weights and noise (sdlens-tiny, the random SD 1.5 topology), hooks under autograd, bad input, and the
claim on sdlens-tiny."""
import copy
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sdlens
from sdlens.editing.attend_excite import (attend_and_excite, default_attn_res, gaussian_kernel, map_layers,
                                          token_indices)
from sdlens.editing.patch import Patch, apply
from sdlens.hooks import StepContext
from sdlens.unet import SD1, SDXL, UNetModel

TWO = "a red circle next to a blue square"  # tiny's own two-object caption form (tiny/scenes.py)


def noise(n=1, hw=16, seed=0):
    return torch.randn((n, 4, hw, hw), generator=torch.Generator().manual_seed(seed))


def ae_pipeline(pipe):
    """diffusers' Attend-and-Excite pipeline on the components of a StableDiffusionPipeline; its own UNet
    copy, as it swaps the attention processors (and puts them back only when it finishes)."""
    from diffusers import StableDiffusionAttendAndExcitePipeline
    c = pipe.components
    ae = StableDiffusionAttendAndExcitePipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                                unet=copy.deepcopy(c["unet"]), scheduler=c["scheduler"],
                                                safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    ae.set_progress_bar_config(disable=True)
    return ae


def unet_calls(sd, run):
    """Run `run()`, returning (its result, the batch size of every UNet call)."""
    name = sd.unet.hook_names(kind="model")[0]
    with sd.unet.record(name) as rec:
        out = run()
    return out, [v.shape[0] for v in rec[name]]


def test_kernel_and_default_maps(tiny):
    """diffusers' Gaussian (its 4 sigma^2 exponent) and the default maps: diffusers' attn_res=None rule,
    (ceil(w / 32), ceil(h / 32)), on the SD 1 and SDXL topologies at several sizes; 8 x 8 on tiny."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import GaussianSmoothing
    assert torch.equal(gaussian_kernel(), GaussianSmoothing().weight)
    e = np.exp(-1.0)
    one_d = torch.tensor([e, 1.0, e]) / (1 + 2 * e)  # [0.211942, 0.576117, 0.211942]
    torch.testing.assert_close(gaussian_kernel()[0, 0], (one_d[:, None] * one_d[None]).float(), atol=1e-7, rtol=0)
    with torch.device("meta"):
        models = {"sd1": SimpleNamespace(unet=UNetModel(SD1)), "sdxl": SimpleNamespace(unet=UNetModel(SDXL))}
    for name, model in models.items():
        for h, w in ((512, 512), (768, 512), (1024, 1024), (128, 128), (520, 776)):
            assert default_attn_res(model, (h // 8, w // 8)) == (-(-h // 32), -(-w // 32)), (name, h, w)
    assert len(map_layers(models["sd1"], (64, 64), (16, 16))) == 5  # the paper's 16 x 16: 2 down + 3 up at 512^2
    assert default_attn_res(tiny, (16, 16)) == (8, 8)
    assert [tiny.unet.hook_info(n).place for n in map_layers(tiny, (16, 16), (8, 8))] == ["up"] * 3 + ["down"] * 2


def test_matches_diffusers_on_tiny(tiny):
    """A batch of two prompts on sdlens-tiny (each excited separately), the default maps (8 x 8), 6 DDIM
    steps: gradient steps on steps 0-3, iterative refinement at steps 0 and 3. Measured: max image
    difference 2.9e-5; 1.2e-5 when every attention layer of ours takes the explicit softmax path, as
    diffusers' processor makes them all do (the rest: SDPA's rounding, amplified by steps of ~20)."""
    from diffusers import StableDiffusionAttendAndExcitePipeline
    folder = os.path.join(os.path.dirname(sdlens.__file__), "weights", "sdlens-tiny")
    pipe = StableDiffusionAttendAndExcitePipeline.from_pretrained(folder, safety_checker=None,
                                                                  torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = [TWO, "a green star above a yellow triangle"]
    words = [["circle", "square"], ["star", "triangle"]]
    assert token_indices(tiny, prompts, words) == [[3, 8], [3, 7]]
    kw = dict(steps=6, guidance_scale=7.5, latents=noise(2), output="tensor", progress=False)
    ae = dict(thresholds={0: 0.9, 3: 0.95}, max_iter_to_alter=4)
    ours, calls = unet_calls(tiny, lambda: attend_and_excite(tiny, prompts, words, **ae, **kw))
    ref = pipe(prompts, token_indices=[[3, 8], [3, 7]], num_inference_steps=6, guidance_scale=7.5, latents=noise(2),
               output_type="pt", attn_res=(8, 8), **ae).images
    plain = tiny.generate(prompts, **kw)
    diff = (ours - ref).abs().max().item()
    print(f"tiny: max |ours - diffusers| {diff:.2e}, |ours - plain| {(ours - plain).abs().max():.3f}; calls {calls}")
    assert calls.count(1) > 2 * 4  # more grad forwards than one per prompt and altered step: refinement ran
    assert (ours - plain).abs().max() > 0.1  # the gradient steps changed the images
    assert diff < 1e-4


def test_matches_diffusers_on_sd1_random(sd1_fixture):
    """The random SD 1.5 topology at 128^2 (latent 16: 16 x 16 maps at level 0, diffusers' default
    attn_res), 5 steps, 20 refinement iterations at step 0 (random weights barely move the maps).
    Measured: max image difference 4.9e-6."""
    sd = sdlens.load(sd1_fixture["folder"])
    pipe = ae_pipeline(sd1_fixture["pipe"])
    kw = dict(steps=5, guidance_scale=7.5, latents=noise(), output="tensor", progress=False, height=128, width=128)
    ae = dict(thresholds={0: 0.5}, max_iter_to_alter=3)
    ours, calls = unet_calls(sd, lambda: attend_and_excite(sd, TWO, ["circle", "square"], attn_res=16, **ae, **kw))
    ref = pipe(TWO, token_indices=[3, 8], num_inference_steps=5, guidance_scale=7.5, latents=noise(), output_type="pt",
               height=128, width=128, **ae).images
    plain = sd.generate(TWO, **kw)
    diff = (ours - ref).abs().max().item()
    print(f"sd1 random: max |ours - diffusers| {diff:.2e}, |ours - plain| {(ours - plain).abs().max():.3f}")
    # step 0: the forward, 19 more refinement iterations (the first reuses it), the final forward; steps 1, 2
    assert calls.count(1) == 1 + 19 + 1 + 2
    assert (ours - plain).abs().max() > 0.01 and ours.std() > 0.05
    assert diff < 1e-4


def test_nothing_to_do_is_a_plain_run(tiny):
    """No altered step and no refinement: exactly `generate`, without a single extra UNet call."""
    kw = dict(steps=4, latents=noise(), output="tensor", progress=False)
    ours, calls = unet_calls(tiny, lambda: attend_and_excite(tiny, TWO, "circle", max_iter_to_alter=0, thresholds={},
                                                             **kw))
    assert torch.equal(ours, tiny.generate(TWO, **kw)) and calls == [2] * 4


def test_runs_on_sdxl(sdxl_fixture):
    """No reference exists for SDXL (diffusers' pipeline is SD only): the context's added-conditioning row
    travels with the conditional rows, and the default maps are 1/32 of the image, here 4 x 4 at 128^2:
    SDXL's deepest level, its middle block included (6 down, 3 mid, 9 up transformer blocks)."""
    sd = sdlens.load(sdxl_fixture["folder"])
    assert default_attn_res(sd, (16, 16)) == (4, 4)
    places = [sd.unet.hook_info(n).place for n in map_layers(sd, (16, 16), (4, 4))]
    assert places == ["up"] * 9 + ["down"] * 6 + ["mid"] * 3
    kw = dict(steps=3, latents=noise(), height=128, width=128, output="tensor", progress=False)
    ours, calls = unet_calls(sd, lambda: attend_and_excite(sd, TWO, ["circle", "square"], thresholds={0: 0.5}, **kw))
    assert calls == [1] * 21 + [2] + [1, 2, 1, 2]
    assert (ours - sd.generate(TWO, **kw)).abs().max() > 1e-3


# ---- hooks under autograd ----

@pytest.fixture(scope="module")
def tiny64(tiny):
    """sdlens-tiny's UNet in float64, for finite differences."""
    return copy.deepcopy(tiny.unet).double()


def directional(f, x, v, eps=1e-5):
    """(f(x + eps v) - f(x - eps v)) / 2 eps: the derivative of f along v, to O(eps^2)."""
    with torch.no_grad():
        return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def test_record_keeps_the_graph(tiny64):
    """`record(detach=False)` keeps what it records in the autograd graph: the gradient of a function of
    recorded probabilities is the finite difference; `detach=True` (the default) records constants."""
    unet = tiny64
    name = unet.hook_names(kind="cross_attention", point="probs")[-1]
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    x, v, ctx, w = randn(1, 4, 16, 16), randn(1, 4, 16, 16), randn(1, 77, 128), randn(1, 2, 256, 77)

    def f(x, detach=False):
        with unet.record(name, detach=detach) as store:
            unet(x, 500, ctx)
        return (store[name][0] * w).sum()

    x = x.requires_grad_()
    assert not f(x, detach=True).requires_grad  # x requires grad, but what was recorded is a constant
    grad, = torch.autograd.grad(f(x), [x])
    torch.testing.assert_close((grad * v).sum(), directional(f, x.detach(), v), rtol=1e-6, atol=1e-9)


def test_gradient_through_a_patch_is_the_hand_written_edit(tiny, tiny64):
    """A Patch (editing/patch.py: the target row's cross-attention := the source row's) and the same edit
    written as a plain hook give the same gradients with respect to the latents and the text; and the
    patched call's gradient is its finite difference (float64)."""
    g = torch.Generator().manual_seed(1)
    # weight: a one-step table (step 0 is the context's). weight=None, "always on", fails in the built-in
    # ops today (`copy` computes None != 0); a fix is proposed with this test.
    patch = [Patch(at={"kind": "cross_attention", "point": "probs"}, weight=torch.ones(1), read="source",
                   write="target")]

    def by_hand(p, hook):
        out = p.clone()
        out[1] = p[0]
        return out

    rows = StepContext(rows={"source": [0], "target": [1]})
    for unet, dtype in ((tiny.unet, torch.float32), (tiny64, torch.float64)):
        sd = SimpleNamespace(unet=unet, device=torch.device("cpu"), scheduler=tiny.scheduler)
        x = torch.randn(2, 4, 16, 16, generator=g, dtype=dtype)
        ctx = torch.randn(2, 77, 128, generator=g, dtype=dtype)
        r = torch.randn(2, 4, 16, 16, generator=g, dtype=dtype)

        def loss(x, ctx, edit):
            with unet.step_context(rows), edit():
                return (unet(x, 500, ctx) * r).sum()

        patched = lambda: apply(sd, patch)
        hand = lambda: unet.hooks({n: by_hand for n in unet.hook_names(kind="cross_attention", point="probs")})
        grads = {}
        for label, edit in (("patch", patched), ("hand", hand), ("none", lambda: unet.hooks({}))):
            xs = (x.clone().requires_grad_(), ctx.clone().requires_grad_())
            with torch.enable_grad():
                grads[label] = torch.autograd.grad(loss(*xs, edit), xs)
        for a, b in zip(grads["patch"], grads["hand"]):
            assert torch.equal(a, b)
        assert (grads["patch"][1][1] - grads["none"][1][1]).abs().max() > 1e-3  # the edit changed the target's gradient
        if dtype == torch.float64:
            v = torch.randn(2, 4, 16, 16, generator=g, dtype=dtype)
            fd = directional(lambda y: loss(y, ctx, patched), x, v)
            torch.testing.assert_close((grads["patch"][0] * v).sum(), fd, rtol=1e-6, atol=1e-9)


# ---- bad input ----

@pytest.mark.parametrize("kw, err, says", [
    (dict(words="triangle"), ValueError, "words: word 'triangle' is not in the prompt"),
    (dict(words=9), ValueError, "words: word index 9"),
    (dict(words=[]), ValueError, "words"),
    (dict(words=3.5), TypeError, "words"),
    (dict(words=[["circle"], ["square"]]), ValueError, "words"),
    (dict(thresholds=[0.5]), TypeError, "thresholds"),
    (dict(thresholds={0: 1.5}), ValueError, "thresholds"),
    (dict(thresholds={-1: 0.5}), ValueError, "thresholds"),
    (dict(max_iter_to_alter=-1), ValueError, "max_iter_to_alter"),
    (dict(scale_factor="20"), TypeError, "scale_factor"),
    (dict(attn_res=32), ValueError, "attn_res"),
    (dict(attn_res=(8, 8, 8)), TypeError, "attn_res"),
    (dict(attn_res=1), ValueError, "attn_res"),
    (dict(sampler="euler_ancestral"), TypeError, "sampler"),
    (dict(prepare=lambda *a: None), TypeError, "prepare"),
    (dict(prompt=3), TypeError, "prompt"),
])
def test_bad_input_says_what(tiny, kw, err, says):
    args = dict(prompt=TWO, words=["circle", "square"], steps=2, progress=False) | kw
    with pytest.raises(err, match=says):
        attend_and_excite(tiny, args.pop("prompt"), args.pop("words"), **args)


# ---- the claim on sdlens-tiny ----
# Criterion fixed before the decisive run (see the test's docstring). tiny was trained on two-object
# captions "a <colour> <shape> next to / above a <colour> <shape>" (tiny/scenes.py, 30% of scenes), and
# on those it rarely drops an object (exploration, seeds 100-115: both colours present 16/16, five of
# those prompts with "a orange" for "an orange"). The
# paper's own prompts join the subjects with "and" ("a cat and a dog"), which tiny never saw: there it
# draws one object (both present in 4/16), the neglect Attend-and-Excite is for.
# Run at 30 steps since 2026-12-06 (measured before the switch with this criterion): the same verdict
# with the same margin, both present 1/6 with it and 1/6 without (50: 2/6 and 2/6; 40: 2/6 and 2/6;
# 20: 2/6 and 1/6, one image from flipping, so not 20).
CLAIM_SEEDS, CLAIM_STEPS = range(6), 30


def and_prompt(seed):
    """"a/an <colour> <shape> and a/an <colour> <shape>": two distinct colours (each object is known by
    its colour) and two distinct shapes, drawn with random.Random(seed) from tiny/scenes.py's lists."""
    from sdlens.tiny.scenes import COLORS, SHAPES
    rng = random.Random(seed)
    (c1, c2), (s1, s2) = rng.sample(list(COLORS), 2), rng.sample(SHAPES, 2)
    art = lambda w: ("an " if w[0] in "aeiou" else "a ") + w
    return f"{art(c1 + ' ' + s1)} and {art(c2 + ' ' + s2)}", [(c1, s1), (c2, s2)]


def present(img, colour):
    """The object of `colour` is in the image: its palette colour covers >= 10 pixels (tiny/checker.py's
    labels and MIN_AREA)."""
    from sdlens.tiny.checker import MIN_AREA, NAMES, label_pixels
    return bool((label_pixels(np.asarray(img)) == NAMES.index(colour)).sum() >= MIN_AREA)


@pytest.fixture(scope="module")
def claim_runs(tiny):
    rows, prompts = [], [and_prompt(seed) for seed in CLAIM_SEEDS]
    # the plain runs in one batch, each row from its own seed's noise (as one call per seed)
    plains = tiny.generate([p for p, _ in prompts], steps=CLAIM_STEPS, seed=list(CLAIM_SEEDS), progress=False)
    for seed, (prompt, objects), plain in zip(CLAIM_SEEDS, prompts, plains):
        excited = attend_and_excite(tiny, prompt, [s for _, s in objects], steps=CLAIM_STEPS, seed=seed, progress=False)[0]
        rows.append((prompt, [present(plain, c) for c, _ in objects], [present(excited, c) for c, _ in objects]))
    return rows


@pytest.mark.xfail(strict=True, reason="measured false on sdlens-tiny (50 steps; 1/6 each at the test's 30): both objects present 2/6 with "
                   "Attend-and-Excite, 2/6 without; it brought one missing object (seed 2) and lost another (seed 3)")
def test_claim_neglected_object_appears_more_often(claim_runs):
    """Attend-and-Excite makes the neglected object of a two-object prompt appear more often than plain
    `generate` from the same seeds.

    Criterion, fixed before the decisive run: seeds 0-5, `and_prompt(seed)`, 50 DDIM steps, w 7.5, every
    Attend-and-Excite default (the two shape nouns excited, as the paper excites the subject nouns; 8 x 8
    maps). Both objects are present (`present`) in at least 2 more of the 6 images with Attend-and-Excite
    than without. Exploration (seeds 100-115, before): both present 6/16 with it, 4/16 without (16 x 16
    maps: 4/16; exciting the colour words too: 5/16; 20 steps: 2/16); it often brings the missing object
    and loses the other.

    Decisive run (criterion fixed first, 50 steps): FALSE on sdlens-tiny, 2/6 both present with it, 2/6 without.
    Seed 2 ("a red circle and a cyan square"): the missing red circle appears; seed 3 ("a yellow square
    and an orange star"): the orange star, present without, is lost; seeds 0, 4, 5 miss the same object
    either way (the second: cyan circle, blue triangle, purple star). On tiny the loss is met without the
    object: the neglected noun's 8 x 8 map reaches a maximum of ~1 within a few steps while its colour never
    appears (seed 100: 0.29 -> 0.99 by step 2, the blue star absent), and on the 16 x 16 maps the maxima stay
    near 0.02-0.5 through every refinement. strict: a change that makes it hold must remove this mark."""
    both = lambda i: sum(all(r[i]) for r in claim_runs)
    excited, plain = both(2), both(1)
    print(f"both objects present: Attend-and-Excite {excited}/{len(claim_runs)}, plain {plain}/{len(claim_runs)}; "
          f"{claim_runs}")
    assert excited - plain >= 2
