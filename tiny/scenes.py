"""Procedural scenes for sdlens-tiny: one or two flat shapes on a plain or lightly textured
background, with a natural caption that says what is where. Seeded and fully reproducible.

The palette is part of the ground truth: objects use 8 saturated colours, backgrounds use muted
ones far from all of them, so a checker can find an object's pixels by colour alone.
"""
import math
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

SIZE = 64  # pixels; the VAE divides by 4, so the UNet's largest attention maps are 16x16

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (245, 225, 30),
          "orange": (250, 135, 20), "purple": (135, 40, 200), "pink": (250, 110, 190), "cyan": (20, 210, 220)}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (238, 238, 238), "black": (22, 22, 22), "beige": (205, 190, 160)}
TEXTURES = ("plain", "stripes", "gradient")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.11, "big": 0.2}  # radius as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "center": "in the center"}


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    position: str
    xy: Tuple[float, float] = (0.5, 0.5)  # centre, fractions of the image side
    radius: float = 0.15


@dataclass
class Scene:
    objects: List[Obj]
    background: str
    texture: str
    caption: str


def polygon(shape, cx, cy, r, angle=0.0):
    if shape == "square":
        r = r * 0.85  # same visual weight as a circle of radius r
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.sin(angle + k * 2 * math.pi / 3), cy - r * math.cos(angle + k * 2 * math.pi / 3))
                for k in range(3)]
    if shape == "star":  # five points, inner radius 0.45 r
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    raise ValueError(shape)


def draw_background(img, name, texture, rng):
    base = BACKGROUNDS[name]
    d = ImageDraw.Draw(img)
    if texture == "stripes":
        step = rng.choice((6, 8))
        alt = tuple(min(255, max(0, c + (18 if sum(base) < 384 else -18))) for c in base)
        for x in range(0, SIZE, step * 2):
            d.rectangle([x, 0, x + step - 1, SIZE], fill=alt)
    elif texture == "gradient":
        for y in range(SIZE):
            k = (y / SIZE - 0.5) * 30
            d.line([(0, y), (SIZE, y)], fill=tuple(int(min(255, max(0, c + k))) for c in base))


def render(scene: Scene, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    draw_background(img, scene.background, scene.texture, rng)
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.xy[0] * SIZE, o.xy[1] * SIZE, o.radius * SIZE
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[o.color])
        else:
            d.polygon(polygon(o.shape, cx, cy, r), fill=COLORS[o.color])
    return img


def place(obj: Obj, rng: random.Random, jitter=0.05):
    bx, by = POSITIONS[obj.position]
    obj.radius = SIZES[obj.size] * rng.uniform(0.9, 1.1)
    lo, hi = obj.radius + 0.02, 1 - obj.radius - 0.02
    obj.xy = (min(hi, max(lo, bx + rng.uniform(-jitter, jitter))), min(hi, max(lo, by + rng.uniform(-jitter, jitter))))
    return obj


def describe(o: Obj, with_position=True, with_size=True):
    words = " ".join(([o.size] if with_size else []) + [o.color, o.shape])
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}" + (" " + POSITION_PHRASE[o.position] if with_position else "")


def single_caption(o: Obj, bg: Optional[str], rng: random.Random):
    lead = rng.choice(("", "", "a photo of ", "an image of "))
    text = lead + describe(o, with_size=rng.random() < 0.7)
    if bg is not None:
        text += f" on a {bg} background"
    return text


def random_scene(rng: random.Random, two_objects_p=0.3) -> Scene:
    bg, tex = rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES)
    if rng.random() < two_objects_p:
        c1, c2 = rng.sample(list(COLORS), 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        if rng.random() < 0.5:
            a, b = Obj(s1, c1, "small" if rng.random() < 0.5 else "big", "left"), Obj(s2, c2, "small", "right")
            b.size = a.size
            rel = "next to"
        else:
            a, b = Obj(s1, c1, "small", "top"), Obj(s2, c2, "small", "bottom")
            rel = "above"
        objs = [place(a, rng), place(b, rng)]
        caption = f"{describe(a, False, False)} {rel} {describe(b, False, False)}"
        if rng.random() < 0.3:
            caption += f" on a {bg} background"
        return Scene(objs, bg, tex, caption)
    o = place(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), rng.choice(list(POSITIONS))), rng)
    return Scene([o], bg, tex, single_caption(o, bg if rng.random() < 0.3 else None, rng))


def scene_from(shape, color, size="big", position="center", background="gray", texture="plain", seed=0) -> Scene:
    """A one-object scene with chosen attributes (held-out evaluation, tests, demos)."""
    rng = random.Random(seed)
    o = place(Obj(shape, color, size, position), rng)
    return Scene([o], background, texture, describe(o))
