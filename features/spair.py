"""SPair-71k evaluation of DIFT-style correspondence, as DIFT's `eval_spair.py` (Tsingularity/dift, HEAD).

Layout read (SPair-71k's own, Min et al. 2019):
    ROOT/JPEGImages/<category>/<imname>.jpg
    ROOT/PairAnnotation/test/<pair>.json   e.g. 000001-2008_000585-2008_002221:aeroplane.json
Fields read from each JSON: src_imname, trg_imname, src_imsize and trg_imsize ([W, H, 3]), trg_bndbox
([x1, y1, x2, y2]), category, src_kps and trg_kps ([[x, y], ...], point i matches point i). The others
(pair_id, src_bndbox, kps_ids, mirror, viewpoint_variation, scale_variation, truncation, occlusion)
are not used, as DIFT does not use them.

As eval_spair.py: the prompt is "a photo of a {category}" (src/models/dift_sd.py:253); each image is
resized to the model's square and its features upsampled to its JSON size (eval_spair.py:88-95);
a point is correct when distance / max(bbox w, h) <= 0.1 (:100, :121-122); "per image" is the mean of
the pairs' PCKs, "per point" pools every point (:127-133), for each category and for all pairs.
Categories are sorted (DIFT lists them in os.listdir's order); the grouping is by the JSON's
`category` (DIFT's tests the category name as a substring of the file name, which is the same on SPair).
"""
import json
import os
from collections import OrderedDict, defaultdict

import torch

from .correspondence import match, prepare
from .extract import DIFT_T, extract

FIELDS = ("src_imname", "trg_imname", "src_imsize", "trg_imsize", "trg_bndbox", "category", "src_kps", "trg_kps")
ALPHA = 0.1  # PCK@0.1, eval_spair.py:122


def pair_files(root):
    """Sorted test annotation files, grouped by category; ValueError naming the first missing part of the layout."""
    for sub in ("JPEGImages", os.path.join("PairAnnotation", "test")):
        if not os.path.isdir(os.path.join(root, sub)):
            raise ValueError(f"{os.path.join(root, sub)}: no such folder; --data must be SPair-71k's root "
                             f"(with JPEGImages/ and PairAnnotation/test/)")
    test = os.path.join(root, "PairAnnotation", "test")
    files = sorted(f for f in os.listdir(test) if f.endswith(".json"))
    if not files:
        raise ValueError(f"{test}: no .json pair annotations; --data must be SPair-71k's root")
    return [os.path.join(test, f) for f in files]


def read_pair(path, root):
    """One annotation, checked: the fields DIFT reads, and both images present."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON annotation ({e})") from None
    missing = [k for k in FIELDS if k not in d] if isinstance(d, dict) else list(FIELDS)
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}; is this SPair-71k's PairAnnotation?")
    bad = lambda key, want: ValueError(f"{path}: {key} is {json.dumps(d[key])[:60]}; expected {want}")
    for key in ("category", "src_imname", "trg_imname"):  # names inside the dataset, never a path out of it
        v = d[key]
        if not isinstance(v, str) or not v or v in (".", "..") or "/" in v or "\\" in v or os.path.isabs(v):
            raise bad(key, "a plain file or folder name inside the dataset (no '/', '..' or absolute path)")
    for side in ("src", "trg"):
        size = d[f"{side}_imsize"]
        if not (isinstance(size, list) and len(size) == 3 and all(_int(v) and v > 0 for v in size)):
            raise bad(f"{side}_imsize", "[width, height, 3] of positive integers")
    if not d["src_kps"] or not isinstance(d["src_kps"], list) or not isinstance(d["trg_kps"], list) \
            or len(d["src_kps"]) != len(d["trg_kps"]):
        raise ValueError(f"{path}: src_kps and trg_kps must be non-empty lists of one length")
    for side in ("src", "trg"):
        w, h = d[f"{side}_imsize"][:2]
        for pt in d[f"{side}_kps"]:
            if not (isinstance(pt, list) and len(pt) == 2 and all(_num(v) for v in pt)):
                raise bad(f"{side}_kps", f"a list of [x, y] number pairs; one is {json.dumps(pt)[:40]}")
            # source points index the features (a negative one would index from the far edge); target
            # points only enter a distance
            if side == "src" and not (0 <= pt[0] < w and 0 <= pt[1] < h):
                raise bad("src_kps", f"[x, y] points inside the {w}x{h} source image; one is {json.dumps(pt)[:40]}")
    box = d["trg_bndbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(_num(v) for v in box) and box[2] > box[0] and box[3] > box[1]):
        raise bad("trg_bndbox", "[x1, y1, x2, y2] numbers with x2 > x1 and y2 > y1")
    for side in ("src", "trg"):
        img = os.path.join(root, "JPEGImages", d["category"], d[f"{side}_imname"])
        if not os.path.isfile(img):
            raise ValueError(f"{path}: {side}_imname {img}: no such file")
        d[f"{side}_path"] = img
    return d


def check_images(pairs):
    """Decode every image of `pairs` (read_pair's dicts) once, before the model loads: a file that is
    no image, or one cut short, fails here in one line naming it instead of mid-run."""
    from ..inversion import load_image
    for path in dict.fromkeys(d[f"{side}_path"] for d in pairs for side in ("src", "trg")):
        load_image(path, 8)


def in_order(pairs, files, limit=None):
    """The (pair, file name) that `evaluate` runs, in its order: by category, then file name."""
    ordered = sorted(zip(pairs, map(os.path.basename, files)), key=lambda x: (x[0]["category"], x[1]))
    return ordered[:limit] if limit else ordered


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def evaluate(sd, root, *, limit=None, name=None, t=DIFT_T, ensemble=8, seed=0, progress=False, done=None, on_pair=None):
    """Per-point rows (dicts) for the first `limit` test pairs (sorted by category, then file name).

    Features of an image are computed once per category and kept until the category changes (DIFT
    saves them per category, eval_spair.py:56-69); the uncached images of a pair go through the UNet in
    one call. `done` maps a pair's file name to rows already computed (a resumed run); `on_pair(file, rows)`
    is called after each newly computed pair."""
    if name is None:
        from .layers import dift_layer
        name = dift_layer(sd)
    files = pair_files(root)
    pairs = in_order([read_pair(p, root) for p in files], files, limit)
    bar = None
    if progress:  # leave=False and closed on any exit: an error is then printed on a line of its own
        from tqdm.auto import tqdm
        pairs = bar = tqdm(pairs, desc="SPair pairs", unit="pair", leave=False)
    try:
        return _evaluate(sd, pairs, name, t, ensemble, seed, done or {}, on_pair)
    finally:
        if bar is not None:
            bar.close()


def _evaluate(sd, pairs, name, t, ensemble, seed, done, on_pair):
    cache, cat, out = {}, None, []
    for d, fname in pairs:
        if fname in done:
            out += done[fname]
            continue
        if d["category"] != cat:
            cache, cat = {}, d["category"]
        for k in ("src_path", "trg_path"):
            if d[k] not in cache:  # one image per call, so its noise does not depend on which images share
                # the call: a resumed run (its category cache empty) gives exactly the uninterrupted run's rows
                x = prepare(d[k], sd.default_size, k)[0][None]
                f = extract(sd, x, name, t=t, ensemble=ensemble, seed=seed, prompt=f"a photo of a {cat}")[name]
                cache[d[k]] = f[0].cpu()
        src_hw, trg_hw = tuple(d["src_imsize"][:2][::-1]), tuple(d["trg_imsize"][:2][::-1])  # [W, H, 3] -> (H, W)
        pts = torch.tensor(d["src_kps"], dtype=torch.long)
        pred = match(cache[d["src_path"]], cache[d["trg_path"]], pts, src_hw, trg_hw)
        x1, y1, x2, y2 = d["trg_bndbox"]
        thr = max(y2 - y1, x2 - x1)
        rows = []
        for i, ((sx, sy), (gx, gy), (px, py)) in enumerate(zip(d["src_kps"], d["trg_kps"], pred.tolist())):
            dist = ((px - gx) ** 2 + (py - gy) ** 2) ** 0.5
            rows.append(dict(pair=fname, category=cat, point=i, src_x=sx, src_y=sy, trg_x=gx, trg_y=gy,
                             pred_x=int(px), pred_y=int(py), dist=round(dist, 4), threshold=thr,
                             correct=int(dist / thr <= ALPHA)))
        out += rows
        if on_pair:
            on_pair(fname, rows)
    return out


def summarize(rows):
    """{category or "All": (per-image PCK, per-point PCK, pairs, points)}, categories sorted, "All" last."""
    by_pair = OrderedDict()
    for r in rows:
        by_pair.setdefault((r["category"], r["pair"]), []).append(r["correct"])
    groups = defaultdict(list)
    for (cat, _), c in by_pair.items():
        groups[cat].append(c)
        groups["All"].append(c)
    out = OrderedDict()
    for cat in sorted(k for k in groups if k != "All") + ["All"]:
        cs = groups[cat]
        out[cat] = (sum(sum(c) / len(c) for c in cs) / len(cs), sum(map(sum, cs)) / sum(map(len, cs)),
                    len(cs), sum(map(len, cs)))
    return out


def report(summary):
    """DIFT's printout (eval_spair.py:130-133), in percent with two decimals."""
    lines = []
    for cat, (img, pt, _, _) in summary.items():
        lines.append(f"{cat} per image PCK@0.1: {img * 100:.2f}")
        lines.append(f"{cat} per point PCK@0.1: {pt * 100:.2f}")
    return "\n".join(lines)
