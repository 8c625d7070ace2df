"""MasaCtrl: exact behaviour against plain runs and hand computations of the official formulas,
the layer mapping, real images through every inversion, bad input, and the claim on sdlens-tiny."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdlens
from sdlens.__main__ import main
from sdlens.editing import PromptToPrompt, invert_image
from sdlens.editing.masactrl import MaskGuide, MasaCtrl, default_start_layer, self_attention_layers
from sdlens.editing.patch import apply
from sdlens.hooks import StepContext
from sdlens.pipeline import to_pil

SRC, TGT = "a big red circle on the left", "a big star on the left"
STEPS = 6


def noise(seed=0):
    return torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))


def model_outputs(sd, run):
    """Run `run()` recording the UNet's output at every call -> [steps, rows, C, h, w]."""
    name = sd.unet.hook_names(kind="model")[0]
    with sd.unet.record(name) as rec:
        out = run()
    return out, torch.stack(rec[name])


def test_layers_are_counted_in_execution_order(tiny, sd1_fixture):
    """hook_names order = the order the forward pass calls attn1; SD's 16 layers map start_layer 10
    (official) to the decoder's two finest resolutions, and so does the default on every UNet."""
    for sd in (tiny, sdlens.load(sd1_fixture["folder"])):
        called = []
        names = sd.unet.hook_names(kind="self_attention", point="k")
        with sd.unet.hooks({n: lambda x, hook: called.append(hook.info.module) for n in names}):
            f = sd.latent_factor
            sd.unet(torch.zeros(1, 4, sd.default_size // f, sd.default_size // f), 500, sd.encode_prompt([""]))
        assert called == self_attention_layers(sd)
        infos = [sd.unet.hook_info(n) for n in names]
        first = default_start_layer(sd)
        assert all(i.place == "up" and i.level <= 1 for i in infos[first:])
        assert not any(i.place == "up" and i.level <= 1 for i in infos[:first])
    assert (len(names), first) == (16, 10)  # SD 1.x topology: the official numbers
    assert (len(self_attention_layers(tiny)), default_start_layer(tiny)) == (11, 5)


@pytest.mark.parametrize("kw", [dict(start_step=STEPS), dict(start_layer=11)])
def test_no_step_or_no_layer_is_a_plain_run(tiny, kw):
    res = MasaCtrl(tiny, SRC, TGT, steps=STEPS, **kw).run(latents=noise(), progress=False)
    plain = tiny.generate([SRC, TGT], latents=noise().expand(2, -1, -1, -1), steps=STEPS, output="tensor",
                          progress=False)
    assert torch.equal(res.images, plain)  # the same batch layout: bit for bit


def test_target_is_plain_before_start_step_and_below_start_layer(tiny):
    """Model outputs: equal to the plain run's before start_step, the target's differ from it on.
    At start_step itself, the attn1 outputs below start_layer are the plain run's."""
    start_step, start_layer = 2, 5
    editor = MasaCtrl(tiny, SRC, TGT, steps=STEPS, start_step=start_step, start_layer=start_layer)
    outs = tiny.unet.hook_names(kind="self_attention", point="out")
    with tiny.unet.record(lambda n: n in outs) as attn:
        res, eps = model_outputs(tiny, lambda: editor.run(latents=noise(), progress=False))
    with tiny.unet.record(lambda n: n in outs) as attn_plain:
        plain, eps_plain = model_outputs(tiny, lambda: tiny.generate(
            [SRC, TGT], latents=noise().expand(2, -1, -1, -1), steps=STEPS, output="tensor", progress=False))
    # rows: uncond src, uncond tgt, cond src, cond tgt
    assert torch.equal(eps[:start_step], eps_plain[:start_step])
    assert all((eps[s, [1, 3]] - eps_plain[s, [1, 3]]).abs().max() > 1e-3 for s in range(start_step, STEPS))
    assert torch.equal(eps[:, [0, 2]], eps_plain[:, [0, 2]])  # the source row is never edited
    assert torch.equal(res.images[0], plain[0])
    for i, name in enumerate(outs):  # hook order = execution order (test above)
        same = torch.equal(attn[name][start_step], attn_plain[name][start_step])
        assert same == (i < start_layer), name


def test_mutual_attention_is_target_queries_on_source_keys_values(tiny):
    """One UNet call at an edited step: at an edited layer, the target rows' attention output is
    to_out(softmax(q_t k_s^T / sqrt(d)) v_s), computed by hand, for both halves (official
    masactrl.py:63-70); the source rows' is their own attention."""
    editor = MasaCtrl(tiny, SRC, TGT, steps=STEPS, start_step=0)
    layer = self_attention_layers(tiny)[7]
    pts = {p: tiny.unet.hook_names(kind="self_attention", point=p) for p in ("q", "k", "v", "out")}
    pick = lambda p: next(n for n in pts[p] if tiny.unet.hook_info(n).module == layer)
    ctx = torch.cat([tiny.encode_prompt(["", ""]), tiny.encode_prompt([SRC, TGT])])
    x = noise().expand(4, -1, -1, -1)
    rows = {"uncond": [0, 1], "cond": [2, 3], "source": [2], "target": [3], "uncond_source": [0], "uncond_target": [1]}
    with tiny.unet.record(lambda n: n in [pick(p) for p in ("q", "k", "v")]) as seen:  # before the swap
        with apply(tiny, editor.patches()), tiny.unet.step_context(StepContext(3, 500, STEPS, rows)):
            with tiny.unet.record(pick("out")) as got:
                tiny.unet(x, 500, ctx)
    q, k, v = (seen[pick(p)][0] for p in ("q", "k", "v"))
    attn = tiny.unet.get_submodule(layer)
    for src, tgt in ((0, 1), (2, 3)):
        p = torch.einsum("hid,hjd->hij", q[tgt], k[src]) * q.shape[-1] ** -0.5
        o = torch.einsum("hij,hjd->hid", p.softmax(-1), v[src])
        want = attn.to_out(o.permute(1, 0, 2).reshape(o.shape[1], -1))
        torch.testing.assert_close(got[pick("out")][0][tgt], want, atol=1e-5, rtol=1e-5)
        p = torch.einsum("hid,hjd->hij", q[src], k[src]) * q.shape[-1] ** -0.5
        o = torch.einsum("hij,hjd->hid", p.softmax(-1), v[src])
        torch.testing.assert_close(got[pick("out")][0][src], attn.to_out(o.permute(1, 0, 2).reshape(o.shape[1], -1)),
                                   atol=1e-5, rtol=1e-5)


def official_masked(q_t, k_s, v_s, maps_s, maps_t, thres, res):
    """masactrl.py:241-257 and :300-328 for one target half, per head: q [h, n, d]; maps [16, 16]."""
    norm = lambda m: (m - m.min()) / (m.max() - m.min())
    mask = F.interpolate(norm(maps_s)[None, None], (res, res)).flatten()
    mask = (mask >= thres).float()
    sim = torch.einsum("hid,hjd->hij", q_t, k_s) * q_t.shape[-1] ** -0.5
    low = torch.finfo(sim.dtype).min
    fg = (sim + mask.masked_fill(mask == 0, low)).softmax(-1) @ v_s
    bg = (sim + mask.masked_fill(mask == 1, low)).softmax(-1) @ v_s
    spatial = (F.interpolate(norm(maps_t)[None, None], (res, res)).reshape(-1, 1) >= thres).float()
    return fg * spatial + bg * (1 - spatial)


def test_mask_guided_attention_is_the_official_formula(tiny):
    """Mask-guided, one UNet call: the cross-attention maps of 16x16 queries kept so far in the call
    (recorded here independently) give the source's and the target's word masks, and the target's
    output at each edited layer is the official fg/bg mix; checked at a 16x16 and an 8x8 layer."""
    editor = MasaCtrl(tiny, SRC, TGT, steps=STEPS, start_step=0, mask_word=("circle", "star"))
    guide = MaskGuide(tiny, editor.tokens, editor.threshold, editor.start_step, (16, 16))
    src_tok, tgt_tok = editor.tokens
    layers = self_attention_layers(tiny)
    cross = tiny.unet.hook_names(kind="cross_attention", point="probs")
    pts = {p: {tiny.unet.hook_info(n).module: n for n in tiny.unet.hook_names(kind="self_attention", point=p)}
           for p in ("q", "k", "v", "out")}
    maps = []

    def keep_cross(p, hook):
        if p.shape[-2] == 256:
            maps.append(p.mean(1))
    ctx = torch.cat([tiny.encode_prompt(["", ""]), tiny.encode_prompt([SRC, TGT])])
    rows = {"uncond": [0, 1], "cond": [2, 3], "source": [2], "target": [3], "uncond_source": [0], "uncond_target": [1]}
    snap = {}
    with tiny.unet.record(lambda n: n in list(pts["q"].values()) + list(pts["k"].values()) + list(pts["v"].values())) as seen:
        with apply(tiny, editor.patches()), tiny.unet.hooks(guide.hooks(layers[editor.start_layer:])), \
                tiny.unet.step_context(StepContext(3, 500, STEPS, rows)):
            obs = {n: keep_cross for n in cross}
            obs.update({pts["out"][m]: (lambda o, hook, m=m: snap.__setitem__(m, (o, len(maps)))) for m in layers})
            with tiny.unet.hooks(obs):
                tiny.unet(noise().expand(4, -1, -1, -1), 500, ctx)
    for m in (layers[5], layers[8]):  # output_blocks.3 (8x8), output_blocks.6 (16x16)
        out, n_maps = snap[m]
        assert n_maps >= 2
        agg = torch.stack(maps[:n_maps]).mean(0).reshape(4, 16, 16, -1)
        q, k, v = (seen[pts[p][m]][0] for p in ("q", "k", "v"))
        res = int(q.shape[2] ** 0.5)
        attn = tiny.unet.get_submodule(m)
        for s, t in ((0, 1), (2, 3)):
            o = official_masked(q[t], k[s], v[s], agg[2][..., src_tok].sum(-1), agg[3][..., tgt_tok].sum(-1), 0.1, res)
            want = attn.to_out(o.permute(1, 0, 2).reshape(o.shape[1], -1))
            torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)
        plain = (torch.einsum("hid,hjd->hij", q[3], k[2]) * q.shape[-1] ** -0.5).softmax(-1) @ v[2]
        assert not torch.allclose(out[3], attn.to_out(plain.permute(1, 0, 2).reshape(q.shape[2], -1)), atol=1e-4)


@pytest.mark.parametrize("method", ["ddim", "null-text", "negative-prompt", "direct"])
def test_real_image_source_row_follows_every_inversion_as_in_p2p(tiny, method):
    """The source row consumes the Inversion exactly as Prompt-to-Prompt's does (editing/batch.py):
    P2P with no edit gives the same source image; direct puts it back on the trajectory (z_0)."""
    from sdlens.tiny.scenes import render, scene_from
    image = render(scene_from("circle", "red", "big", "left", seed=1), random.Random(1))
    inv = invert_image(tiny, image, SRC, method, STEPS, progress=False)
    res = MasaCtrl(tiny, SRC, TGT, steps=STEPS, start_step=1).run(inversion=inv, progress=False)
    ref = PromptToPrompt(tiny, SRC, [TGT], mode="refine", cross_replace_steps=0.0, self_replace_steps=0.0, steps=STEPS).run(
        inversion=inv, progress=False)
    torch.testing.assert_close(res.images[0], ref.images[0], atol=1e-4, rtol=0)
    assert (res.images[1] - ref.images[1]).abs().max() > 1e-2  # the target was edited
    if method == "direct":
        assert torch.equal(res.latents[0], inv.latents[0][0])


@pytest.mark.parametrize("kw, name", [
    (dict(start_step=-1), "start_step"), (dict(start_step=STEPS + 1), "start_step"), (dict(start_step=1.5), "start_step"),
    (dict(start_step=True), "start_step"), (dict(start_layer=-1), "start_layer"), (dict(start_layer=12), "start_layer"),
    (dict(start_layer="10"), "start_layer"), (dict(steps=0), "steps"), (dict(mask_word="dog"), "mask_word"),
    (dict(mask_word=("circle", "dog")), "mask_word"), (dict(mask_word=["a", "b", "c"]), "mask_word"),
    (dict(mask_threshold=1.5), "mask_threshold"),
])
def test_bad_arguments_name_themselves(tiny, kw, name):
    kw = {"steps": STEPS, **kw}
    with pytest.raises(ValueError, match=name):
        MasaCtrl(tiny, SRC, TGT, **kw)


def test_bad_run_arguments(tiny):
    editor = MasaCtrl(tiny, SRC, TGT, steps=STEPS)
    with pytest.raises(ValueError, match="guidance_scale"):
        editor.run(guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="latents"):
        editor.run(latents=torch.zeros(3, 4, 16, 16))
    with pytest.raises(TypeError, match="target_prompt"):
        MasaCtrl(tiny, SRC, None)


@pytest.mark.parametrize("argv, says", [
    (["--start-layer", "12"], "start_layer"), (["--start-step", "7"], "--start-step"), (["--start-step", "-1"], "negative"),
    (["--mask-word", "dog"], "mask_word"), (["--mask-word", "a", "b", "c"], "--mask-word"),
    (["--image", "missing.png"], "no such file"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, says):
    out = tmp_path / "out"
    try:
        rc = main(["masactrl", "--prompt", SRC, "--target", TGT, "--steps", str(STEPS), "--out", str(out), *argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_writes_source_and_edit(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["masactrl", "--prompt", SRC, "--target", TGT, "--steps", "3", "--start-step", "1", "--mask-word",
                 "circle", "star", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["edit.png", "source.png"]


# ---- the claim on sdlens-tiny ----
# Criterion fixed before the decisive run (exploration used seeds 100-103 at 20 steps, see the report):
# 10 seeded pairs (seeds 0-9), each "a big <colour> <shape> <position>" -> the same object with a new
# shape or a new position and NO colour word, at the official settings (50 steps, w 7.5, start_step
# 4, the default start_layer). The plain run is the target prompt from the same noise. An image's
# object colour is its most frequent palette object colour (>= 10 pixels), its background the most
# frequent palette background colour (tiny/checker.py labels).
# Suite time (issue #23): run at 15 steps, where the verdicts are the 50-step ones (measured 2026-12-06 before
# each switch: at 20 colour kept MasaCtrl 0/10, plain 1/10, still false; background 8/10 against 5/10, still
# true; at 15 colour 1/10 and 1/10, background 8/10 against 5/10; at 10 the background's flips: 7/10 and 5/10).
CLAIM_SEEDS, CLAIM_STEPS = range(10), 15


def claim_pair(seed):
    from sdlens.tiny.scenes import COLORS, POSITION_PHRASE, SHAPES
    rng = random.Random(seed)
    c, (a, b), p = rng.choice(list(COLORS)), rng.sample(SHAPES, 2), rng.choice(list(POSITION_PHRASE))
    art = lambda w: ("an " if w[0] in "aeiou" else "a ") + w
    if rng.random() < 0.5:  # a new shape
        return art(f"big {c} {a} {POSITION_PHRASE[p]}"), art(f"big {b} {POSITION_PHRASE[p]}")
    q = rng.choice([x for x in POSITION_PHRASE if x != p])  # a new position
    return art(f"big {c} {a} {POSITION_PHRASE[p]}"), art(f"big {a} {POSITION_PHRASE[q]}")


def majority(img, objects=True):
    from sdlens.tiny.checker import NAMES, label_pixels
    from sdlens.tiny.scenes import COLORS
    lab = label_pixels(np.asarray(img))
    ids = range(len(COLORS)) if objects else range(len(COLORS), len(NAMES))
    counts = {i: (lab == i).sum() for i in ids}
    best = max(counts, key=counts.get)
    return NAMES[best] if counts[best] >= 10 else None


@pytest.fixture(scope="module")
def claim_runs(tiny):
    rows, pairs = [], [claim_pair(seed) for seed in CLAIM_SEEDS]
    # the plain runs in one batch, each row from its seed's noise (as one call per seed)
    plains = tiny.generate([tgt for _, tgt in pairs], latents=torch.cat([noise(seed) for seed in CLAIM_SEEDS]),
                           steps=CLAIM_STEPS, progress=False)
    for seed, (src, tgt), p in zip(CLAIM_SEEDS, pairs, plains):
        s, e = to_pil(MasaCtrl(tiny, src, tgt, steps=CLAIM_STEPS).run(seed=seed, progress=False).images)
        rows.append([(majority(s, obj), majority(e, obj), majority(p, obj)) for obj in (True, False)])
    return rows


def kept(claim_runs, i):
    masa = sum(r[i][1] == r[i][0] for r in claim_runs)
    plain = sum(r[i][2] == r[i][0] for r in claim_runs)
    print(f"{'object colour' if i == 0 else 'background'} of the source kept: MasaCtrl {masa}/{len(claim_runs)}, "
          f"plain {plain}/{len(claim_runs)}; {claim_runs}")
    return masa, plain


@pytest.mark.xfail(strict=True, reason="measured false on sdlens-tiny (50 steps; 1/10 each at the test's 15): MasaCtrl 0/10, plain 1/10; a target "
                   "prompt without a colour word gives tiny's default red whatever the source's colour")
def test_claim_edited_object_keeps_its_colour(claim_runs):
    """Issue #15: MasaCtrl keeps the object's colour while the prompt changes its shape or position:
    kept in >= 70% of pairs, and in >= 40% more pairs than the plain run.

    Decisive run (2026, commit fa0d727, criterion fixed first): FALSE on sdlens-tiny: the edit's
    object is red (once pink) in 10/10 pairs, the plain run's in 9/10: on this model an object's
    colour comes from the text through cross-attention, which MasaCtrl leaves to the target prompt.
    Exploration (seeds 100-103, 20 steps) found the same even with every layer from step 0. The
    background, which neither prompt names, is kept (next test). strict: a fix that makes it hold
    must remove this mark."""
    masa, plain = kept(claim_runs, 0)
    n = len(claim_runs)
    assert masa >= 0.7 * n and masa - plain >= 0.4 * n


def test_claim_background_is_kept(claim_runs):
    """The content the prompts do not name (here the background) is the source's: kept in >= 70%
    of pairs, and in >= 30% more pairs than the plain run."""
    masa, plain = kept(claim_runs, 1)
    n = len(claim_runs)
    assert masa >= 0.7 * n and masa - plain >= 0.3 * n
