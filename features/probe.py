"""Linear probes: which activation is most discriminative, per hook point and timestep.

The task is per-pixel semantic segmentation of rendered tiny scenes (background / circle / square /
triangle / star, `tiny/labels.py`), scored by mIoU on held-out scenes. A probe is closed-form ridge
regression on one-hot labels (one-vs-rest least squares; the class is the argmax), as in the linear
probes of Baranchuk et al. 2022 but without their MLP ensemble, on per-channel standardised features.

Resolution: every probe predicts at the image's 64x64 pixels and is scored against the exact label
of every pixel, so that a coarse 4x4 map is not judged on coarse labels. It is trained on `pixels`
random pixels per training image whose features are sampled bilinearly from the hook's map (the
values `F.interpolate(bilinear)` to 64x64 would give there). At test time the probe, being affine,
runs on the hook's own map and its 5 class scores are upsampled instead: the same numbers as
upsampling the features first, at a fraction of the cost.
"""
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import whole
from .extract import check_timestep, extract, feature_names

# --kinds: (HookInfo.kind, HookInfo.point). The defaults are those Meng et al. 2024 compare (Fig. 1):
# ResBlock and block outputs (the conventional features) against attention queries, keys, values and
# cross-attention. Cross-attention k / v are made from the prompt alone and are no image features.
KINDS = {"resblock": ("resblock", "out"), "resblock_h": ("resblock", "h"), "block": ("block", "out"),
         "transformer": ("transformer", "out"), "self_q": ("self_attention", "q"), "self_k": ("self_attention", "k"),
         "self_v": ("self_attention", "v"), "self_probs": ("self_attention", "probs"),
         "self_out": ("self_attention", "out"), "cross_q": ("cross_attention", "q"),
         "cross_probs": ("cross_attention", "probs"), "cross_out": ("cross_attention", "out")}
DEFAULT_KINDS = ("resblock", "block", "self_q", "self_k", "self_v", "cross_q", "cross_probs", "cross_out")
SWEEP_T = (0, 101, 261, 501, 801)  # 261: DIFT's t (extract.DIFT_T); the rest span clean to mostly noise
TASKS = ("segmentation",)
LAMBDA = 1e-3  # ridge strength per pixel on unit-variance channels; fixed before any run, never tuned on test
PIXELS = 512  # training pixels drawn per training image (of 4096): enough rows for <= 512 channels


@dataclass
class Probe:
    """Class scores = ((x - mean) / std) @ weight + bias, for a feature vector x at one pixel."""
    weight: torch.Tensor  # [C, K]
    bias: torch.Tensor  # [K]
    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]

    def scores(self, feats: torch.Tensor, size) -> torch.Tensor:
        """[N, C, h, w] -> [N, K, *size]: scores on the map, then bilinearly upsampled (equal to scoring
        upsampled features, since the probe is affine and bilinear weights sum to 1)."""
        w = self.weight / self.std[:, None]
        s = torch.einsum("nchw,ck->nkhw", feats.float(), w) + (self.bias - self.mean @ w)[None, :, None, None]
        return s if tuple(s.shape[-2:]) == tuple(size) else F.interpolate(s, size=size, mode="bilinear", align_corners=False)

    def predict(self, feats: torch.Tensor, size) -> torch.Tensor:
        return self.scores(feats, size).argmax(1)


def fit_ridge(X: torch.Tensor, Y: torch.Tensor, lam: float = LAMBDA):
    """argmin_{W,b} (1/n) ||X W + b - Y||^2 + lam ||W||^2 (the intercept is not penalised), in closed
    form: W = (Xc^T Xc + n lam I)^-1 Xc^T Yc on centred Xc, Yc; b = mean(Y) - mean(X) W. Float64."""
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or len(X) == 0:
        raise ValueError(f"X and Y must be [n, C] and [n, K] with the same n > 0, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if not lam > 0:
        raise ValueError(f"lam must be positive (it keeps collinear channels solvable), got {lam!r}")
    X, Y = X.double(), Y.double()
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    A = Xc.T @ Xc + len(X) * lam * torch.eye(X.shape[1], dtype=X.dtype)
    W = torch.linalg.solve(A, Xc.T @ Yc)
    return W, my - mx @ W


def sample_pixels(feats: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size) -> torch.Tensor:
    """feats [N, C, h, w]; ys, xs [N, P] pixel indices of a `size` image -> [N, P, C]: the values of the
    map bilinearly upsampled to `size` (align_corners=False, as F.interpolate) at those pixels."""
    H, W = size
    gx = (xs.float() + 0.5) / W * 2 - 1  # pixel centres in grid_sample's [-1, 1] coordinates
    gy = (ys.float() + 0.5) / H * 2 - 1
    grid = torch.stack([gx, gy], -1)[:, :, None]  # [N, P, 1, 2]
    out = F.grid_sample(feats.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def fit_probe(feats: torch.Tensor, labels: torch.Tensor, classes: int, *, pixels: int = PIXELS,
              lam: float = LAMBDA, seed: int = 0) -> Probe:
    """Ridge probe from features [N, C, h, w] to labels [N, H, W] (class indices < classes), on
    `pixels` pixels per image drawn uniformly without replacement (a fixed generator)."""
    labels = torch.as_tensor(labels).long()
    N, H, W = labels.shape
    if feats.ndim != 4 or len(feats) != N:
        raise ValueError(f"feats must be [N, C, h, w] with N = {N} images, got {tuple(feats.shape)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(H * W, generator=g)[:pixels] for _ in range(N)])  # [N, P]
    ys, xs = idx // W, idx % W
    X = sample_pixels(feats, ys, xs, (H, W)).reshape(-1, feats.shape[1]).double()
    Y = F.one_hot(torch.gather(labels.reshape(N, -1), 1, idx).reshape(-1), classes).double()
    mean, std = X.mean(0), X.std(0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))  # constant channels stay 0
    Wt, b = fit_ridge((X - mean) / std, Y, lam)
    return Probe(Wt.float(), b.float(), mean.float(), std.float())


def confusion(pred: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """[K, K] counts, row = true class, column = predicted class, over every pixel."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    return torch.bincount(labels * classes + pred.reshape(-1).long(), minlength=classes ** 2).reshape(classes, classes)


def miou(pred: torch.Tensor, labels: torch.Tensor, classes: int):
    """(mean IoU, [IoU per class]) over all pixels of the set; a class absent from both prediction
    and truth has IoU nan and is left out of the mean (as in mmseg's and Cityscapes' mIoU)."""
    c = confusion(pred, labels, classes).double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return float(np.nanmean(iou.numpy())), iou.tolist()


def probe_score(train_feats, train_labels, test_feats, test_labels, classes: int, **fit_args):
    """Fit on the training set, return (mIoU, per-class IoU) on the test set."""
    test_labels = torch.as_tensor(test_labels).long()
    probe = fit_probe(train_feats, train_labels, classes, **fit_args)
    return miou(probe.predict(test_feats, tuple(test_labels.shape[-2:])), test_labels, classes)


def probe_names(unet, kinds: Sequence[str] = DEFAULT_KINDS) -> List[str]:
    """The image-feature hooks of `kinds`, grouped by kind in the order given, each group in UNet order."""
    bad = [k for k in kinds if k not in KINDS]
    if isinstance(kinds, str) or not kinds or bad:
        raise ValueError(f"kinds must be a non-empty list of {', '.join(KINDS)}; got {kinds!r}")
    out = []
    for k in dict.fromkeys(kinds):
        kind, point = KINDS[k]
        out += feature_names(unet, kind=kind, point=point)
    return out


def kind_of(info) -> str:
    return next(k for k, v in KINDS.items() if v == (info.kind, info.point))


def scene_seeds(seed: int, n: int, split: str) -> List[int]:
    """Disjoint scene seeds for the training and the held-out split of one sweep seed."""
    base = 1_000_000 * seed + (0 if split == "train" else 500_000)
    return list(range(base, base + n))


def random_unet(sd, seed: int = 0):
    """A shallow copy of `sd` whose UNet has the same shape but untrained weights (PyTorch's default
    initialisation under torch.manual_seed(seed)); VAE, text encoder and scheduler are shared. The
    baseline that says what training added."""
    from ..unet import UNetModel
    other = copy.copy(sd)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        other.unet = UNetModel(sd.unet.cfg).to(sd.device, sd.dtype).eval()
    return other


def _check_count(name, v, lo):
    whole(name, v, lo)


@torch.no_grad()
def probe_sweep(sd, task: str = "segmentation", ts: Sequence[int] = SWEEP_T, kinds: Sequence[str] = DEFAULT_KINDS,
                names: Optional[Sequence[str]] = None, n_train: int = 32, n_test: int = 32, seed: int = 0,
                baselines: bool = True, progress: bool = False) -> List[Dict]:
    """One linear probe per hook x timestep; rows {hook, kind, t, miou, iou_<class>...} in hook order.

    Features come from `extract` (forward-process noise to t, prompt "", ensemble 1: a probe averages
    over thousands of pixels, so one noise draw per image suffices), all hooks of one t in one call.
    names: hooks to probe (default: `probe_names(sd.unet, kinds)`). Scenes: `tiny.labels.labelled_scenes`
    on `scene_seeds(seed, n, "train" / "test")`; seed also fixes the noise and the training pixels.
    baselines adds rows for raw pixels (RGB at 64x64) and the VAE latents (kind "baseline", t None).
    A model whose `default_size` is not 64 (real SD: 512) sees the scenes enlarged (nearest) to it;
    the probes still predict the 64x64 labels."""
    from ..tiny.labels import CLASSES, labelled_scenes
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    _check_count("n_train", n_train, 2)
    _check_count("n_test", n_test, 1)
    _check_count("seed", seed, 0)
    ts = [ts] if isinstance(ts, int) else list(ts)
    if not ts or len(set(ts)) != len(ts):
        raise ValueError(f"ts must be one or more distinct timesteps, got {ts!r}")
    ts = [check_timestep(sd, t) for t in ts]
    names = probe_names(sd.unet, kinds) if names is None else list(names)
    if not names:
        raise ValueError(f"no hook of kinds {', '.join(kinds)} in this UNet; see `python -m sdlens hooks`")
    train_im, train_lab, _ = labelled_scenes(scene_seeds(seed, n_train, "train"))
    test_im, test_lab, _ = labelled_scenes(scene_seeds(seed, n_test, "test"))
    K = len(CLASSES)
    fit = dict(seed=seed)

    def row(hook, kind, t, feats_train, feats_test):
        m, ious = probe_score(feats_train, train_lab, feats_test, test_lab, K, **fit)
        return dict(hook=hook, kind=kind, t=t, miou=m, **{f"iou_{c}": v for c, v in zip(CLASSES, ious)})

    rows = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(ts) * (len(names) + 1), desc="probe sweep")
    images = train_im + test_im
    size = getattr(sd, "default_size", None)
    if size and size != images[0].width:  # real SD: 512x512 inputs (nearest keeps the flat colours); labels stay 64x64
        images = [im.resize((size, size), 0) for im in images]
    for t in ts:
        feats = extract(sd, images, names, t=t, seed=seed, max_rows=32)
        if bar:
            bar.update(1)
        for n in names:
            f = feats.pop(n).cpu()
            rows[n, t] = row(n, kind_of(sd.unet.hook_info(n)), t, f[:n_train], f[n_train:])
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    out = [rows[n, t] for n in names for t in ts]
    if baselines:
        from ..pipeline import to_tensor
        x = to_tensor(train_im + test_im)
        out.append(row("pixels", "baseline", None, x[:n_train], x[n_train:]))
        xm = to_tensor(images)
        z = torch.cat([sd.encode_image(xm[i:i + 32].to(sd.device)).float().cpu() for i in range(0, len(xm), 32)])
        out.append(row("latents", "baseline", None, z[:n_train], z[n_train:]))
    return out


def sweep_csv(rows: List[Dict]) -> str:
    """The rows as CSV text: hook, kind, t (empty for baselines), miou, iou_<class>... (nan: class absent)."""
    from ..outputs import csv_text
    return csv_text(rows, list(rows[0]), lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))


def sweep_heatmap(rows: List[Dict], title: str = "") -> "Image.Image":
    """Hooks (rows, grouped by kind, UNet order within a kind) x t (columns), each cell its mIoU on one
    fixed 0..1 scale so that runs compare; baselines (no t) span their row. A colour bar at the right."""
    from PIL import Image, ImageDraw
    from ..visualize import colorize, colour_bar, font
    ts = sorted({r["t"] for r in rows if r["t"] is not None})
    hooks = list(dict.fromkeys((r["kind"], r["hook"]) for r in rows))
    value = {(r["hook"], r["t"]): r["miou"] for r in rows}
    fnt, small = font(11), font(9)
    d0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(d0.textlength(h, font=fnt) for _, h in hooks)) + 14  # names start at x = 6
    cell_w, cell_h, top = 44, 14, 36
    kinds = list(dict.fromkeys(k for k, _ in hooks))
    height = top + cell_h * len(hooks) + 16 * len(kinds) + 4
    grid = Image.new("RGB", (label_w + cell_w * len(ts) + 4, height), "white")
    d = ImageDraw.Draw(grid)
    d.text((2, 2), title or "linear-probe mIoU on held-out scenes", fill="black", font=fnt)
    for j, t in enumerate(ts):
        d.text((label_w + j * cell_w + 4, top - 14), f"t={t}", fill="black", font=fnt)
    y, last = top, None
    for kind, hook in hooks:
        if kind != last:  # a header line per kind
            d.text((2, y + 2), kind, fill=(40, 40, 160), font=fnt)
            y, last = y + 16, kind
        d.text((6, y + 1), hook, fill="black", font=fnt)
        for j, t in enumerate(ts):
            v = value.get((hook, t), value.get((hook, None)))
            if v is None:
                continue
            x = label_w + j * cell_w
            rgb = tuple(int(c) for c in colorize(np.array([[v]]))[0, 0])
            d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=rgb)
            d.text((x + 8, y + 1), f"{v:.2f}", fill="white" if v < 0.6 else "black", font=small)
        y += cell_h
    bar = colour_bar(min(240, height - top), fnt=fnt, top="mIoU 1", bottom="0")
    out = Image.new("RGB", (grid.width + bar.width, height), "white")
    out.paste(grid, (0, 0))
    out.paste(bar, (grid.width, top))
    return out
