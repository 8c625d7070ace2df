"""Per-pixel class maps of rendered scenes: the ground truth for segmentation probes.

Class 0 is the background and class 1 + i is `SHAPES[i]` (circle, square, triangle, star). Each
object is drawn with the renderer's own geometry (`scenes.polygon`, the same ellipse box, the same
order, so a later object covers an earlier one) into a one-channel image whose fill is the class,
so a label pixel is an object's class exactly where `render` paints that object's colour.
"""
import random
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .scenes import SHAPES, SIZE, Scene, polygon, random_scene, render

CLASSES = ("background",) + SHAPES


def label_map(scene: Scene) -> np.ndarray:
    """[SIZE, SIZE] uint8 class map of `scene` (0 background, 1 + SHAPES.index(shape))."""
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    for o in scene.objects:  # as scenes.render draws them
        cx, cy, r = o.xy[0] * SIZE, o.xy[1] * SIZE, o.radius * SIZE
        fill = 1 + SHAPES.index(o.shape)
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon(polygon(o.shape, cx, cy, r), fill=fill)
    return np.asarray(img, dtype=np.uint8).copy()


def labelled_scenes(seeds: Sequence[int]) -> Tuple[List[Image.Image], np.ndarray, List[Scene]]:
    """Scene `random_scene(Random(s))` for each seed s, rendered with the same generator (its stripes
    step): (images, labels [n, SIZE, SIZE] uint8, scenes)."""
    images, labels, scenes = [], [], []
    for s in seeds:
        rng = random.Random(s)
        sc = random_scene(rng)
        images.append(render(sc, rng))
        labels.append(label_map(sc))
        scenes.append(sc)
    return images, np.stack(labels), scenes
