"""Pictures: per-word attention maps, heatmap grids, results' .pil()/.save(), and the demo's page."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sdlens.editing import attention_grid, attention_maps, cross_attention_grid
from sdlens.visualize import heatmap_grid


@pytest.mark.parametrize("side", ["left", "right"])
def test_word_maps_lie_on_their_object(tiny, side):
    """With the DEFAULT maps, the "circle" and "red" maps peak on the red circle the image shows, and their
    mass lies on the prompt's side. Transposed or flipped maps, a word read from the wrong token column,
    or a default at tiny's 16x16 layers (which attend almost uniformly: the old default) would not."""
    maps = attention_maps(tiny, f"a big red circle on the {side}", seed=0, steps=10)
    assert list(maps) == ["a", "big", "red", "circle", "on", "the", side]
    rgb = np.asarray(maps.image, np.int32)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)
    assert 0.05 < red.mean() < 0.5  # the image shows a red circle
    cell = rgb.shape[0] // 8
    for word in ("circle", "red"):
        m = maps[word]
        assert m.shape == (8, 8)
        i, j = divmod(int(m.argmax()), 8)
        assert red[i * cell + cell // 2, j * cell + cell // 2], f"{word} peaks off the circle at {(i, j)}"
        left = float(m[:, :4].sum() / m.sum())
        assert (left > 0.5) if side == "left" else (left < 0.5), (word, left)


def test_default_maps_sit_where_the_papers_do():
    """object_map_size: 16x16 for SD at 512² (P2P's notebooks, Attend-and-Excite), 32x32 for SDXL at
    1024² (RoyiRa's attn_res), from the full-size topologies on the meta device."""
    from types import SimpleNamespace
    from sdlens.editing.attention_store import object_map_size
    from sdlens.unet.config import SD1, SD2, SDXL
    from sdlens.unet.model import UNetModel
    for cfg, latent, want in ((SD1, 64, (16, 16)), (SD2, 96, (24, 24)), (SDXL, 128, (32, 32)), (SDXL, 64, (16, 16))):
        with torch.device("meta"):
            sd = SimpleNamespace(unet=UNetModel(cfg))
        assert object_map_size(sd, (latent, latent)) == want, cfg


def test_words_take_their_token_columns(tiny):
    """Against a manual record() of the same sampling: a word's map is the mean of its tokens' columns
    (hand-worked: "purplish" is 3 CLIP tokens; a repeated word gathers both occurrences)."""
    prompt = "a purplish circle next to a circle."
    assert len(tiny.tokenizer("purplish", add_special_tokens=False).input_ids) == 3
    columns = {"a": [1, 8], "purplish": [2, 3, 4], "circle": [5, 9], "next": [6], "to": [7]}
    maps = attention_maps(tiny, prompt, seed=1, res=8, steps=3)
    assert list(maps) == list(columns)
    names = [n for n in tiny.unet.hook_names(kind="cross_attention", point="probs")
             if tiny.unet.hook_info(n).downscale == 2]  # 8x8 on a 16x16 latent
    with tiny.unet.record(lambda n: n in names) as rec:
        tiny.generate(prompt, steps=3, seed=1, progress=False)
    # each call: [uncond, cond] rows; mean over the 3 steps, heads and layers of the cond row
    probs = torch.stack([torch.stack([p[1] for p in rec[n]]).mean(0).mean(0) for n in names]).mean(0)  # [64, 77]
    assert probs.shape == (64, 77)
    for word, cols in columns.items():
        torch.testing.assert_close(maps[word], probs[:, cols].mean(-1).reshape(8, 8), rtol=1e-5, atol=1e-7)


def test_attention_maps_bad_input(tiny):
    with pytest.raises(ValueError, match=r"res=12.*use one of \[4, 8, 16\]"):
        attention_maps(tiny, "a red circle", res=12, steps=1)
    with pytest.raises(TypeError, match="res must be a whole number"):
        attention_maps(tiny, "a red circle", res="8", steps=1)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        attention_maps(tiny, "  ", steps=1)


def tiles(grid, n, cell=96):
    a = np.asarray(grid, np.int32)
    return [a[:cell, k * (cell + 4):k * (cell + 4) + cell] for k in range(n)]


def test_heatmaps_are_normalised_per_word_and_read_as_heat():
    """Official show_cross_attention divides each map by its own max: a map and the same map x 0.01
    give the same tile. A map hot on the left is brighter on the left (dark = no attention)."""
    image = torch.full((3, 64, 64), 0.5)
    m = torch.zeros(8, 8)
    m[:, :2] = 1.0
    m[:, 2:] = 0.05
    a, b = tiles(heatmap_grid(image, [m, 0.01 * m], ["big", "small"]), 2)
    assert np.abs(a - b).max() <= 1
    assert a[:, :20].mean() > a[:, -40:].mean() + 100
    maps77 = torch.zeros(8, 8, 77)
    maps77[..., 2] = m  # token 2 is the second label
    grid = cross_attention_grid(image, maps77, ["a", "circle"])
    assert np.abs(tiles(grid, 2)[1] - a).max() <= 1
    with pytest.raises(ValueError, match="needs an image"):
        attention_grid({"a": m})


def test_results_pil_and_save(tiny, tmp_path):
    from sdlens.editing import PromptToPrompt
    from sdlens.editing.pnp import PnPResult
    from sdlens.pipeline import to_pil
    res = PromptToPrompt(tiny, "a big red circle", ["a big blue circle"], steps=2).run(seed=0)
    pil = res.pil()
    assert len(pil) == 2 and all(isinstance(p, Image.Image) for p in pil)
    paths = res.save(tmp_path / "o")
    assert [os.path.basename(p) for p in paths] == ["source.png", "target_1.png"]
    for p, im in zip(paths, pil):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(im))
    with pytest.raises(ValueError, match="source.png exists; pass force=True"):
        res.save(tmp_path / "o")
    assert res.save(tmp_path / "o", force=True) == paths
    pnp = PnPResult(images=res.images[:1], latents=res.latents[:1], guidance_latents=[])
    assert os.listdir(os.path.dirname(pnp.save(tmp_path / "p")[0])) == ["pnp.png"]
    assert np.array_equal(np.asarray(pnp.pil()[0]), np.asarray(to_pil(res.images[:1])[0]))


def test_demo_page_references_every_image(tiny, tmp_path):
    from sdlens.tiny import demo
    out = str(tmp_path / "demo")
    seconds = demo.run(tiny, out, steps=2)
    html = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    pngs = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert srcs and all(os.path.isfile(os.path.join(out, s)) for s in srcs)
    assert set(pngs) - {"generate_grid.png"} <= set(srcs)  # every picture is on the page (the grid is named)
    # generate, 3 P2P, PnP, MasaCtrl, FreeU, PAG, StyleAligned, Attend-and-Excite, explorer, PCA, correspondence,
    # probes
    assert html.count("<section>") == html.count("Look for:") == 14
    assert "explore.html" in html and os.path.isfile(os.path.join(out, "explore.html"))
    assert demo.summary(out, seconds).startswith(
        f"sdlens demo: wrote {len(pngs) + 2} files ({len(pngs)} PNG, explore.html, index.html)")
