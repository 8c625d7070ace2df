"""Pictures: per-word cross-attention heatmaps, self-attention's SVD components, and `.pil()` /
`.save(folder)` for every method's result.

Heatmaps follow the official `show_cross_attention` (google/prompt-to-prompt `ptp_utils.py`): each
map is divided by its own maximum, so every tile spans the full colour scale and the tiles show
where each word attends, not how strongly one word attends compared with another.
"""
import os
from functools import lru_cache
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .outputs import Staged
from .pipeline import to_pil

# A perceptual dark-to-bright ramp (matplotlib's "inferno" sampled at 0, .25, .5, .75, 1): dark
# means "little attention", so a uniform map cannot pass for a hot one.
RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


@lru_cache(maxsize=None)
def font(size=14):
    """A scalable TTF font: Pillow >= 10.1 bundles one (load_default(size=...)), else DejaVu; the old
    bitmap font is the last resort (it ignores `size`)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # Pillow < 10.1, or no FreeType
        pass
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def colorize(m: np.ndarray) -> np.ndarray:
    """[h,w] in [0,1] -> [h,w,3] uint8 on RAMP."""
    x = np.clip(m, 0, 1) * (len(RAMP) - 1)
    i = np.minimum(x.astype(int), len(RAMP) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * RAMP[i] + f * RAMP[i + 1]).astype(np.uint8)


def _as_pil(image):
    if isinstance(image, torch.Tensor):
        return to_pil(image[None] if image.ndim == 3 else image)[0]
    return image.convert("RGB")


def wrap(draw, text, width, fnt, lines=2):
    """Split `text` into at most `lines` lines that fit `width` pixels in font `fnt`."""
    out = [""]
    for word in text.split():
        trial = (out[-1] + " " + word).strip()
        if out[-1] and draw.textlength(trial, font=fnt) > width:
            out.append(word)
        else:
            out[-1] = trial
    if len(out) > lines:
        out = out[:lines]
        out[-1] += " ..."
    return out


def colour_bar(height, width=16, fnt=None, top="max", bottom="0"):
    """A vertical RAMP bar with its end labels, `height` px tall."""
    fnt = fnt or font(12)
    label_w = int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=fnt) for s in (top, bottom))) + 6
    bar = Image.new("RGB", (width + label_w + 4, height), "white")
    ramp = np.linspace(1, 0, height - 12)[:, None].repeat(width, 1)
    bar.paste(Image.fromarray(colorize(ramp)), (2, 6))
    d = ImageDraw.Draw(bar)
    d.text((width + 6, 2), top, fill="black", font=fnt)
    d.text((width + 6, height - 18), bottom, fill="black", font=fnt)
    return bar


def heatmap_grid(image, maps: Sequence[torch.Tensor], labels: Sequence[str], cell=96, alpha=0.65,
                 title=None) -> Image.Image:
    """One tile per [h,w] map: the map, divided by its own maximum (official `show_cross_attention`),
    upsampled bilinearly and blended over `image` in grey (a PIL image or [3,H,W] in [0,1]), its label
    below; a colour bar (0 .. the tile's max) at the right."""
    if len(maps) != len(labels):
        raise ValueError(f"{len(maps)} maps and {len(labels)} labels; give one label per map")
    fnt = font(14)
    # the image in grey, so that every colour in a tile is the heatmap's
    base = np.asarray(_as_pil(image).convert("L").convert("RGB").resize((cell, cell), Image.BICUBIC), np.float32)
    top = 22 if title else 0
    tiles = Image.new("RGB", (cell * len(maps) + 4 * len(maps), top + cell + 22), "white")
    d = ImageDraw.Draw(tiles)
    if title:
        d.text((2, 2), title, fill="black", font=fnt)
    for j, (m, label) in enumerate(zip(maps, labels)):
        m = m.detach().float().cpu()[None, None]
        m = F.interpolate(m, size=(cell, cell), mode="bilinear", align_corners=False)[0, 0].numpy()
        m = m / max(float(m.max()), 1e-12)
        tile = (1 - alpha) * base + alpha * colorize(m)
        x = j * (cell + 4)
        tiles.paste(Image.fromarray(tile.astype(np.uint8)), (x, top))
        text = wrap(d, label, cell, fnt, lines=1)[0]
        d.text((x + (cell - d.textlength(text, font=fnt)) / 2, top + cell + 3), text, fill="black", font=fnt)
    bar = colour_bar(cell, fnt=font(12), top="max", bottom="0")
    out = Image.new("RGB", (tiles.width + bar.width, tiles.height), "white")
    out.paste(tiles, (0, 0))
    out.paste(bar, (tiles.width, top))
    return out


def token_labels(tokenizer, prompt: str) -> List[str]:
    ids = tokenizer(prompt).input_ids[1:-1]
    return [tokenizer.decode([i]).strip() for i in ids]


def cross_attention_grid(image, maps: torch.Tensor, labels: List[str], cell=96, title=None) -> Image.Image:
    """image [3,H,W] in [0,1] (or PIL); maps [h,w,77] for one prompt; `labels` for tokens 1..len(labels)
    (see `token_labels`). One tile per token."""
    return heatmap_grid(image, [maps[..., j + 1] for j in range(len(labels))], labels, cell, title=title)


def attention_grid(word_maps, image=None, cell=96, title=None) -> Image.Image:
    """The tiles of `attention_maps(...)`'s {word: [h,w]} over its image (or `image`)."""
    image = image if image is not None else getattr(word_maps, "image", None)
    if image is None:
        raise ValueError("attention_grid needs an image: pass image=, or maps from attention_maps()")
    return heatmap_grid(image, list(word_maps.values()), list(word_maps.keys()), cell,
                        title=title if title is not None else getattr(word_maps, "prompt", None))


def self_attention_components(maps: torch.Tensor, k=6, cell=96) -> Image.Image:
    """maps [h,w,h*w] (self-attention averaged over layers and steps) -> its top-k right singular
    vectors as images (official `show_self_attention_comp`), each normalised to [0,1] and scaled up
    with nearest-neighbour (one block = one query position), labelled with its rank."""
    h, w = maps.shape[:2]
    a = maps.reshape(h * w, h * w).float().cpu()
    a = a - a.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    k = min(k, vh.shape[0])
    fnt = font(14)
    grid = Image.new("RGB", ((cell + 4) * k, 22 + cell + 22), "white")
    d = ImageDraw.Draw(grid)
    d.text((2, 2), f"self-attention SVD components, {h}x{w} maps (each scaled to its range)", fill="black", font=fnt)
    for i in range(k):
        v = vh[i].reshape(h, w)
        v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
        img = Image.fromarray(colorize(v.numpy())).resize((cell, cell), Image.NEAREST)
        x = i * (cell + 4)
        grid.paste(img, (x, 22))
        text = f"#{i + 1}"
        d.text((x + (cell - d.textlength(text, font=fnt)) / 2, 22 + cell + 3), text, fill="black", font=fnt)
    return grid


class SavesImages:
    """For results with `images` [n,3,H,W] in [0,1]: `.pil()` and `.save(folder)`. A result names its
    files with `image_names(n)`."""

    def image_names(self, n):
        return [f"image_{i:02d}.png" for i in range(n)]

    def pil(self) -> List[Image.Image]:
        return to_pil(self.images)

    def save(self, folder, force=False) -> List[str]:
        """Write every image into `folder` (created if needed), all or none; an existing file is an
        error unless `force=True`. Returns the paths written."""
        images = self.pil()
        names = self.image_names(len(images))
        taken = [n for n in names if os.path.lexists(os.path.join(folder, n))]
        if taken and not force:
            raise ValueError(f"{os.path.join(folder, taken[0])} exists; pass force=True or choose another folder")
        with Staged(folder, force) as out:
            for im, name in zip(images, names):
                out.save(im, name)
        return [os.path.join(folder, n) for n in names]
