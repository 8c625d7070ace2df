"""Semantic correspondence with diffusion features (DIFT: Tang et al., NeurIPS 2023).

A point in the source image is matched to the target pixel whose feature is closest in cosine
similarity, the features being upsampled to each image's own size first. This follows DIFT's
`eval_spair.py` (Tsingularity/dift, HEAD):

- each image is resized, without cropping, to a square the model's size (DIFT: `img.resize(img_size)`
  to 768x768 for SD 2.1, src/models/dift_sd.py:276-277), features come from one UNet call at t with
  `ensemble` noise draws averaged (dift_sd.py:285-291; our `extract`);
- the features of each image are upsampled bilinearly (align_corners=False) back to that image's
  original size (eval_spair.py:94-95), so points and matches are in original pixels;
- the source vector is read at the point's pixel (eval_spair.py:113; we round a float point to the
  nearest pixel), both sides are L2-normalised, the cosine map's argmax is the match in row-major
  order, first maximum on ties (eval_spair.py:114-119);
- PCK: a match is correct when distance / threshold <= alpha, threshold = max(w, h) of the target's
  bounding box (eval_spair.py:100, 121-122).

The VAE posterior is sampled per ensemble row, as DIFT does (dift_sd.py:178); the draws come from
`extract`'s seeded generator, so a run is reproducible.

Memory: the full upsampled feature map would be C x H x W floats (3 GB for SD 2.1's 1280 channels at
768x768), so `match` upsamples a few channels at a time and accumulates the dot products and norms;
the N x H x W similarity is formed for a group of points at a time.
"""
import os
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from .extract import DIFT_T, extract

_BUDGET = 1 << 24  # floats per upsampled chunk and per similarity block (64 MB)


def prepare(image, size: int, arg: str) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """A path, PIL image or [3,H,W] / [1,3,H,W] tensor in [0,1] -> ([3,size,size] tensor, original (H, W)).
    Resized without cropping, as DIFT does (PIL's bicubic; antialiased bicubic for tensors)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        if not os.path.isfile(image):
            raise ValueError(f"{arg}: {image}: no such file")
        image = ImageOps.exif_transpose(Image.open(image))
    if isinstance(image, Image.Image):
        from ..pipeline import to_tensor
        hw = (image.height, image.width)
        return to_tensor(image.convert("RGB").resize((size, size), Image.BICUBIC))[0], hw
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{arg} must be a path, a PIL image or a [3,H,W] tensor in [0,1], not {type(image).__name__}")
    x = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if x.ndim != 3 or x.shape[0] != 3 or min(x.shape[1:]) < 1:
        raise ValueError(f"{arg} must be [3,H,W] or [1,3,H,W], got shape {tuple(image.shape)}")
    hw = tuple(x.shape[1:])
    x = x.float()
    if hw != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    return x, hw


def check_points(points, hw, arg="points") -> torch.Tensor:
    """[N,2] (x, y) inside an H x W image -> long pixel indices (rounded), ValueError naming `arg` otherwise."""
    try:
        p = torch.as_tensor(points, dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be [N, 2] numbers (x, y), got {type(points).__name__}") from None
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise ValueError(f"{arg} must have shape [N, 2] (x, y), N >= 1, got {tuple(p.shape)}")
    H, W = hw
    bad = ~(torch.isfinite(p).all(1) & (p[:, 0] >= 0) & (p[:, 0] <= W - 1) & (p[:, 1] >= 0) & (p[:, 1] <= H - 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{arg}[{i}] = ({p[i, 0].item():g}, {p[i, 1].item():g}) is outside the source image: "
                         f"x must be in [0, {W - 1}], y in [0, {H - 1}]")
    return p.round().long()


def _channel_chunks(C, hw):
    step = max(1, _BUDGET // max(1, hw[0] * hw[1]))
    return [(c, min(C, c + step)) for c in range(0, C, step)]


@torch.no_grad()
def match(src_feat: torch.Tensor, trg_feat: torch.Tensor, points: torch.Tensor, src_hw, trg_hw) -> torch.Tensor:
    """DIFT's nearest neighbour: [C,h,w] source and [C,h',w'] target features, [N,2] long pixel points
    (x, y) in the source's src_hw = (H, W) -> [N,2] float (x, y) in the target's trg_hw, exactly as if
    both maps were upsampled to those sizes, normalised and compared (eval_spair.py:94-119)."""
    C = src_feat.shape[0]
    H, W = trg_hw
    up = lambda f, hw: F.interpolate(f[None].float(), size=tuple(hw), mode="bilinear", align_corners=False)[0]
    s = torch.zeros(len(points), C, device=src_feat.device)
    for a, b in _channel_chunks(C, src_hw):  # source vectors at their pixels
        s[:, a:b] = up(src_feat[a:b], src_hw)[:, points[:, 1], points[:, 0]].T
    s = F.normalize(s, dim=1)  # eps 1e-12, as eval_spair.py:115
    group = max(1, _BUDGET // (H * W))
    out = []
    for g in range(0, len(points), group):
        sg = s[g:g + group]
        dot = torch.zeros(len(sg), H * W, device=s.device)
        sq = torch.zeros(H * W, device=s.device)
        for a, b in _channel_chunks(C, trg_hw):
            t = up(trg_feat[a:b], trg_hw).reshape(b - a, -1)
            sq += (t * t).sum(0)
            for n in range(len(sg)):  # not a matmul: pixels with equal features (the upsampled border
                dot[n] += (t * sg[n, a:b, None]).sum(0)  # repeats rows) must get equal scores, so the tie goes to the first as in DIFT
        idx = (dot / sq.sqrt().clamp_min(1e-12)).argmax(1)  # first maximum, as np.argmax
        out.append(torch.stack([idx % W, idx // W], 1))
    return torch.cat(out).float().cpu()


def correspond(sd, source_image, points, target_image, *, name=None, t: int = DIFT_T, ensemble: int = 8,
               prompt: str = "") -> torch.Tensor:
    """[N,2] float (x, y) in target pixels matching `points` (x, y) in source pixels (DIFT).

    Images: paths, PIL images or [3,H,W] tensors in [0,1], of any sizes (each is resized to the model's
    square, `sd.default_size`, as DIFT resizes SPair's images to 768x768, and its features are upsampled
    back to its own size). name: the hook point, default `dift_layer(sd)`: DIFT's up_ft_index 1 on SD (the
    output of the second up block, 1/16 of the image), its 1/16 counterpart 0 on SDXL (`layers.dift_index`).
    Both images go through the UNet in one batched call."""
    if name is None:
        from .layers import dift_layer
        name = dift_layer(sd)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    size = sd.default_size
    src, src_hw = prepare(source_image, size, "source_image")
    trg, trg_hw = prepare(target_image, size, "target_image")
    pts = check_points(points, src_hw)
    feats = extract(sd, torch.stack([src, trg]), name, t=t, prompt=prompt, ensemble=ensemble)[name]
    return match(feats[0], feats[1], pts.to(feats.device), src_hw, trg_hw)


def pck(pred, gt, bbox_size, alpha: float = 0.1) -> float:
    """Fraction of points with ||pred - gt|| / bbox_size <= alpha (DIFT's eval_spair.py:121-122, where
    bbox_size is max(w, h) of the target's box). pred, gt: [N,2]; bbox_size: a number or [N]."""
    pred, gt = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(gt, dtype=torch.float64)
    if pred.ndim != 2 or pred.shape[1] != 2 or pred.shape != gt.shape or len(pred) == 0:
        raise ValueError(f"pred and gt must both be [N, 2], N >= 1, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    size = torch.as_tensor(bbox_size, dtype=torch.float64)
    if size.ndim > 1 or (size.ndim == 1 and len(size) != len(pred)) or not (size > 0).all():
        raise ValueError(f"bbox_size must be a positive number or one per point ({len(pred)}), got {bbox_size!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    dist = (pred - gt).pow(2).sum(1).sqrt()
    return (dist / size <= alpha).double().mean().item()


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_matches(source: Image.Image, target: Image.Image, points: Sequence, matches: Sequence, min_height=256):
    """Source and target side by side (scaled up to at least `min_height`), point i and its match drawn
    in the same colour and joined by a line."""
    source, target = source.convert("RGB"), target.convert("RGB")
    k = max(1, -(-min_height // max(source.height, target.height)))
    a = source.resize((source.width * k, source.height * k), Image.NEAREST)
    b = target.resize((target.width * k, target.height * k), Image.NEAREST)
    canvas = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    d = ImageDraw.Draw(canvas)
    r = max(3, k)
    for i, ((x0, y0), (x1, y1)) in enumerate(zip(torch.as_tensor(points).tolist(), torch.as_tensor(matches).tolist())):
        c = PALETTE[i % len(PALETTE)]
        p, q = ((x0 + 0.5) * k, (y0 + 0.5) * k), ((x1 + 0.5) * k + a.width, (y1 + 0.5) * k)  # pixel centres
        d.line([p, q], fill=c, width=max(1, k // 2))
        for x, y in (p, q):
            d.ellipse([x - r, y - r, x + r, y + r], fill=c, outline=(0, 0, 0))
    return canvas
