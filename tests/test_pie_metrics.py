"""PIE-Bench metrics (editbench/metrics.py): formulas against independent implementations, masking semantics on
hand-made masks, and the model plumbing on random-weight models of the same architectures, loaded by path."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from sdlens.editbench import metrics as M

RNG = np.random.default_rng(0)
H = 64  # the formulas do not depend on 512


def _img(h=H):
    return RNG.integers(0, 256, (h, h, 3), dtype=np.uint8)


def _ssim_scipy(a, b):
    """Independent SSIM (Wang et al. 2004) with numpy/scipy: gaussian sigma 1.5 truncated to 11 taps, C1=(.01)^2,
    C2=(.03)^2, data range 1, mean over the interior that an 11-tap window covers (5-pixel border cropped)."""
    g = lambda x: gaussian_filter(x, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731 radius int(3.5*1.5+.5)=5
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    maps = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = g(x), g(y)
        vx, vy, cxy = g(x * x) - mx ** 2, g(y * y) - my ** 2, g(x * y) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.stack(maps)[:, 5:-5, 5:-5]


def test_faithful_background_metrics_match_formulas():
    src, tgt = _img(), _img()
    tgt[:32] = src[:32]  # partly similar, so SSIM is not ~0
    mask = np.zeros((H, H), np.uint8)
    mask[20:40, 10:50] = 1
    got = M.background_metrics(src, tgt, mask, "faithful")
    bg = (1 - mask)[..., None].astype(np.float64)
    a, b = src / 255.0 * bg, tgt / 255.0 * bg  # mc:305-314
    mse = np.mean((a - b) ** 2)
    assert got["mse_unedit_part"] == pytest.approx(mse, rel=1e-5)
    assert got["psnr_unedit_part"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert got["ssim_unedit_part"] == pytest.approx(_ssim_scipy(a, b).mean(), abs=1e-5)


def test_faithful_matches_torchmetrics_classes_pie_uses():
    tm = pytest.importorskip("torchmetrics")
    src, tgt = _img(), _img()
    mask = np.zeros((H, H), np.uint8)
    mask[5:30, 5:30] = 1
    got = M.background_metrics(src, tgt, mask, "faithful")
    bg = torch.from_numpy(1 - mask.astype(np.float32))
    a, b = (torch.from_numpy(i.astype(np.float32) / 255).permute(2, 0, 1) * bg for i in (src, tgt))
    assert got["psnr_unedit_part"] == pytest.approx(tm.image.PeakSignalNoiseRatio(data_range=1.0)(a[None], b[None]).item(), rel=1e-5)
    assert got["mse_unedit_part"] == pytest.approx(tm.regression.MeanSquaredError()(a.contiguous(), b.contiguous()).item(), rel=1e-5)
    # torchmetrics >= 1.5 averages the whole map; PIE's (< 1.5) dropped the 5-pixel border first (PR #2721)
    _, smap = tm.functional.image.structural_similarity_index_measure(a[None], b[None], data_range=1.0,
                                                                      return_full_image=True)
    assert got["ssim_unedit_part"] == pytest.approx(smap[..., 5:-5, 5:-5].mean().item(), abs=1e-6)


def test_masking_faithful_counts_zeroed_pixels_corrected_does_not():
    # Hand-worked: the background differs by exactly 10/255 everywhere, the edited half differs arbitrarily.
    src = RNG.integers(0, 246, (H, H, 3), dtype=np.uint8)  # textured: flat images hit float32 cancellation in SSIM
    tgt = src + 10
    tgt[:, : H // 2] = _img()[:, : H // 2]
    mask = np.zeros((H, H), np.uint8)
    mask[:, : H // 2] = 1  # background fraction f = 1/2
    f, faith = M.background_metrics(src, tgt, mask, "faithful"), M.background_metrics(src, tgt, mask, "corrected")
    mse_bg = (10 / 255) ** 2
    assert faith["mse_unedit_part"] == pytest.approx(mse_bg, rel=1e-5)
    assert f["mse_unedit_part"] == pytest.approx(mse_bg / 2, rel=1e-5)  # diluted by the zeroed half
    assert f["psnr_unedit_part"] - faith["psnr_unedit_part"] == pytest.approx(10 * math.log10(2), abs=1e-4)
    # identical backgrounds: both modes give MSE 0 / PSNR inf (the zeroed edited region is identical too)
    same = src.copy()
    same[:, : H // 2] = 0
    for mode in ("faithful", "corrected"):
        r = M.background_metrics(src, same, mask, mode)
        assert r["mse_unedit_part"] == 0 and r["psnr_unedit_part"] == math.inf
    # corrected SSIM = mean of the same map over background pixels only; faithful averages the zeroed half too
    s_map = _ssim_scipy(src / 255.0 * (1 - mask)[..., None], tgt / 255.0 * (1 - mask)[..., None])
    w = np.broadcast_to((1 - mask)[5:-5, 5:-5], s_map.shape)
    assert faith["ssim_unedit_part"] == pytest.approx((s_map * w).sum() / w.sum(), abs=1e-5)
    assert f["ssim_unedit_part"] == pytest.approx(s_map.mean(), abs=1e-5)
    assert f["ssim_unedit_part"] > faith["ssim_unedit_part"]  # zeroed pixels are perfect matches


def test_empty_background_gives_nan():
    src, tgt = _img(), _img()
    for mode in ("faithful", "corrected"):
        r = M.background_metrics(src, tgt, np.ones((H, H), np.uint8), mode)
        assert all(math.isnan(v) for v in r.values())  # ev:41-59
    rows = [{"psnr_unedit_part": 20.0}, {"psnr_unedit_part": float("nan")}, {"psnr_unedit_part": 30.0}]
    assert M.summarize(rows) == {"psnr_unedit_part": (25.0, 2, 1)}


def test_bad_input_and_missing_models(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        M.PieMetrics("exact")
    for kw in ("dino", "clip", "lpips"):
        with pytest.raises(ValueError, match=f"{kw}=.*does not exist.*download.*--{kw}"):
            M.PieMetrics(**{kw: str(tmp_path / "absent")})
    pm = M.PieMetrics()
    with pytest.raises(ValueError, match="mask"):
        pm(_img(), _img(), np.full((H, H), 2), "x")
    with pytest.raises(ValueError, match="src/tgt"):
        pm(_img(), _img(32), np.zeros((H, H)), "x")
    # metrics without a model path are absent
    assert set(pm(_img(), _img(), np.zeros((H, H), np.uint8), "x")) == {
        "psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"}


# ---- model plumbing on random-weight models, saved and loaded by path ----

@pytest.fixture(scope="module")
def dino_path(tmp_path_factory):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, patch_size=8,
                    image_size=224)  # ViT-B/8's patch and input size, tiny width
    path = tmp_path_factory.mktemp("dino")
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def test_dino_hook_gives_last_block_keys(dino_path):
    d = M.DinoKeys(dino_path)
    x = M.dino_input(_img(512), "corrected")
    out = d.model(pixel_values=x, output_hidden_states=True)
    last = d.model.layers[-1] if hasattr(d.model, "layers") else d.model.encoder.layer[-1]
    k = d.key(last.layernorm_before(out.hidden_states[-2]))[0]  # keys recomputed from the last block's input
    assert k.shape[0] == 1 + 28 * 28  # CLS + (224/8)^2 patches, as mc:120
    kn = torch.nn.functional.normalize(k, dim=1)
    torch.testing.assert_close(d.self_similarity(x), kn @ kn.T, atol=1e-5, rtol=1e-5)


def test_structure_distance_and_input_scaling(dino_path):
    pytest.importorskip("torchmetrics")
    src, tgt = _img(512), _img(512)
    faith = M.PieMetrics("faithful", dino=dino_path)
    corr = M.PieMetrics("corrected", dino=dino_path)
    mask = np.zeros((512, 512), np.uint8)
    assert faith(src, src, mask, "x")["structure_distance"] == 0
    d_faith, d_corr = (m(src, tgt, mask, "x")["structure_distance"] for m in (faith, corr))
    assert d_faith > 0 and d_corr > 0 and d_faith != pytest.approx(d_corr)
    xf, xc = M.dino_input(src, "faithful"), M.dino_input(src, "corrected")
    assert xf.shape == xc.shape == (1, 3, 224, 224)
    assert xf.max() > 400 and xc.abs().max() < 3  # 0-255 floats through ImageNet Normalize (mc:182, 386)
    mean = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    raw = torch.from_numpy(src.astype(np.float32)).permute(2, 0, 1)[None]
    plain = torch.nn.functional.interpolate(raw, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(xf, (plain - mean) / std)  # faithful: no /255, no antialias (torchvision 0.13)


def test_lpips_matches_torchmetrics_lpips_with_same_backbone(tmp_path, monkeypatch):
    tm_lpips = pytest.importorskip("torchmetrics.functional.image.lpips")
    torch.manual_seed(0)
    features = M.squeezenet1_1_features()
    path = tmp_path / "squeezenet1_1.pth"  # torchvision checkpoint layout: features.* and classifier.*
    torch.save({**{"features." + k: v for k, v in features.state_dict().items()},
                "classifier.1.weight": torch.zeros(1000, 512, 1, 1)}, path)
    mine = M.SqueezeLpips.from_file(str(path))
    # torchmetrics' own _LPIPS(net='squeeze'), its torchvision backbone swapped for the same features
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: features)
    ref = tm_lpips._LPIPS(pretrained=True, net="squeeze").eval()
    a, b = (torch.rand(1, 3, 64, 64) * 2 - 1 for _ in range(2))
    torch.testing.assert_close(mine(a, b), ref(a, b))
    torch.testing.assert_close(mine(a, b, spatial=True).mean(), ref(a, b).flatten()[0], rtol=0.05, atol=0)
    # in PieMetrics: identical backgrounds -> 0 in both modes; empty background -> NaN
    src, tgt = _img(), _img()
    mask = np.zeros((H, H), np.uint8)
    mask[:, :32] = 1
    tgt[:, 32:] = src[:, 32:]
    for mode in ("faithful", "corrected"):
        pm = M.PieMetrics(mode, lpips=str(path))
        assert pm(src, tgt, mask, "x")["lpips_unedit_part"] == pytest.approx(0, abs=1e-7)
        assert math.isnan(pm(src, tgt, np.ones((H, H), np.uint8), "x")["lpips_unedit_part"])


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from sdlens.weights import __file__ as wfile
    import os
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = CLIPConfig(text_config=small, vision_config={**small, "image_size": 224, "patch_size": 14}, projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    tok = CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(wfile), "clip_tokenizer"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(path)
    return str(path)


def test_clip_score_matches_torchmetrics_clip_score(clip_path):
    tmc = pytest.importorskip("torchmetrics.functional.multimodal")
    from transformers import CLIPModel, CLIPProcessor
    model, proc = CLIPModel.from_pretrained(clip_path).eval(), CLIPProcessor.from_pretrained(clip_path)

    class Tensors(torch.nn.Module):  # torchmetrics 1.9 expects transformers 4's tensor-returning feature calls
        config = model.config

        def get_image_features(self, *a, **k):
            return getattr(model.get_image_features(*a, **k), "pooler_output", None)

        def get_text_features(self, *a, **k):
            return getattr(model.get_text_features(*a, **k), "pooler_output", None)

    def oracle(img, text):  # torchmetrics' clip_score on the uint8 CHW tensor, as mc:297-299
        with torch.no_grad():
            return tmc.clip_score(torch.from_numpy(img).permute(2, 0, 1), text, lambda: (Tensors(), proc)).item()

    tgt = _img(512)
    mask = np.zeros((512, 512), np.uint8)
    mask[100:300, 150:400] = 1
    edited = tgt * mask[..., None]  # mc:295: uint8(image * mask)
    # random weights: use the first prompt whose two scores are not clamped to 0, so equality means something
    text = next(t for t in ("a red cat", "a photo", "two dogs on a sofa", "blue sky", "a house", "night")
                if oracle(tgt, t) > 0 and oracle(edited, t) > 0)
    r = M.PieMetrics("faithful", clip=clip_path)(_img(512), tgt, mask, text)
    assert r["clip_similarity_target_image"] == pytest.approx(oracle(tgt, text), abs=1e-4)
    assert r["clip_similarity_target_image_edit_part"] == pytest.approx(oracle(edited, text), abs=1e-4)
    assert oracle(tgt, text) != pytest.approx(oracle(edited, text), abs=1e-3)
    r = M.PieMetrics("corrected", clip=clip_path)(_img(512), tgt, np.zeros((512, 512), np.uint8), text)
    assert math.isnan(r["clip_similarity_target_image_edit_part"])  # ev:95


@pytest.mark.parametrize("content", [b"squeezenet weights, honest", "pickle"])
def test_lpips_weights_that_are_not_a_state_dict_are_one_line(tmp_path, content):
    """A text file, or a pickle of an object (which weights_only loading refuses, so no code runs), is one
    ValueError line naming --lpips and what it should be (was a multi-line torch.load traceback)."""
    pytest.importorskip("torchmetrics")
    from sdlens.editbench.metrics import SqueezeLpips
    path = tmp_path / "w.pth"
    if content == "pickle":
        import pickle
        path.write_bytes(pickle.dumps({"features.0.weight": object()}))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        SqueezeLpips.from_file(str(path))
    assert "\n" not in str(e.value) and "--lpips" in str(e.value) and "SqueezeNet" in str(e.value)
