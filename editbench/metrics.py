"""PIE-Bench's metrics (PnPInversion, Ju et al. 2024), as evaluation/matrics_calculator.py computes them.

Citations are to cure-lab/PnPInversion: "mc" = evaluation/matrics_calculator.py, "ev" = evaluation/evaluate.py.
Images are HxWx3 uint8 (512x512 in PIE), mask is HxW {0,1} with 1 = edited; "background" = 1 - mask.

  structure_distance   DINO ViT-B/8 (mc:280); keys of the last block (layer_num=11, mc:243) incl. CLS; their
                       cosine self-similarity (mc:159-171, eps 1e-8); MSE of the two maps (mc:245). Whole image,
                       no mask (ev:39). Input: Resize(224) (mc:183, 281) then ImageNet Normalize (mc:182).
  *_unedit_part        both images /255 and multiplied by (1 - mask) (mc:305-314), then torchmetrics
                       PeakSignalNoiseRatio(data_range=1.0) (mc:275), MeanSquaredError (mc:277),
                       StructuralSimilarityIndexMeasure(data_range=1.0) (mc:278; mean over the map less its
                       5-pixel border, as torchmetrics did before 1.5) and
                       LearnedPerceptualImagePatchSimilarity(net_type='squeeze') on x*2-1 (mc:276, 339).
  clip_similarity_*    torchmetrics CLIPScore(openai/clip-vit-large-patch14) (mc:274) = max(100 cos, 0) on the
                       uint8 image (mc:297), recomputed with transformers' CLIPModel (see clip_score); the
                       edit part on uint8(image * mask) (mc:295, ev:98).
  NaN                  background metrics are NaN when (1 - mask) is empty (ev:41-59); the edit-part CLIP when
                       mask is empty (ev:95).

mode="faithful" reproduces these exactly, quirks included. mode="corrected" changes (and only these):
  1. DINO input scale. PIE feeds 0-255 floats to Normalize (mc:386-387 never divide by 255), so DINO sees values
     up to ~1100 instead of ~±2.6. Corrected divides by 255 first. Effect: a different (meaningful) feature map;
     faithful numbers are only comparable with other faithful numbers.
  2. DINO resize. PIE pins torchvision 0.13.1 (README.md:71), whose Resize on tensors does not antialias; faithful
     uses bilinear without antialias, corrected with antialias (what torchvision >= 0.17 and PIL do).
  3. Background averaging. PIE averages over ALL pixels after zeroing the edited region, so the zeroed pixels count
     as perfect matches: MSE is diluted by the background fraction f (MSE_faithful = f * MSE_bg, PSNR inflated by
     -10 log10 f dB), SSIM and LPIPS pulled towards 1 and 0. Corrected averages MSE/PSNR over background pixels
     only, SSIM as the mean of the SSIM map over background pixels (the map still from the zeroed images, the
     5-pixel border still cropped), LPIPS as the mean of the spatial LPIPS map over background.
  4. NaN. PIE writes the string "nan" to its CSV (ev:42) and ships no code that averages it, so how those images
     were dropped is not documented. Both modes return NaN under the same rule; `summarize` reports how many each column dropped (in corrected mode the SSIM crop can add NaNs).
CLIP is identical in both modes.

Models are never downloaded: each is loaded from a path the caller names; a metric whose path is None is absent.
LPIPS: torchmetrics' LPIPS builds its backbone through torchvision, and no torchvision wheel runs on the CPU-only
torch here (the PyPI wheel links libtorch_cuda). So the SqueezeNet 1.1 feature stack is rebuilt below with
torchvision's module layout (torchvision/models/squeezenet.py, version "1_1") and loaded from torchvision's own
checkpoint; the LPIPS heads, scaling and normalisation are torchmetrics' (its bundled lpips_models/squeeze.pth).
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COLUMNS = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part",
           "clip_similarity_target_image", "clip_similarity_target_image_edit_part")
# Printed table (PnPInversion paper, Table 1 headers): column -> (label, scale).
TABLE = {
    "structure_distance": ("Structure x10^3", 1e3),
    "psnr_unedit_part": ("PSNR", 1.0),
    "lpips_unedit_part": ("LPIPS x10^3", 1e3),
    "mse_unedit_part": ("MSE x10^4", 1e4),
    "ssim_unedit_part": ("SSIM x10^2", 1e2),
    "clip_similarity_target_image": ("CLIP whole", 1.0),
    "clip_similarity_target_image_edit_part": ("CLIP edited", 1.0),
}
FETCH = {
    "dino": "structure distance needs DINO ViT-B/8: download facebook/dino-vitb8 "
            "(huggingface-cli download facebook/dino-vitb8 --local-dir dino-vitb8) and pass --dino dino-vitb8",
    "clip": "CLIP score needs CLIP ViT-L/14: download openai/clip-vit-large-patch14 (huggingface-cli download "
            "openai/clip-vit-large-patch14 --local-dir clip-vit-large-patch14) and pass --clip clip-vit-large-patch14",
    "lpips": "LPIPS needs torchvision's SqueezeNet 1.1 ImageNet weights: download "
             "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth and pass --lpips squeezenet1_1-b8a52dc0.pth",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # mc:182


def _torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ImportError("PIE-Bench's SSIM, LPIPS and CLIP metrics need torchmetrics: pip install 'sdlens[bench]'")
    return torchmetrics


def _check_path(path, what):
    if not os.path.exists(path):
        raise ValueError(f"{what}={path!r} does not exist; " + FETCH[what])


# ---- background metrics: PSNR / MSE / SSIM (no model) ----

def _to01(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # 1x3xHxW, mc:305


def background_metrics(src, tgt, mask, mode="faithful"):
    """PSNR, MSE, SSIM of the background (1 - mask). Returns floats, NaN when there is no background (ev:41)."""
    bg = torch.from_numpy(1 - np.asarray(mask, dtype=np.float32))[None, None]  # 1x1xHxW
    nan = float("nan")
    if bg.sum() == 0:
        return {"psnr_unedit_part": nan, "mse_unedit_part": nan, "ssim_unedit_part": nan}
    a, b = _to01(src) * bg, _to01(tgt) * bg  # mc:311-314
    sq = (a - b) ** 2
    # torchmetrics MeanSquaredError is the mean over all elements (mc:277); corrected: over background pixels only.
    mse = sq.mean() if mode == "faithful" else sq.sum() / (3 * bg.sum())
    psnr = 10 * torch.log10(1.0 / mse)  # PeakSignalNoiseRatio(data_range=1.0), mc:275; inf when mse == 0
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn
    _, smap = ssim_fn(a, b, data_range=1.0, return_full_image=True)  # defaults as mc:278: gaussian 11, sigma 1.5
    # torchmetrics < 1.5 (PIE's time) averaged the map without its 5-pixel border ((11 - 1) // 2); torchmetrics
    # PR #2721 (1.5, 2024) dropped that crop. We crop in both modes, so the number does not depend on the version.
    smap, w = smap[..., 5:-5, 5:-5], bg[..., 5:-5, 5:-5].expand(1, 3, -1, -1)
    if mode == "faithful":
        ssim = smap.mean()
    else:
        ssim = (smap * w).sum() / w.sum() if w.sum() > 0 else torch.tensor(nan)
    return {"psnr_unedit_part": psnr.item(), "mse_unedit_part": mse.item(), "ssim_unedit_part": ssim.item()}


# ---- LPIPS (SqueezeNet 1.1) ----

class Fire(nn.Module):  # torchvision/models/squeezenet.py Fire, same names so torchvision's checkpoint loads
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def squeezenet1_1_features():
    """torchvision squeezenet1_1().features, layer for layer."""
    pool = lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True), pool(),
                         Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
                         Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
                         Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))


class SqueezeLpips(nn.Module):
    """torchmetrics' _LPIPS(net='squeeze') with the backbone above; taps after features 1, 4, 7, 9, 10, 11, 12
    (torchmetrics SqueezeNet slices)."""
    TAPS, CHANNELS = (1, 4, 7, 9, 10, 11, 12), (64, 128, 256, 384, 384, 512, 512)

    def __init__(self, features):
        super().__init__()
        from torchmetrics.functional.image import lpips as tl
        self.tl, self.scaling, self.features = tl, tl.ScalingLayer(), features
        self.lins = nn.ModuleList(tl.NetLinLayer(c, use_dropout=True) for c in self.CHANNELS)
        heads = torch.load(os.path.join(os.path.dirname(tl.__file__), "lpips_models", "squeeze.pth"), map_location="cpu")
        self.lins.load_state_dict({k.replace("lin", "", 1): v for k, v in heads.items()})
        self.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path):
        _check_path(path, "lpips")
        what = f"--lpips {path}: not torchvision's SqueezeNet 1.1 weights (squeezenet1_1-b8a52dc0.pth)"
        try:  # weights only, never an untrusted pickle's code; a text or pickled file is one line
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{what}: {type(e).__name__} reading it as a PyTorch state dict") from None
        features = squeezenet1_1_features()
        try:
            if not isinstance(sd, dict):
                raise TypeError(type(sd).__name__)
            features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"{what}: its keys or shapes differ ({str(e).splitlines()[0][:80]})") from None
        return cls(features)

    def _taps(self, x):
        out = []
        for i, layer in enumerate(self.features[:self.TAPS[-1] + 1]):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, x0, x1, spatial=False):  # inputs in [-1, 1]
        f0, f1 = self._taps(self.scaling(x0)), self._taps(self.scaling(x1))
        res = 0
        for lin, a, b in zip(self.lins, f0, f1):
            d = lin((self.tl._normalize_tensor(a) - self.tl._normalize_tensor(b)) ** 2)
            res = res + (self.tl._upsample(d, tuple(x0.shape[2:])) if spatial else self.tl._spatial_average(d))
        return res  # Nx1x1x1, or Nx1xHxW when spatial


# ---- DINO structure distance ----

class DinoKeys:
    """transformers ViTModel; a forward hook on the last block's key projection gives PIE's keys (mc:140-157)."""

    def __init__(self, path):
        _check_path(path, "dino")
        from transformers import ViTModel
        self.model = ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
        # transformers >= 5 names them layers[i].attention.k_proj; 4.x encoder.layer[i].attention.attention.key
        layers = self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer
        attn = layers[-1].attention  # layer_num=11 of 12 in ViT-B (mc:243)
        self.key = attn.k_proj if hasattr(attn, "k_proj") else attn.attention.key

    @torch.no_grad()
    def self_similarity(self, x):  # x: 1x3x224x224 normalised
        got = []
        h = self.key.register_forward_hook(lambda m, i, o: got.append(o))
        try:
            self.model(pixel_values=x)
        finally:
            h.remove()
        k = got[0][0]  # tokens x (heads*dim), heads concatenated as in mc:162
        n = k.norm(dim=1, keepdim=True)
        return (k @ k.T) / torch.clamp(n @ n.T, min=1e-8)  # attn_cosine_sim, mc:166-171


def dino_input(img, mode="faithful"):
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]  # 0-255 floats, mc:386
    if mode != "faithful":
        x = x / 255
    # Resize(224) of a square image = 224x224 (mc:183); torchvision 0.13 tensors: no antialias
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=mode != "faithful")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---- all metrics ----

class PieMetrics:
    def __init__(self, mode="faithful", dino=None, clip=None, lpips=None):
        if mode not in ("faithful", "corrected"):
            raise ValueError(f"mode={mode!r}: expected 'faithful' or 'corrected'")
        _torchmetrics()
        self.mode = mode
        self.dino = DinoKeys(dino) if dino is not None else None
        self.lpips = SqueezeLpips.from_file(lpips) if lpips is not None else None
        self.clip = None
        if clip is not None:
            _check_path(clip, "clip")
            from transformers import CLIPModel, CLIPProcessor
            self.clip = (CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip))

    @torch.no_grad()
    def clip_score(self, img, text, mask=None):
        """torchmetrics CLIPScore's formula, max(100 cos(E_I, E_T), 0), and its processor call (clip_score.py
        _get_features); computed here because torchmetrics 1.9 expects transformers 4's tensor outputs."""
        model, proc = self.clip
        img = np.asarray(img)
        if mask is not None:
            img = np.uint8(img * np.asarray(mask)[..., None])  # mc:295
        pix = proc(images=[torch.from_numpy(img).permute(2, 0, 1)], return_tensors="pt", padding=True)  # mc:297
        txt = proc(text=[text], return_tensors="pt", padding=True, truncation=True)  # torchmetrics truncates too
        e_i = model.get_image_features(pixel_values=pix["pixel_values"])
        e_t = model.get_text_features(input_ids=txt["input_ids"], attention_mask=txt["attention_mask"])
        e_i, e_t = (getattr(e, "pooler_output", e) for e in (e_i, e_t))  # transformers 5 returns an output object
        return max(100 * F.cosine_similarity(e_i, e_t).item(), 0.0)

    def __call__(self, src, tgt, mask, target_prompt):
        src, tgt, mask = np.asarray(src), np.asarray(tgt), np.asarray(mask)
        if src.shape != tgt.shape or src.ndim != 3 or src.shape[2] != 3 or src.dtype != np.uint8:
            raise ValueError(f"src/tgt: expected two HxWx3 uint8 images, got {src.shape} {src.dtype} and {tgt.shape}")
        if mask.shape != src.shape[:2] or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"mask: expected HxW of 0/1 matching the images {src.shape[:2]}, got {mask.shape}")
        out = {}
        if self.dino is not None:  # whole image, no mask (ev:39); mc:243-245
            s, t = (self.dino.self_similarity(dino_input(i, self.mode)) for i in (src, tgt))
            out["structure_distance"] = F.mse_loss(t, s).item()
        out.update(background_metrics(src, tgt, mask, self.mode))
        if self.lpips is not None:
            out["lpips_unedit_part"] = self._lpips(src, tgt, mask)
        if self.clip is not None:
            out["clip_similarity_target_image"] = self.clip_score(tgt, target_prompt)
            out["clip_similarity_target_image_edit_part"] = (
                self.clip_score(tgt, target_prompt, mask) if mask.sum() > 0 else float("nan"))  # ev:95
        return {k: out[k] for k in COLUMNS if k in out}

    @torch.no_grad()
    def _lpips(self, src, tgt, mask):
        bg = torch.from_numpy(1 - mask.astype(np.float32))[None, None]
        if bg.sum() == 0:
            return float("nan")  # ev:46
        a, b = _to01(src) * bg * 2 - 1, _to01(tgt) * bg * 2 - 1  # mc:331-339
        if self.mode == "faithful":
            return self.lpips(a, b).item()
        return ((self.lpips(a, b, spatial=True) * bg).sum() / bg.sum()).item()


def summarize(rows):
    """rows: list of metric dicts -> {column: (scaled mean over non-NaN rows, n used, n NaN)} in TABLE order."""
    out = {}
    for col, (_, scale) in TABLE.items():
        vals = [r[col] for r in rows if col in r]
        if vals:
            ok = [v for v in vals if not math.isnan(v)]
            out[col] = (scale * sum(ok) / len(ok) if ok else float("nan"), len(ok), len(vals) - len(ok))
    return out
