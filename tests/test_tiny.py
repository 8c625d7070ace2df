"""sdlens-tiny: the bundled default model, its layout, its scenes, and the checker that judges it."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import sdlens
from sdlens.tiny.checker import check, mask_iou
from sdlens.tiny.scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, random_scene, render, scene_from
from sdlens.weights.load import TINY_DIR

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}


def test_default_model_is_bundled_and_small(tiny):
    assert isinstance(tiny, sdlens.StableDiffusion) and tiny.default_size == 64
    for root, _, files in os.walk(TINY_DIR):
        for f in files:
            assert os.path.getsize(os.path.join(root, f)) <= 16 * 2 ** 20, f
    # cross-attention maps of at least 16x16 (64 px images, latent factor 4)
    with tiny.unet.record(lambda n: n.endswith("attn2.hook_probs")) as store:
        tiny.generate("a red circle", steps=1, seed=0, progress=False)
    assert max(v[0].shape[2] for v in store.values()) >= 16 * 16


def test_follows_colour_shape_and_position(tiny):
    """Fixed seeds and prompts; judged by the checker. The bench measures the rates on 120 pairs
    (this model: colour 100%, position 100%, shape 88%, where the VAE caps shape at about 82%
    of rendered scenes; chance is 12.5%, 20-50% and 25%). This run: 8/8, 8/8 and 7/8; one miss
    of margin each."""
    asks = [("red", "circle", "left"), ("blue", "square", "right"), ("yellow", "star", "center"),
            ("green", "triangle", "top"), ("purple", "square", "bottom"), ("orange", "circle", "right"),
            ("cyan", "triangle", "left"), ("pink", "star", "top")]
    prompts = [f"a big {c} {s} " + {"left": "on the left", "right": "on the right", "top": "at the top",
                                     "bottom": "at the bottom", "center": "in the center"}[p] for c, s, p in asks]
    images = tiny.generate(prompts, steps=30, guidance_scale=7.5, seed=1, progress=False)
    results = [check(im, c, s, p) for im, (c, s, p) in zip(images, asks)]
    colour, shape, position = (sum(r[k] for r in results) for k in ("color", "shape", "position"))
    assert colour >= 7 and position >= 7 and shape >= 6, results


def test_round_trips_through_its_layout(tiny, tmp_path):
    """save -> load gives the same model; the folder is also what diffusers reads (the oracle)."""
    from diffusers import UNet2DConditionModel
    from sdlens.weights.save import save_folder
    save_folder(tiny, str(tmp_path / "copy"), dtype=torch.float32)
    again = sdlens.load(tmp_path / "copy")
    for a, b in ((tiny.unet, again.unet), (tiny.vae, again.vae), (tiny.text_encoder, again.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, tiny.unet.cfg.context_dim, generator=g)
    theirs = UNet2DConditionModel.from_pretrained(TINY_DIR, subfolder="unet", local_files_only=True).float()
    with torch.no_grad():
        torch.testing.assert_close(tiny.unet(x, 500, ctx), theirs(x, 500, ctx).sample, atol=1e-5, rtol=1e-5)


def test_round_trips_through_a_single_file(tiny, tmp_path):
    """Single-file save -> load gives the same model; without the configs in the metadata the same
    keys would load with SD's head counts, norm groups and latent scale (why they are stored)."""
    from safetensors.torch import load_file, save_file
    from sdlens.weights.save import save_single_file
    path = tmp_path / "tiny.safetensors"
    save_single_file(tiny, str(path), dtype=torch.float32)
    again = sdlens.load(path)
    cfgs = lambda m: (m.unet.cfg, m.vae.cfg, m.text_encoder.cfg, m.scheduler, m.default_size)
    assert cfgs(again) == cfgs(tiny)
    ids = tiny.tokenize(["a big red star on the left"])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500
    for a, b in [(tiny.unet, again.unet), (tiny.vae, again.vae), (tiny.text_encoder, again.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        ref = tiny.unet(x, t, tiny.text_encoder(ids))
        # equal weights, yet not always bitwise equal outputs: some CPUs' kernels depend on how the
        # weights' memory is aligned (1.4e-6 on AMD EPYC)
        torch.testing.assert_close(again.unet(x, t, again.text_encoder(ids)), ref, atol=1e-5, rtol=0)
        save_file(load_file(str(path)), str(tmp_path / "bare.safetensors"))  # the same tensors, no metadata
        bare = sdlens.load(tmp_path / "bare.safetensors")
        assert not torch.allclose(bare.unet(x, t, bare.text_encoder(ids)), ref, atol=1e-3)
    with pytest.raises(FileExistsError):
        save_single_file(tiny, str(path))


def test_scenes_are_deterministic():
    a = [render(random_scene(random.Random(7)), random.Random(7)).tobytes() for _ in range(2)]
    assert a[0] == a[1]
    s = random_scene(random.Random(3))
    assert s.caption and all(o.color in COLORS and o.shape in SHAPES for o in s.objects)


def scenes(n=40):
    rng = random.Random(5)
    for i in range(n):
        c, s, p = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        sc = scene_from(s, c, rng.choice(list(SIZES)), p, rng.choice(list(BACKGROUNDS)), rng.choice(("plain", "stripes")), seed=i)
        yield render(sc, random.Random(i)), c, s, p


def test_checker_accepts_true_and_rejects_wrong():
    n = 0
    for im, c, s, p in scenes():
        for img in (im, im.filter(ImageFilter.GaussianBlur(0.7))):  # generated images are soft
            assert check(img, c, s, p) == {"color": True, "shape": True, "position": True, "found": s}
        wrong_c = next(x for x in COLORS if x != c)
        wrong_s = next(x for x in SHAPES if x != s)
        assert not check(im, wrong_c, s, p)["color"]
        assert not check(im, c, wrong_s, p)["shape"]
        assert not check(im, c, s, OPPOSITE[p])["position"]
        n += 1
    assert n == 40
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    assert check(blank, "red", "circle", "left") == {"color": False, "shape": False, "position": False, "found": None}
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert not any(check(noise, "red", "circle", "left")[k] for k in ("color", "shape", "position"))


def test_layout_iou_ignores_colour_and_sees_moves(tiny):
    """The layout measure of the editing claims: the same layout in two colours is one layout, also
    after the tiny VAE turns a near pair (orange, yellow) into mixed hues; a moved or resized object
    is not. Per-colour masks gave the VAE'd orange/yellow pair 0.39-0.57."""
    round_trip = lambda im: sdlens.pipeline.to_pil(tiny.decode_latents(tiny.encode_image(sdlens.pipeline.to_tensor(im))))[0]
    for i, (shape, a, b) in enumerate([("square", "orange", "yellow"), ("triangle", "red", "blue"), ("star", "pink", "purple")]):
        sc = scene_from(shape, a, "big", "left", "gray", "plain", seed=i)
        im_a = render(sc, random.Random(i))
        sc.objects[0].color = b
        im_b = render(sc, random.Random(i))
        assert mask_iou(im_a, im_b) == 1.0
        moved = render(scene_from(shape, b, "big", "right", "gray", "plain", seed=i), random.Random(i))
        small = render(scene_from(shape, b, "small", "left", "gray", "plain", seed=i), random.Random(i))
        assert mask_iou(im_a, moved) == 0.0 and 0.1 < mask_iou(im_a, small) < 0.5
        if a == "orange":
            assert mask_iou(round_trip(im_a), round_trip(im_b)) > 0.9
