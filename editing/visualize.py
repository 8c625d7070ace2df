"""Pictures of attention: per-token cross-attention heatmaps, and self-attention's SVD components."""
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def _heat(m: np.ndarray) -> np.ndarray:
    """[h,w] in [0,1] -> RGB uint8 with a simple blue-red ramp (no matplotlib needed)."""
    m = np.clip(m, 0, 1)[..., None]
    cold, hot = np.array([30, 30, 160], np.float32), np.array([255, 60, 20], np.float32)
    mid = np.array([250, 230, 60], np.float32)
    rgb = np.where(m < 0.5, cold + (mid - cold) * m * 2, mid + (hot - mid) * (m - 0.5) * 2)
    return rgb.astype(np.uint8)


def token_labels(tokenizer, prompt: str) -> List[str]:
    ids = tokenizer(prompt).input_ids[1:-1]
    return [tokenizer.decode([i]).strip() for i in ids]


def cross_attention_grid(image: torch.Tensor, maps: torch.Tensor, labels: List[str], cell=96, alpha=0.6) -> Image.Image:
    """image [3,H,W] in [0,1]; maps [h,w,77] for one prompt; labels for tokens 1..len(labels).

    Each cell is one token's map, normalised to its own maximum (as the official
    `show_cross_attention`), blended over the image."""
    base = np.asarray(Image.fromarray((image.permute(1, 2, 0).float().cpu().numpy() * 255).astype(np.uint8))
                      .resize((cell, cell), Image.BICUBIC), np.float32)
    cols = len(labels)
    grid = Image.new("RGB", (cell * cols, cell + 14), "white")
    d = ImageDraw.Draw(grid)
    for j, label in enumerate(labels):
        m = maps[..., j + 1].float()[None, None]
        m = F.interpolate(m, size=(cell, cell), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
        m = m / max(m.max(), 1e-12)
        cellimg = (1 - alpha) * base + alpha * _heat(m)
        grid.paste(Image.fromarray(cellimg.astype(np.uint8)), (j * cell, 0))
        d.text((j * cell + 3, cell + 1), label[:14], fill="black")
    return grid


def self_attention_components(maps: torch.Tensor, k=6, cell=96) -> Image.Image:
    """maps [h,w,h*w] (self-attention averaged over layers and steps) -> its top-k right singular
    vectors as images (official `show_self_attention_comp`), each normalised to [0,1]."""
    h, w = maps.shape[:2]
    a = maps.reshape(h * w, h * w).float().cpu()
    a = a - a.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    grid = Image.new("RGB", (cell * k, cell))
    for i in range(min(k, vh.shape[0])):
        v = vh[i].reshape(h, w)
        v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
        img = Image.fromarray((v.numpy() * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
        grid.paste(img.convert("RGB"), (i * cell, 0))
    return grid
