"""Correspondence ground truth from sdlens-tiny's renderer: scene pairs with known keypoints.

A pair shows the same shape, the same size class, moved (drawn at another of the training
positions), recoloured (another object colour) and on another background (another colour and
texture). The keypoints are known exactly from the geometry `scenes.render` draws: the centre and
the vertices (square corners, triangle corners, star tips); a circle has no vertices, so it gets
its top, right, bottom and left boundary points, which are fixed relative to the image axes as the
renderer never rotates a shape. The PCK threshold is max(w, h) of the target's box, as SPair's.
"""
import random
from dataclasses import dataclass
from typing import List, Tuple

from .scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZE, TEXTURES, Obj, Scene, describe, place, polygon, render


@dataclass
class Pair:
    source: object  # PIL images, SIZE x SIZE
    target: object
    src_kps: List[Tuple[float, float]]  # (x, y) pixels, point i of the source matches point i of the target
    trg_kps: List[Tuple[float, float]]
    trg_bbox: Tuple[float, float, float, float]  # x1, y1, x2, y2
    shape: str

    @property
    def bbox_size(self) -> float:
        x1, y1, x2, y2 = self.trg_bbox
        return max(x2 - x1, y2 - y1)


def keypoints(o: Obj) -> List[Tuple[float, float]]:
    """Centre, then the vertices in the renderer's order, in pixels."""
    cx, cy, r = o.xy[0] * SIZE, o.xy[1] * SIZE, o.radius * SIZE
    if o.shape == "circle":
        rim = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    elif o.shape == "star":
        rim = polygon("star", cx, cy, r)[0::2]  # the five tips (outer radius r), not the inner corners
    else:
        rim = polygon(o.shape, cx, cy, r)
    return [(cx, cy)] + rim


def bbox(o: Obj) -> Tuple[float, float, float, float]:
    cx, cy, r = o.xy[0] * SIZE, o.xy[1] * SIZE, o.radius * SIZE
    pts = [(cx - r, cy - r), (cx + r, cy + r)] if o.shape == "circle" else polygon(o.shape, cx, cy, r)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def make_pair(seed: int, size: str = "big") -> Pair:
    """One pair, fully determined by `seed`; shapes cycle with the seed so that every few pairs cover all four."""
    rng = random.Random(seed)
    shape = SHAPES[seed % len(SHAPES)]
    (c1, c2), (b1, b2) = rng.sample(list(COLORS), 2), rng.sample(list(BACKGROUNDS), 2)
    p1, p2 = rng.sample(list(POSITIONS), 2)
    objs = [place(Obj(shape, c, size, p), rng) for c, p in ((c1, p1), (c2, p2))]
    images = [render(Scene([o], b, rng.choice(TEXTURES), describe(o)), rng) for o, b in zip(objs, (b1, b2))]
    return Pair(images[0], images[1], keypoints(objs[0]), keypoints(objs[1]), bbox(objs[1]), shape)


def make_pairs(seeds) -> List[Pair]:
    return [make_pair(s) for s in seeds]


def images(pairs: List[Pair]):
    """[2P, 3, SIZE, SIZE] in [0,1]: row 2i the source of pair i, row 2i+1 its target."""
    from ..pipeline import to_tensor
    return to_tensor([im for p in pairs for im in (p.source, p.target)])


def pair_pck(pairs: List[Pair], feats, alpha: float = 0.1) -> float:
    """Per-point PCK@alpha over all pairs (DIFT's "per point"), matching with features [2P, C, h, w]
    laid out as `images(pairs)`."""
    import torch
    from ..features.correspondence import check_points, match
    correct = total = 0
    for i, p in enumerate(pairs):
        pred = match(feats[2 * i], feats[2 * i + 1], check_points(p.src_kps, (SIZE, SIZE)).to(feats.device),
                     (SIZE, SIZE), (SIZE, SIZE))
        dist = (pred.double() - torch.tensor(p.trg_kps, dtype=torch.float64)).pow(2).sum(1).sqrt()
        correct += int((dist / p.bbox_size <= alpha).sum())
        total += len(dist)
    return correct / total
