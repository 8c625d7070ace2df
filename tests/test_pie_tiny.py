"""PIE-tiny (editbench/tiny.py): the layout read back by the PIE-Bench reader, masks checked against
the renderer, and the metrics against formulas, torchmetrics and the rendered ground truth."""
import collections
import json
import math
import os

import numpy as np
import pytest
import torch

from sdlens.editbench.pie import GRID, load_image, make_item, mask_at, read_benchmark
from sdlens.editbench.tiny import TinyMetrics, edit_success, index_of, make_tiny, render_pair, ssim


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pie") / "tiny")
    return root, make_tiny(root)


def test_layout_and_counts(bench):
    root, made = bench
    items = read_benchmark(root)
    assert len(items) >= 60 and [i.key for i in items] == [i.key for i in made]
    counts = collections.Counter(i.editing_type_id for i in items)
    assert set(counts) == {"1", "2", "6", "8"} and min(counts.values()) >= 15
    raw = json.load(open(os.path.join(root, "mapping_file.json")))
    for it in items:
        e = raw[it.key]
        assert it.raw == e and isinstance(e["mask"], list) and isinstance(e["blended_word"], str)
        assert e["image_path"].startswith(f"{it.editing_type_id}_") and e["image_path"].endswith(".png")
        assert "[" in e["editing_prompt"] and "[" not in it.editing_prompt and it.edited_words
        assert (it.blended_word is None) == (it.editing_type_id == "8")  # set for the object edits
        img = load_image(root, it)
        assert img.size == (64, 64)
        _, _, _, src, _, (_, _, _, _, m64) = render_pair(0, index_of(it))
        assert (np.asarray(img) == np.asarray(src)).all()  # PNG: lossless
        want = m64.repeat(8, 0).repeat(8, 1)  # the renderer's mask nearest-upsampled to PIE's grid
        want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = True
        assert it.mask.shape == GRID and (it.mask == want).all()
    with pytest.raises(ValueError, match="not empty"):
        make_tiny(root)
    with pytest.raises(ValueError, match="n must be"):
        make_tiny(root + "-x", n=2)
    assert not os.path.exists(root + "-x")


def test_masks_cover_every_changed_pixel(bench):
    root, items = bench
    for it in items:
        _, _, _, src, tgt, (_, _, _, _, m64) = render_pair(0, index_of(it))
        changed = (np.asarray(src) != np.asarray(tgt)).any(-1)
        m = mask_at(it.mask, (64, 64))
        assert changed.any() and not (changed & ~m).any(), it.key
        assert (m[1:-1, 1:-1] == m64[1:-1, 1:-1]).all()  # the renderer's region, plus PIE's forced border
        if it.editing_type_id != "8":
            assert (~m).sum() > 64 * 64 / 2  # an object edit leaves most of the image as background to keep


def test_metrics_identical_and_by_hand(bench):
    root, items = bench
    it = next(i for i in items if i.editing_type_id == "6")
    src = np.asarray(load_image(root, it))
    r = TinyMetrics()(src, src, it)
    assert r["psnr_unedit_part"] == math.inf and r["mse_unedit_part"] == 0.0 and r["structure_iou"] == 1.0
    assert abs(r["ssim_unedit_part"] - 1) < 1e-4  # float32 E[x^2] - E[x]^2, as torchmetrics (which gives the same)
    m = mask_at(it.mask, (64, 64))
    inside, outside = np.argwhere(m[1:-1, 1:-1])[0] + 1, np.argwhere(~m)[0]
    tgt = src.copy()
    tgt[tuple(inside)] = 255 - tgt[tuple(inside)]  # a change inside the mask does not count
    assert TinyMetrics()(src, tgt, it)["psnr_unedit_part"] == math.inf
    tgt[outside[0], outside[1], 0] = 255 if src[outside[0], outside[1], 0] == 0 else 0
    d = abs(int(tgt[outside[0], outside[1], 0]) - int(src[outside[0], outside[1], 0])) / 255
    r = TinyMetrics()(src, tgt, it)
    assert r["mse_unedit_part"] == pytest.approx(d * d / (64 * 64 * 3), rel=1e-5)  # over all H*W*3 values
    assert r["psnr_unedit_part"] == pytest.approx(10 * math.log10(64 * 64 * 3 / (d * d)), rel=1e-5)


def test_ssim_psnr_match_torchmetrics(bench):
    tm = pytest.importorskip("torchmetrics.image")
    root, items = bench
    rng = np.random.default_rng(0)
    a = rng.random((64, 64, 3)).astype(np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    _, _, _, src, tgt, _ = render_pair(0, index_of(items[0]))
    pairs = [(a, b), (np.asarray(src, np.float32) / 255, np.asarray(tgt, np.float32) / 255)]
    t = lambda x: torch.tensor(x).permute(2, 0, 1)[None]
    for x, y in pairs:
        want = tm.StructuralSimilarityIndexMeasure(data_range=1.0)(t(x), t(y)).item()
        assert ssim(x, y) == pytest.approx(want, abs=1e-5)
    it = items[0]  # PSNR of the unedited part: both images times 1 - mask, then torchmetrics' PSNR
    keep = (~mask_at(it.mask, (64, 64)))[..., None].astype(np.float32)
    noisy = np.uint8(np.clip(np.asarray(src) + rng.normal(0, 12, a.shape), 0, 255))
    want = tm.PeakSignalNoiseRatio(data_range=1.0)(t(pairs[1][0] * keep), t(noisy / np.float32(255) * keep)).item()
    assert TinyMetrics()(src, noisy, it)["psnr_unedit_part"] == pytest.approx(want, rel=1e-5)


def test_checker_is_an_oracle(bench):
    """The rendered target (ground truth) passes and the unedited source fails, on every item; the
    object is kept in place by the ground truth of every edit but a shape change."""
    root, items = bench
    metrics = TinyMetrics()
    for it in items:
        _, _, _, src, tgt, _ = render_pair(0, index_of(it))
        r = metrics(src, tgt, it)
        assert r["edit_success"] == 1.0, (it.key, it.editing_prompt)
        assert not edit_success(np.asarray(src), it), (it.key, it.editing_prompt)
        if it.editing_type_id == "1":
            assert 0 < r["structure_iou"] < 1
        else:
            assert r["structure_iou"] == 1.0 and r["psnr_unedit_part"] == math.inf


def test_metrics_refuse_a_non_tiny_item():
    it = make_item("000000000000", "0_random_140/000000000000.jpg", "a slanted mountain bicycle",
                   "a slanted [rusty] mountain bicycle", "make it rusty", "0", ("bicycle", "bicycle"),
                   np.zeros((512, 512), bool))
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="PIE-tiny items only"):
        TinyMetrics()(img, img, it)
