"""PIE-tiny: a small editing benchmark in exactly PIE-Bench's format, rendered from sdlens-tiny's
scenes (`tiny/scenes.py`), so that every mask is known from the renderer and every edit can be
judged by a rule (`tiny/checker.py`) instead of CLIP, with no downloaded weights.

Four of PIE-Bench's ten editing types (README.md:109-118 of cure-lab/PnPInversion), a quarter each:
  "6" change attribute color   "a big [red] circle on the left"  -> "a big [blue] circle on the left"
  "1" change object            "a big red [circle] ..."          -> "a big red [square] ..."
  "8" change background        "... on a [gray] background"      -> "... on a [white] background"
  "2" add object               "a red circle [on the left]"      -> "a red circle [next to a blue square]"
The prompts are in the grammar sdlens-tiny was trained on (`scenes.describe`, `random_scene`).

Design (the format is PIE's; the sizes are the tiny model's):
- Images are 64x64 PNG (scenes.SIZE; lossless, as the background PSNR of an unchanged image must be
  inf, which a JPEG round trip would spoil). The official scripts open any file name (Image.open).
- Masks are stored on PIE's 512x512 grid as the 64x64 mask nearest-upsampled (x8), so the official
  `mask_decode` reads them; `pie.mask_at(mask, (64, 64))` gives the image's mask back exactly, with
  PIE's forced border as the image's 1-pixel border.
- mask = 1 where the edit may change pixels (PIE's convention, README.md:140): the object (colour),
  the union of old and new object (shape), every non-object pixel (background), the new object (add).
"""
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..tiny.checker import (MIN_AREA, NAMES, check, classify_shape, foreground, label_pixels, largest_component,
                            mask_iou, object_mask, position_ok)
from ..tiny.scenes import (BACKGROUNDS, COLORS, POSITION_PHRASE, POSITIONS, SHAPES, SIZE, TEXTURES, Obj, Scene,
                           describe, place, polygon, render)
from .pie import GRID, make_item, mask_at, write_benchmark

KINDS = (("1", "change_object"), ("2", "add_object"), ("6", "change_attribute_color"), ("8", "change_background"))


def object_region(o: Obj):
    """bool [SIZE, SIZE]: exactly the pixels `scenes.render` paints for `o` (same calls, no anti-aliasing)."""
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    cx, cy, r = o.xy[0] * SIZE, o.xy[1] * SIZE, o.radius * SIZE
    if o.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(polygon(o.shape, cx, cy, r), fill=255)
    return np.asarray(img) > 0


def make_edit(type_id, rng):
    """-> (source Scene, target Scene, original_prompt, editing_prompt, instruction, blended_word, mask64)."""
    bg, tex = rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES)
    if type_id == "2":  # small objects: a "next to"/"above" pair never overlaps (radius <= 0.121, jitter 0.05)
        (c1, c2), s1, s2 = rng.sample(list(COLORS), 2), rng.choice(SHAPES), rng.choice(SHAPES)
        rel, p1, p2 = rng.choice((("next to", "left", "right"), ("above", "top", "bottom")))
        a, b = place(Obj(s1, c1, "small", p1), rng), place(Obj(s2, c2, "small", p2), rng)
        head = describe(a, False, False)
        src, tgt = Scene([a], bg, tex, f"{head} {POSITION_PHRASE[p1]}"), Scene([a, b], bg, tex, "")
        orig, edit = f"{head} [{POSITION_PHRASE[p1]}]", f"{head} [{rel} {describe(b, False, False)}]"
        instr = f"add {describe(b, False, False)} {POSITION_PHRASE[p2]}"
        return src, tgt, orig, edit, instr, (s1, s2), object_region(b)  # blended: a source word, a target word
    o = place(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(("small", "big")),
                  rng.choice(list(POSITIONS))), rng)
    with_bg = type_id == "8" or rng.random() < 0.3  # as often as scenes.single_caption names it
    new = Obj(**vars(o))
    bg2 = bg
    if type_id == "6":
        new.color = rng.choice([c for c in COLORS if c != o.color])
        old_w, new_w, instr, blend = o.color, new.color, f"make the {o.shape} {new.color}", (o.shape, o.shape)
    elif type_id == "1":
        new.shape = rng.choice([s for s in SHAPES if s != o.shape])
        old_w, new_w, instr, blend = o.shape, new.shape, f"turn the {o.shape} into a {new.shape}", (o.shape, new.shape)
    else:
        bg2 = rng.choice([b for b in BACKGROUNDS if b != bg])
        old_w, new_w, instr, blend = bg, bg2, f"change the background to {bg2}", None
    tail = lambda b: f" on a {b} background" if with_bg else ""
    if type_id == "8":
        orig, edit = describe(o) + tail(f"[{bg}]"), describe(new) + tail(f"[{bg2}]")
    else:  # the colour or shape word occurs once in describe()'s "a big red circle on the left"
        orig, edit = (describe(x).replace(f" {w}", f" [{w}]", 1) + tail(bg) for x, w in ((o, old_w), (new, new_w)))
    texts = [orig.replace("[", "").replace("]", ""), edit.replace("[", "").replace("]", "")]
    mask = {"6": object_region(o), "1": object_region(o) | object_region(new), "8": ~object_region(o)}[type_id]
    return Scene([o], bg, tex, texts[0]), Scene([new], bg2, tex, texts[1]), orig, edit, instr, blend, mask


def render_pair(seed, i):
    """Item i of PIE-tiny: (type_id, source Scene, target Scene, source image, target image,
    (original_prompt, editing_prompt, instruction, blended_word, mask64)); the target image is the
    ground truth of the edit."""
    type_id = KINDS[i % len(KINDS)][0]
    rng = random.Random(f"pie-tiny-{seed}-{i}")
    src, tgt, orig, edit, instr, blend, mask = make_edit(type_id, rng)
    k = rng.randrange(2 ** 31)  # the same renderer stream for both, so a texture draws the same stripes
    images = render(src, random.Random(k)), render(tgt, random.Random(k))
    return (type_id, src, tgt) + images + ((orig, edit, instr, blend, mask),)


def make_tiny(root, n=64, seed=0, force=False):
    """Write PIE-tiny (n items, the four types in turn) to `root` in PIE-Bench's layout; returns the
    Items (in file order: grouped by type id, as PIE-Bench's keys are). Target renders are not
    written (PIE-Bench has none); `render_pair(seed, i)` gives them."""
    if type(n) is not int or n < len(KINDS):
        raise ValueError(f"n must be an integer >= {len(KINDS)} (one item per editing type), got {n!r}")
    counts = {t: sum(1 for i in range(n) if KINDS[i % len(KINDS)][0] == t) for t, _ in KINDS}
    pairs = []
    for i in range(n):
        type_id, _, _, src_img, _, (orig, edit, instr, blend, m64) = render_pair(seed, i)
        name = dict(KINDS)[type_id]
        key = f"{type_id}{i:011d}"  # PIE-Bench's keys are 12 digits, the first the type ("111000000000")
        up = m64.repeat(GRID[0] // SIZE, 0).repeat(GRID[1] // SIZE, 1)
        item = make_item(key, f"{type_id}_{name}_{counts[type_id]}/{key}.png", orig, edit, instr, type_id, blend, up)
        pairs.append((item, src_img))
    pairs.sort(key=lambda p: p[0].editing_type_id)  # stable: within a type, in index order
    write_benchmark(root, pairs, force=force)
    return [it for it, _ in pairs]


def index_of(item):
    """The render_pair index of a PIE-tiny item (from its key)."""
    return int(item.key[1:])


# ---- metrics ----------------------------------------------------------------------------------

def ssim(a, b, data_range=1.0):
    """torchmetrics' StructuralSimilarityIndexMeasure with its defaults (gaussian kernel 11, sigma 1.5,
    k1 0.01, k2 0.03; reflect padding by 5; the mean over every pixel and channel), as PIE uses it
    (matrics_calculator.py:278). a, b: float [H, W, 3] in [0, 1]."""
    x = torch.stack([torch.as_tensor(np.asarray(v), dtype=torch.float32) for v in (a, b)]).permute(0, 3, 1, 2)
    g = torch.exp(-0.5 * (torch.arange(11, dtype=torch.float32) - 5) ** 2 / 1.5 ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    x = F.pad(x, (5, 5, 5, 5), mode="reflect")
    p, t = x[:1], x[1:]
    mu_p, mu_t, pp, tt, pt = F.conv2d(torch.cat([p, t, p * p, t * t, p * t]), kernel, groups=3).split(1)
    var_p, var_t = (pp - mu_p ** 2).clamp(min=0), (tt - mu_t ** 2).clamp(min=0)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_p * mu_t + c1) * (2 * (pt - mu_p * mu_t) + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return s.mean().item()


def parse_prompt(text):
    """A PIE-tiny editing prompt (brackets stripped) -> colours and shapes in order, position, relation, background."""
    w = text.split()
    pos = next((p for p, phrase in POSITION_PHRASE.items() if phrase in text), None)
    rel = "next to" if "next to" in text else "above" if " above " in text else None
    bg = w[w.index("background") - 1] if "background" in w else None
    return [x for x in w if x in COLORS], [x for x in w if x in SHAPES], pos, rel, bg


def object_ok(img, color, shape, position=None):
    """The asked colour is there and its largest blob has the asked shape (and position): checker.check
    without its rule that one colour covers half of all object pixels, which a two-object scene breaks."""
    lab = label_pixels(img)
    if (lab == NAMES.index(color)).sum() < MIN_AREA:
        return False
    blob = largest_component(object_mask(img, color))
    if classify_shape(blob) != shape:
        return False
    ys, xs = np.nonzero(blob)
    h, w = blob.shape
    return position is None or position_ok((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h, position)


def background_ok(img, name):
    """At least half of the non-object pixels are nearest to the asked background colour (textures
    shift it by <= 18 per channel; the background colours are >= 97 apart)."""
    bg = ~foreground(img)
    return bool(bg.sum() > 0 and ((label_pixels(img) == NAMES.index(f"bg:{name}")) & bg).sum() >= 0.5 * bg.sum())


def edit_success(img, item):
    colors, shapes, pos, rel, bg = parse_prompt(item.editing_prompt)
    t = item.editing_type_id
    k = 2 if t == "2" else 1  # objects named
    if not (t in dict(KINDS) and len(colors) >= k and len(shapes) >= k and (rel if t == "2" else pos)
            and (bg in BACKGROUNDS or t != "8")):
        raise ValueError(f"{item.key}: the tiny checker judges PIE-tiny items only (types 1, 2, 6, 8 in "
                         f"sdlens-tiny's prompt grammar), not {t!r} {item.editing_prompt!r}")
    if t == "2":
        return object_ok(img, colors[0], shapes[0]) and object_ok(img, colors[1], shapes[1],
                                                                  {"next to": "right", "above": "bottom"}[rel])
    r = check(img, colors[0], shapes[0], pos)
    ok = r["color"] and r["shape"] and r["position"]
    return bool(ok and (background_ok(img, bg) if t == "8" else True))


class TinyMetrics:
    """PIE's background metrics (evaluate.py:40-59, matrics_calculator.py:304-382: both images times
    1 - mask, then PSNR/MSE/SSIM over the whole image with data_range 1; "nan" where nothing is
    unedited), on the image's own grid (`pie.mask_at`), plus the tiny checker in place of DINO/CLIP:
    - psnr_unedit_part: inf when the unedited part is identical (torchmetrics' PSNR gives inf too);
    - structure_iou: IoU of the source's and edit's object masks (checker.mask_iou); for "add
      object", outside the added object's region (the source object must stay). A shape change
      moves the outline itself, so its ground truth scores < 1 there: compare methods, not to 1;
    - edit_success: 1.0 if the checker finds what the editing prompt says (colour, shape, position;
      the background colour for type 8; both objects for type 2), else 0.0."""

    def __call__(self, src, tgt, item):
        a = np.asarray(src.convert("RGB") if hasattr(src, "convert") else src, dtype=np.float32) / 255
        b = np.asarray(tgt.convert("RGB") if hasattr(tgt, "convert") else tgt, dtype=np.float32) / 255
        if a.shape != b.shape:
            raise ValueError(f"{item.key}: source {a.shape[:2]} and edited {b.shape[:2]} images differ in size")
        m = mask_at(item.mask, a.shape[:2])
        keep = (~m).astype(np.float32)[..., None]
        out = {}
        if keep.sum() == 0:
            out.update(psnr_unedit_part=math.nan, mse_unedit_part=math.nan, ssim_unedit_part=math.nan)
        else:
            mse = float(((a * keep - b * keep) ** 2).mean())
            psnr = 10 * math.log10(1 / mse) if mse > 0 else math.inf  # torchmetrics' PSNR, data_range 1
            out.update(psnr_unedit_part=psnr, mse_unedit_part=mse, ssim_unedit_part=ssim(a * keep, b * keep))
        src8, tgt8 = (np.uint8(np.round(x * 255)) for x in (a, b))
        if item.editing_type_id == "2":
            fa, fb = foreground(src8) & ~m, foreground(tgt8) & ~m
            out["structure_iou"] = float((fa & fb).sum() / max((fa | fb).sum(), 1))
        else:
            out["structure_iou"] = float(mask_iou(src8, tgt8))
        out["edit_success"] = float(edit_success(tgt8, item))
        return out
