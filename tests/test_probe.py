"""Linear probes (features/probe.py) and the scene labels they learn (tiny/labels.py).

- The machinery on cases with a known answer: a feature that is the label reaches mIoU 1, a constant
  feature predicts the majority class (hand-computed mIoU), ridge weights equal numpy's least squares.
- The labels against the renderer: every pixel painted in an object's colour has that object's class.
- The command writes sweep.csv / sweep.png with one row per hook and baseline; bad input exits 2.
- What was measured on sdlens-tiny (see CLAIM below).
"""
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdlens.__main__ as main_cli
import sdlens.features.cli as features_cli
from sdlens.features.probe import (Probe, fit_ridge, miou, probe_names, probe_score, probe_sweep,
                                   random_unet, sample_pixels)
from sdlens.tiny.labels import CLASSES, label_map, labelled_scenes
from sdlens.tiny.scenes import COLORS, SHAPES, SIZE, scene_from


# --- the machinery, on known answers --------------------------------------------------------------

def test_ridge_equals_numpy_least_squares():
    g = torch.Generator().manual_seed(0)
    X, Y, lam = torch.randn(200, 7, generator=g).double(), torch.randn(200, 3, generator=g).double(), 0.05
    W, b = fit_ridge(X, Y, lam)
    Xc, Yc = (X - X.mean(0)).numpy(), (Y - Y.mean(0)).numpy()
    n = len(X)
    closed = np.linalg.solve(Xc.T @ Xc + n * lam * np.eye(7), Xc.T @ Yc)  # the normal equations
    aug = np.linalg.lstsq(np.vstack([Xc, math.sqrt(n * lam) * np.eye(7)]),  # ridge as plain least squares
                          np.vstack([Yc, np.zeros((7, 3))]), rcond=None)[0]
    np.testing.assert_allclose(W.numpy(), closed, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(W.numpy(), aug, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), Y.mean(0).numpy() - X.mean(0).numpy() @ closed, atol=1e-12)


def test_miou_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 2]])
    m, ious = miou(pred, labels, 5)
    # background: 3 right / (4 true + 4 predicted - 3) = 3/5; circle 2/3; square 1/2; classes 3, 4 absent: skipped
    assert ious[:3] == pytest.approx([3 / 5, 2 / 3, 1 / 2]) and all(math.isnan(v) for v in ious[3:])
    assert m == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 3)


def test_a_feature_that_is_the_label_reaches_miou_1():
    _, lab, _ = labelled_scenes(range(16))
    lab = torch.as_tensor(lab).long()
    assert set(lab[:12].unique().tolist()) == set(range(len(CLASSES)))  # a class never trained on is never predicted
    onehot = F.one_hot(lab, len(CLASSES)).permute(0, 3, 1, 2).float()
    m, ious = probe_score(onehot[:12], lab[:12], onehot[12:], lab[12:], len(CLASSES))
    assert m == 1.0, ious


def test_a_constant_feature_predicts_the_majority_class():
    train = torch.zeros(2, 4, 4, dtype=torch.long)
    train[:, :2, :1] = 1  # 2 of 16 pixels per image are circle: background is the majority
    test = torch.zeros(1, 4, 4, dtype=torch.long)
    test[0, 0, :] = 1  # 4 circle pixels
    test[0, 3, 3] = 4  # 1 star pixel
    const = torch.full((3, 2, 4, 4), 0.7)
    m, ious = probe_score(const[:2], train, const[2:], test, 5)
    # everything predicted background: IoU 11/16; circle and star 0; square and triangle absent
    assert ious[0] == pytest.approx(11 / 16) and ious[1] == 0 and ious[4] == 0
    assert m == pytest.approx((11 / 16) / 3)


def test_probe_scores_on_the_map_equal_scores_of_upsampled_features():
    """Scoring the hook's own map and upsampling the class scores (what the sweep does at test time) equals
    upsampling the features first; sample_pixels reads F.interpolate's values (what training sees)."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 6, 8, 8, generator=g)
    up = F.interpolate(f, size=(64, 64), mode="bilinear", align_corners=False)
    ys, xs = torch.randint(0, 64, (2, 50), generator=g), torch.randint(0, 64, (2, 50), generator=g)
    want = torch.stack([up[i, :, ys[i], xs[i]].T for i in range(2)])
    torch.testing.assert_close(sample_pixels(f, ys, xs, (64, 64)), want, atol=1e-5, rtol=1e-5)
    p = Probe(torch.randn(6, 5, generator=g), torch.randn(5, generator=g), torch.randn(6, generator=g),
              torch.rand(6, generator=g) + 0.5)
    direct = torch.einsum("nchw,ck->nkhw", (up - p.mean[:, None, None]) / p.std[:, None, None], p.weight)
    torch.testing.assert_close(p.scores(f, (64, 64)), direct + p.bias[:, None, None], atol=1e-4, rtol=1e-4)


def test_bad_arguments_name_themselves(tiny):
    for kwargs, word in ((dict(task="depth"), "task"), (dict(n_train=1), "n_train"), (dict(ts=(261, 261)), "ts"),
                         (dict(ts=(1000,)), "t must"), (dict(kinds=("resblok",)), "kinds")):
        with pytest.raises(ValueError, match=word):
            probe_sweep(tiny, **kwargs)
    with pytest.raises(ValueError, match="lam"):
        fit_ridge(torch.ones(3, 1), torch.ones(3, 1), 0)


# --- the labels, against the renderer -------------------------------------------------------------

def test_labels_follow_the_rendered_geometry():
    sc = scene_from("circle", "red", "big", "center", seed=3)
    lab = label_map(sc)
    r = sc.objects[0].radius * SIZE
    # PIL fills the ellipse's pixels whose centres lie within about half a pixel of it: allow that band
    assert abs((lab == 1).sum() - math.pi * r * r) <= math.pi * r, ((lab == 1).sum(), math.pi * r * r)
    cx, cy = (int(v * SIZE) for v in sc.objects[0].xy)
    assert lab[cy, cx] == 1 and lab[0, 0] == lab[0, -1] == lab[-1, 0] == lab[-1, -1] == 0
    sq = label_map(scene_from("square", "blue", "big", "left", seed=4))
    side = 2 * 0.85 * scene_from("square", "blue", "big", "left", seed=4).objects[0].radius * SIZE
    assert abs((sq == 2).sum() - side ** 2) <= 2 * side + 1  # a one-pixel band along two edges at most
    assert set(np.unique(sq)) == {0, 2}


def test_every_pixel_in_an_objects_colour_has_its_class():
    """Backgrounds and their textures never take a saturated object colour (scenes.py's palette), so
    the rendered image itself says which object covers each pixel: the label map must agree exactly."""
    images, labels, scenes = labelled_scenes(range(100, 140))
    assert any(len(s.objects) == 2 for s in scenes)
    for img, lab, sc in zip(images, labels, scenes):
        rgb = np.asarray(img)
        want = np.zeros((SIZE, SIZE), np.uint8)
        for o in sc.objects:
            want[(rgb == COLORS[o.color]).all(-1)] = 1 + SHAPES.index(o.shape)
        np.testing.assert_array_equal(lab, want)


# --- the command ----------------------------------------------------------------------------------

def run(argv, capsys):
    try:
        rc = main_cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, capsys.readouterr().err.strip()


def test_sweep_writes_csv_and_heatmap(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, err = run(["features", "sweep", "--scenes", 2, "--t", 261, 801, "--kinds", "block", "cross_q",
                   "--out", out], capsys)
    assert rc == 0, err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    hooks = probe_names(tiny.unet, ["block", "cross_q"])
    assert [(r["hook"], r["t"]) for r in rows] == [(h, t) for h in hooks for t in ("261", "801")] + \
        [("pixels", ""), ("latents", "")]
    assert list(rows[0]) == ["hook", "kind", "t", "miou"] + [f"iou_{c}" for c in CLASSES]
    assert {r["kind"] for r in rows} == {"block", "cross_q", "baseline"}
    assert all(0 <= float(r["miou"]) <= 1 for r in rows)
    with Image.open(out / "sweep.png") as im:
        assert im.width > 100 and im.height > 14 * len(hooks)


@pytest.mark.parametrize("args, says", [
    (["--t", "1000"], "timestep"), (["--t", "5", "5"], "twice"), (["--kinds", "resblok"], "invalid choice"),
    (["--scenes", "1"], "at least 2"), (["--task", "depth"], "invalid choice"), (["--t", "x"], "whole number")])
def test_sweep_bad_input_exits_2_before_loading(args, says, tmp_path, capsys, monkeypatch):
    def tripwire(args):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(features_cli, "load_model", tripwire)
    rc, err = run(["features", "sweep", "--out", tmp_path / "o"] + args, capsys)
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# --- what was measured on sdlens-tiny -------------------------------------------------------------
# CLAIM, fixed from the exploration run (bench/probe_sweep_on_tiny.py --seed 0, 32 + 32 scenes) and
# committed before the decisive run on held-out scenes, noise and training pixels (seed 1):
# at t = 101 (the exploration's best t), over the kinds below,
#  (i) the trained UNet's best hook beats the raw-pixel and VAE-latent probes and the random-weights
#      UNet's best hook by >= 0.2 mIoU (exploration: 0.571 against 0.187, 0.208 and 0.234);
#  (ii) the best block output beats the best self-attention q / k / v and the best cross-attention q
#      by >= 0.1 mIoU (exploration: 0.571 against 0.376 and 0.391): on tiny, the conventional feature
#      wins, unlike Meng et al. 2024's choice of attention queries and keys for SD 1.5;
#  (iii) q, k and v of one self-attention layer score within 0.02 of each other: each is an invertible
#      linear map (heads x head_dim = channels) of the same normalised input, so a linear probe sees
#      the same information in all three (exploration: within 0.005).
CLAIM_SEED, CLAIM_T, CLAIM_SCENES = 1, 101, 32
CLAIM_KINDS = ("resblock", "block", "self_q", "self_k", "self_v", "cross_q")


def test_claim_trained_features_beat_baselines_and_blocks_beat_attention(tiny):
    run_args = dict(ts=(CLAIM_T,), kinds=CLAIM_KINDS, n_train=CLAIM_SCENES, n_test=CLAIM_SCENES, seed=CLAIM_SEED)
    rows = probe_sweep(tiny, **run_args)
    random_rows = probe_sweep(random_unet(tiny, seed=CLAIM_SEED), baselines=False, **run_args)
    score = {r["hook"]: r["miou"] for r in rows}
    best = {k: max(r["miou"] for r in rows if r["kind"] == k) for k in CLAIM_KINDS}
    top = max(best.values())
    random_top = max(r["miou"] for r in random_rows)
    print(f"best {top:.3f} pixels {score['pixels']:.3f} latents {score['latents']:.3f} random {random_top:.3f}", best)
    assert top >= max(score["pixels"], score["latents"], random_top) + 0.2
    assert best["block"] >= max(best["self_q"], best["self_k"], best["self_v"], best["cross_q"]) + 0.1
    layers = {}
    for n in tiny.unet.hook_names(kind="self_attention"):
        info = tiny.unet.hook_info(n)
        if info.point in ("q", "k", "v"):
            layers.setdefault(info.module, []).append(score[n])
    assert len(layers) == 11 and all(len(v) == 3 for v in layers.values())
    for module, trio in layers.items():
        assert max(trio) - min(trio) <= 0.02, (module, trio)
