"""Semantic correspondence (DIFT): matching against DIFT's own evaluation code, PCK by hand, the SPair-71k
reader and CLI on a synthetic set in SPair's exact layout, bad input, and the sdlens-tiny claim."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import sdlens
import sdlens.__main__ as cli
from sdlens.features import correspondence as corr
from sdlens.features.correspondence import check_points, correspond, draw_matches, match, pck
from sdlens.tiny.scenes import render, scene_from


@pytest.fixture(scope="module")
def sd():
    return sdlens.load(None)


def dift_reference(src_ft, trg_ft, kps, src_img_size, trg_img_size):
    """eval_spair.py:94-119 (Tsingularity/dift), line for line, on [1, C, h, w] maps."""
    src_ft = nn.Upsample(size=src_img_size, mode='bilinear')(src_ft)
    trg_ft = nn.Upsample(size=trg_img_size, mode='bilinear')(trg_ft)
    h, w = trg_ft.shape[-2], trg_ft.shape[-1]
    out = []
    for src_point in kps:
        num_channel = src_ft.size(1)
        src_vec = src_ft[0, :, src_point[1], src_point[0]].view(1, num_channel)
        trg_vec = trg_ft.view(num_channel, -1).transpose(0, 1)
        src_vec = F.normalize(src_vec).transpose(0, 1)
        trg_vec = F.normalize(trg_vec)
        cos_map = torch.mm(trg_vec, src_vec).view(h, w).cpu().numpy()
        max_yx = np.unravel_index(cos_map.argmax(), cos_map.shape)
        out.append((max_yx[1], max_yx[0]))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("budget", [1 << 24, 700])  # 700: a few channels and one point per chunk
def test_match_is_difts_nearest_neighbour(monkeypatch, budget):
    monkeypatch.setattr(corr, "_BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    src, trg = torch.randn(1, 40, 6, 7, generator=g), torch.randn(1, 40, 9, 5, generator=g)
    src_hw, trg_hw = (37, 50), (45, 29)  # (H, W), neither square nor a multiple of the maps
    kps = [[0, 0], [49, 36], [12, 30], [33, 5], [25, 18]]
    want = dift_reference(src, trg, kps, src_hw, trg_hw)
    got = match(src[0], trg[0], torch.tensor(kps), src_hw, trg_hw)
    assert torch.equal(got, want)


def test_match_finds_a_shifted_copy():
    # Target features = source features moved by (dx, dy) = (3, -2) cells, at image resolution
    # (no interpolation): every interior point's match is the point moved by (3, -2).
    g = torch.Generator().manual_seed(1)
    src = torch.randn(16, 20, 24, generator=g)
    trg = torch.roll(src, shifts=(-2, 3), dims=(1, 2))
    pts = torch.tensor([[5, 7], [10, 12], [0, 19], [17, 3]])
    got = match(src, trg, pts, (20, 24), (20, 24))
    assert got.tolist() == [[8, 5], [13, 10], [3, 17], [20, 1]]


def test_pck_by_hand():
    # distances 0, 5, 10 against 0.1 x 50 = 5: the boundary counts (DIFT's <=), so 2 of 3.
    pred, gt = [[0, 0], [3, 4], [10, 0]], [[0, 0], [0, 0], [0, 0]]
    assert pck(pred, gt, 50) == pytest.approx(2 / 3)
    assert pck(pred, gt, [10, 40, 100]) == pytest.approx(2 / 3)  # per point: 0/10 yes, 5/40 no, 10/100 yes
    assert pck(pred, gt, 50, alpha=0.2) == 1.0


def test_bad_arguments_name_themselves(sd):
    with pytest.raises(ValueError, match=r"points\[1\] = \(64, 3\) is outside"):
        check_points([[1, 1], [64, 3]], (64, 64))
    with pytest.raises(ValueError, match="points must have shape"):
        check_points([1, 2, 3], (64, 64))
    with pytest.raises(ValueError, match="bbox_size"):
        pck([[0, 0]], [[0, 0]], 0)
    with pytest.raises(ValueError, match="target_image: nope.png: no such file"):
        correspond(sd, torch.rand(3, 64, 64), [[3, 3]], "nope.png", name="output_blocks.5.hook_out")
    with pytest.raises(ValueError, match="source_image must be"):
        correspond(sd, torch.rand(64, 64), [[3, 3]], torch.rand(3, 64, 64), name="output_blocks.5.hook_out")


def test_correspond_maps_points_between_image_frames(sd):
    # The target is the source stretched to 128 x 96 (W x H). At t = 0 the two feature maps are the
    # same up to tiny noise, so each match must land near the point scaled by (2, 1.5): a swap of x
    # and y, or of H and W, or a point left in the model's 64 x 64 frame would miss.
    src = render(scene_from("square", "red", "big", "center", "gray", seed=3), __import__("random").Random(0))
    trg = src.resize((128, 96), Image.BICUBIC)
    pts = torch.tensor([[32.0, 32.0], [22.0, 23.0], [41.0, 42.0], [10.0, 50.0]])
    got = correspond(sd, src, pts, trg, t=0, ensemble=1)
    assert got.shape == (4, 2) and got.dtype == torch.float32
    err = (got - pts * torch.tensor([2.0, 1.5])).norm(dim=1)
    assert (err <= 0.1 * 40).all(), (got, err)  # 0.1 x the stretched square's side (~22 x 2 px)


def test_draw_matches_side_by_side():
    a, b = Image.new("RGB", (64, 64)), Image.new("RGB", (32, 48))
    im = draw_matches(a, b, [[1, 2]], [[3, 4]])
    assert im.size == (64 * 4 + 32 * 4, 64 * 4)  # scaled up by 4 to reach 256 px


# --- SPair-71k: a synthetic set in its exact layout ---------------------------------------------

def write_spair(root):
    """Three pairs, two categories, non-square JPEGs, JSONs with SPair's field names (its test pairs'
    file naming `<id>-<src>-<trg>:<category>.json`). The ground truth is chosen so that the answer
    does not depend on the model: a 2000 px box makes the threshold 200 px, so a keypoint at the image
    centre is always found (the images are under 100 px) and one at (5000, 5000) never is; a 1 px box
    with far keypoints is always wrong."""
    names = {"cat": ["2008_000001.jpg", "2008_000002.jpg"], "dog": ["2009_000003.jpg", "2009_000004.jpg"]}
    sizes = {}
    for k, (cat, ims) in enumerate(names.items()):
        os.makedirs(os.path.join(root, "JPEGImages", cat))
        for i, n in enumerate(ims):
            im = render(scene_from(["circle", "star"][k], ["red", "blue"][i], seed=i), __import__("random").Random(i))
            im = im.resize((80, 60) if i == 0 else (70, 90))
            im.save(os.path.join(root, "JPEGImages", cat, n), quality=95)
            sizes[n] = [im.width, im.height, 3]
    test = os.path.join(root, "PairAnnotation", "test")
    os.makedirs(test)

    def pair(pid, cat, kps_src, kps_trg, box):
        s, t = names[cat]
        d = dict(pair_id=pid, src_imname=s, trg_imname=t, src_imsize=sizes[s], trg_imsize=sizes[t],
                 src_bndbox=[5, 5, 60, 50], trg_bndbox=box, category=cat, src_kps=kps_src, trg_kps=kps_trg,
                 kps_ids=[str(i) for i in range(len(kps_src))], mirror=0, viewpoint_variation=0,
                 scale_variation=0, truncation=0, occlusion=0)
        with open(os.path.join(test, f"{pid:06d}-{s[:-4]}-{t[:-4]}:{cat}.json"), "w") as f:
            json.dump(d, f)

    far = [5000, 5000]
    pair(1, "cat", [[10, 10], [40, 30], [79, 59]], [[35, 45]] * 3, [0, 0, 2000, 1000])  # 3 of 3
    pair(2, "cat", [[20, 20], [50, 40]], [far, far], [0, 0, 1, 1])                      # 0 of 2
    pair(3, "dog", [[10, 10], [40, 30], [60, 50], [5, 55]], [[35, 45]] * 3 + [far], [0, 0, 2000, 30])  # 3 of 4


def run(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_spair_cli_on_a_synthetic_set(tmp_path, capsys, sd):
    root, out = tmp_path / "SPair-71k", tmp_path / "res" / "results.csv"
    write_spair(str(root))
    rc, stdout, err = run(["features", "spair", "--data", root, "--out", out, "--ensemble", 2], capsys)
    assert rc in (0, None), err
    # By hand: cat per image mean(3/3, 0/2) = 50, per point 3/5 = 60; dog 3/4 both; all pairs
    # mean(1, 0, 0.75) = 58.33, all points 6/9 = 66.67 (eval_spair.py:127-133).
    assert stdout.splitlines()[:6] == [
        "cat per image PCK@0.1: 50.00", "cat per point PCK@0.1: 60.00",
        "dog per image PCK@0.1: 75.00", "dog per point PCK@0.1: 75.00",
        "All per image PCK@0.1: 58.33", "All per point PCK@0.1: 66.67"]
    rows = out.read_text().splitlines()
    assert rows[0] == "pair,category,point,src_x,src_y,trg_x,trg_y,pred_x,pred_y,dist,threshold,correct"
    assert len(rows) == 1 + 9 and sum(int(r.rsplit(",", 1)[1]) for r in rows[1:]) == 6
    assert os.listdir(out.parent) == ["results.csv"]  # the resume log is gone after success
    # The first pair's predictions: DIFT's SPair prompt on the JPEGs as read, each image's features
    # extracted alone (so that a resumed run, whose category cache starts empty, draws the same noise).
    from sdlens.features import extract
    from sdlens.features.correspondence import match, prepare
    from sdlens.features.layers import dift_layer
    cat, name = root / "JPEGImages" / "cat", dift_layer(sd)
    (src, src_hw), (trg, trg_hw) = (prepare(str(cat / n), sd.default_size, "image") for n in ("2008_000001.jpg", "2008_000002.jpg"))
    fs, ft = (extract(sd, x[None], name, ensemble=2, prompt="a photo of a cat")[name][0] for x in (src, trg))
    want = match(fs, ft, torch.tensor([[10, 10], [40, 30], [79, 59]]), src_hw, trg_hw)
    got = [[float(v) for v in r.split(",")[7:9]] for r in rows[1:4]]
    assert got == want.tolist()


def test_spair_resumes_after_an_interruption(tmp_path, capsys, monkeypatch):
    import sdlens.features.spair as spair
    root, out = tmp_path / "SPair-71k", tmp_path / "results.csv"
    write_spair(str(root))
    real, calls, interrupt = spair.match, [], [True]

    def second_pair_interrupts(*a):
        calls.append(1)
        if len(calls) == 2 and interrupt.pop():
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(spair, "match", second_pair_interrupts)
    argv = ["features", "spair", "--data", root, "--out", out, "--ensemble", 1]
    rc, _, err = run(argv, capsys)
    assert rc == 130 and not out.exists()
    # one line that says what was kept (it used to add "nothing was written" after "finished pairs are kept")
    # (the progress bar is cleared first: "\r" and blanks, no newline)
    assert "\n" not in err and err.split("\r")[-1].startswith("interrupted:") and "kept" in err, err
    assert len((tmp_path / ".results.csv.partial").read_text().splitlines()) == 2  # settings + pair 1
    calls.clear(), interrupt.append(False)
    rc, stdout, err = run(argv, capsys)
    assert rc in (0, None), err
    assert len(calls) == 2  # pairs 2 and 3 only
    assert stdout.splitlines()[4:6] == ["All per image PCK@0.1: 58.33", "All per point PCK@0.1: 66.67"]
    assert sorted(os.listdir(tmp_path)) == ["SPair-71k", "results.csv"]
    whole = tmp_path / "whole" / "results.csv"  # an uninterrupted run: the same rows, byte for byte
    assert run(["features", "spair", "--data", root, "--out", whole, "--ensemble", 1], capsys)[0] in (0, None)
    assert whole.read_text() == out.read_text()


def test_spair_refuses_the_log_of_changed_data(tmp_path, capsys, monkeypatch):
    """The log records a fingerprint of the annotations and images: after an annotation changed, the
    interrupted run's log is refused in one line (it used to be reused, giving rows of the old data)."""
    import sdlens.features.spair as spair
    root, out = tmp_path / "SPair-71k", tmp_path / "results.csv"
    write_spair(str(root))
    real, calls = spair.match, []

    def second_pair_interrupts(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(spair, "match", second_pair_interrupts)
    argv = ["features", "spair", "--data", root, "--out", out, "--ensemble", 1]
    assert run(argv, capsys)[0] == 130
    monkeypatch.setattr(spair, "match", real)
    f = sorted((root / "PairAnnotation" / "test").iterdir())[0]
    d = json.loads(f.read_text())
    d["trg_kps"][0] = [1, 1]
    f.write_text(json.dumps(d))
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "\n" not in err and "inputs" in err and "delete" in err and not out.exists(), err


@pytest.mark.parametrize("field, value, says", [
    ("src_kps", [[-1, 5], [40, 30], [79, 59]], "inside the"), ("src_kps", [[10, 10, 1], [40, 30], [79, 59]], "[x, y]"),
    ("src_kps", [["a", 1], [40, 30], [79, 59]], "[x, y]"), ("trg_bndbox", [0, 0, 5], "x2 > x1"),
    ("trg_bndbox", [5, 5, 5, 9], "x2 > x1"), ("src_imsize", ["80", "60", 3], "positive integers"),
    ("src_imname", "../../etc/passwd", "inside the dataset"), ("category", ["cat"], "plain file or folder name"),
    ("trg_imname", "/etc/passwd", "inside the dataset")])
def test_spair_malformed_annotation_is_one_line(tmp_path, capsys, field, value, says):
    write_spair(str(tmp_path))
    f = sorted((tmp_path / "PairAnnotation" / "test").iterdir())[0]
    d = json.loads(f.read_text())
    d[field] = value
    f.write_text(json.dumps(d))
    rc, _, err = run(["features", "spair", "--data", tmp_path, "--out", tmp_path / "o" / "r.csv"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and says in err and field in err and f.name in err, err
    assert not (tmp_path / "o").exists()


def test_spair_unreadable_image_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A JPEG that is no image, or cut short after its header, failed mid-run with PIL's own text
    ("cannot identify image file", "image file is truncated") after the model had loaded."""
    import sdlens.features.cli as fcli
    write_spair(str(tmp_path))
    d = json.loads(sorted((tmp_path / "PairAnnotation" / "test").iterdir())[0].read_text())
    path = tmp_path / "JPEGImages" / d["category"] / d["trg_imname"]
    whole = path.read_bytes()
    monkeypatch.setattr(fcli, "load_model", lambda args: pytest.fail("the model loaded"))
    for bad in (b"not a jpeg", whole[:len(whole) // 2]):
        path.write_bytes(bad)
        rc, _, err = run(["features", "spair", "--data", tmp_path, "--out", tmp_path / "o" / "r.csv"], capsys)
        assert rc == 2 and len(err.splitlines()) == 1 and "not a readable image" in err and str(path) in err, err
        assert not (tmp_path / "o").exists()


def test_spair_bad_data_is_one_line(tmp_path, capsys):
    (tmp_path / "JPEGImages").mkdir()
    out = tmp_path / "o" / "r.csv"
    rc, stdout, err = run(["features", "spair", "--data", tmp_path, "--out", out], capsys)
    assert rc == 2 and "\n" not in err and not out.parent.exists()
    assert f"{tmp_path}/PairAnnotation/test: no such folder; --data must be SPair-71k's root" in err


def test_spair_missing_field_is_one_line(tmp_path, capsys):
    write_spair(str(tmp_path))
    f = sorted((tmp_path / "PairAnnotation" / "test").iterdir())[0]
    d = json.loads(f.read_text())
    del d["trg_kps"]
    f.write_text(json.dumps(d))
    rc, stdout, err = run(["features", "spair", "--data", tmp_path, "--out", tmp_path / "r.csv"], capsys)
    assert rc == 2 and "\n" not in err and "missing field(s) trg_kps" in err
    assert not (tmp_path / "r.csv").exists()


def test_correspond_cli(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    rng = __import__("random").Random(0)
    render(scene_from("star", "red", seed=1), rng).save(a)
    render(scene_from("star", "blue", "big", "left", "white", seed=2), rng).save(b)
    rc, _, err = run(["features", "correspond", "--image", a, "--points", "32,32;100,3", "--target", b,
                      "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "\n" not in err and "--points[1] = (100, 3) is outside the source image" in err
    rc, _, err = run(["features", "correspond", "--image", a, "--points", "32;3", "--target", b,
                      "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "\n" not in err and "is not a list of points" in err
    assert not (tmp_path / "o").exists()
    rc, _, err = run(["features", "correspond", "--image", a, "--points", "32,32;20,40", "--target", b,
                      "--out", tmp_path / "o", "--ensemble", 1], capsys)
    assert rc in (0, None), err
    assert sorted(os.listdir(tmp_path / "o")) == ["matches.csv", "matches.png"]
    lines = (tmp_path / "o" / "matches.csv").read_text().splitlines()
    assert lines[0] == "x,y,match_x,match_y" and lines[1].startswith("32,32,") and len(lines) == 3


# --- The claim on sdlens-tiny -----------------------------------------------------------------------
# "Trained diffusion features beat every baseline by a clear margin at their best layer."
# Fixed before the decisive run (commit "test: fix the tiny correspondence claim"), from the exploration
# run `python bench/correspondence_on_tiny.py --seeds 0:32 --ensemble 4` (160 points): pixels 0.019,
# VAE latents 0.019, random UNet 0.163 at input_blocks.1.0.hook_out t=101, trained 0.406 at
# output_blocks.3.0.hook_out t=101. Each model's layer and t are those best ones; the pairs are
# held out (seeds 1000-1023, never explored); ensemble 4 and seeds as in the exploration.
# Criterion: per-point PCK@0.1 of the trained UNet >= every baseline's + 0.15 (about 2.7 standard
# errors of a difference of two proportions over 120 points at the explored rates).
HELDOUT = range(1000, 1024)
TRAINED = ("output_blocks.3.0.hook_out", 101)
RANDOM = ("input_blocks.1.0.hook_out", 101)
MARGIN = 0.15


def test_trained_features_beat_every_baseline_on_tiny(sd):
    from sdlens.features import extract
    from sdlens.features.probe import random_unet
    from sdlens.tiny.pairs import images, make_pairs, pair_pck
    pairs = make_pairs(HELDOUT)
    x = images(pairs)
    scores = {"pixels": pair_pck(pairs, x), "vae": pair_pck(pairs, sd.encode_image(x).float())}
    for label, model, (name, t) in (("random", random_unet(sd, 0), RANDOM), ("trained", sd, TRAINED)):
        scores[label] = pair_pck(pairs, extract(model, x, name, t=t, ensemble=4, max_rows=64)[name])
    print(scores)
    best_baseline = max(v for k, v in scores.items() if k != "trained")
    assert scores["trained"] >= best_baseline + MARGIN, scores
