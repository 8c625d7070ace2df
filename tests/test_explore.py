"""The attention explorer page: its embedded data equals the library's maps, and its script draws them."""
import base64
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from sdlens.editing import AttentionStore, attention_maps
from sdlens.explore import explore, page_bytes, read_page

PROMPT = "a big red circle on the left"
STEPS = 4


@pytest.fixture(scope="module")
def page(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("explore")
    return explore(tiny, PROMPT, str(out), steps=STEPS, seed=0, progress=False)


def decode(path):
    """What the page's script reads, decoded here independently of `read_page`: (meta, blob bytes, script)."""
    text = open(path, encoding="utf-8").read()
    meta = json.loads(re.search(r'<script id="sdlens-meta" type="application/json">(.*?)</script>', text, re.S)[1])
    blob = base64.b64decode(re.search(r'<script id="sdlens-data" type="application/octet-stream">(.*?)</script>',
                                      text, re.S)[1])
    script = re.findall(r"<script>(.*?)</script>", text, re.S)[-1]
    return meta, blob, script


def dequantised(blob, source):
    """[..., h*w] float maps of one source: q / 255 * scale, and the scales."""
    def array(a):
        return np.frombuffer(blob, np.dtype(a["dtype"]).newbyteorder("<"), math.prod(a["shape"]),
                             a["offset"]).reshape(a["shape"])
    scales = array(source["scales"])
    return array(source["maps"]).astype(np.float32) / 255 * scales[..., None], scales


def test_maps_equal_attention_maps(tiny, page):
    """Each resolution's "all layers" maps, and the mean of its single layers, averaged over the steps,
    equal `attention_maps` at that resolution, within the quantisation (half a level of each map's max)."""
    meta, blob, _ = decode(page)
    assert meta["words"] == ["a", "big", "red", "circle", "on", "the", "left"]
    assert meta["steps"] == STEPS and len(meta["timesteps"]) == STEPS and len(meta["images"]) == STEPS
    sides = sorted({s["size"][0] for s in meta["cross"]})
    assert sides == [4, 8, 16]
    for res in sides:
        ref = attention_maps(tiny, PROMPT, seed=0, res=res, steps=STEPS)
        sources = [s for s in meta["cross"] if s["size"] == [res, res]]
        whole = sources[0]  # the resolution's mean comes first, then its layers
        assert len(whole["names"]) == max(1, len(sources) - 1)
        m, scales = dequantised(blob, whole)  # [steps, words, h*w]
        tol = scales.max() / 510 + 1e-6
        layers = [dequantised(blob, s)[0] for s in sources[1:]] or [m]
        for k, word in enumerate(meta["words"]):
            want = ref[word].numpy().reshape(-1)
            np.testing.assert_allclose(m[:, k].mean(0), want, atol=tol, rtol=0)
            np.testing.assert_allclose(np.mean([x[:, k].mean(0) for x in layers], 0), want, atol=tol, rtol=0)


def test_self_attention_and_images(tiny, page):
    """Self-attention: each query's map is a probability over the keys (sums to 1), and the steps' mean
    equals `AttentionStore`'s; the steps' images are the predicted x0, the last one near the final image."""
    from sdlens.explore import read_page
    meta, blob, _ = decode(page)
    assert [s["size"] for s in meta["self"]][0] == [8, 8]  # sdlens-tiny keeps self-attention up to 8x8
    store = AttentionStore(tiny.unet, (16, 16), max_size=8, cross=False)
    with tiny.unet.hooks(store.hooks()):
        final = tiny.generate(PROMPT, steps=STEPS, seed=0, output="tensor", progress=False)[0]
    want = store.aggregate(8, kind="self_attention")[0].reshape(64, 64).numpy()
    m, scales = dequantised(blob, meta["self"][0])  # [steps, queries, keys]
    assert m.shape == (STEPS, 64, 64)
    np.testing.assert_allclose(m.sum(-1), 1, atol=64 * scales.max() / 510)
    np.testing.assert_allclose(m.mean(0), want, atol=scales.max() / 510 + 1e-6, rtol=0)
    images = read_page(page)["images"]
    assert len(images) == STEPS and images[0].size == (64, 64)
    last = torch.from_numpy(np.asarray(images[-1], np.float32) / 255).permute(2, 0, 1)
    assert (last - final).abs().mean() < 0.03  # the last step's x0 is (nearly) the sampled image


def test_refuses_existing_page(tiny, page):
    with pytest.raises(ValueError, match="exists; pass --force") as e:
        explore(tiny, PROMPT, os.path.dirname(page), steps=1, progress=False)
    assert "\n" not in str(e.value)


def test_size_estimate_matches_page(tiny, page):
    """`page_bytes` (shapes only) counts exactly the maps the page holds."""
    meta, blob, _ = decode(page)
    est = page_bytes(tiny.unet, (16, 16), len(meta["words"]), STEPS)
    end = max(a["offset"] + math.prod(a["shape"]) * (1 if a["dtype"] == "uint8" else 4)
              for s in meta["cross"] + meta["self"] for a in (s["maps"], s["scales"]))
    assert est["cross"] + est["self"] == end == len(blob)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_script_reads_the_maps_under_node(page, tmp_path):
    """The page's own JS (decodePage, currentMap) run by node gives the maps Python decodes: checks
    the offsets, dtypes, the quantisation and the indexing of words, steps and query pixels."""
    meta, blob, script = decode(page)
    text = open(page, encoding="utf-8").read()
    meta_text = re.search(r'<script id="sdlens-meta" type="application/json">(.*?)</script>', text, re.S)[1]
    b64 = re.search(r'<script id="sdlens-data" type="application/octet-stream">(.*?)</script>', text, re.S)[1]
    (tmp_path / "meta.json").write_text(meta_text)
    (tmp_path / "data.b64").write_text(b64)
    (tmp_path / "run.js").write_text(script + r"""
const fs = require("fs");
const meta = decodePage(fs.readFileSync(process.argv[2], "utf8"), fs.readFileSync(process.argv[3], "utf8"));
const cross = currentMap(meta, {mode: "cross", word: 3, step: 2, layer: meta.default, query: [0.5, 0.5], fixed: false});
const self = currentMap(meta, {mode: "self", word: 0, step: 1, layer: 0, query: [0.4, 0.2], fixed: true});
console.log(JSON.stringify({cross: Array.from(cross.values), self: Array.from(self.values), top: self.top,
                            colour: [colour(0), colour(1)]}));
""")
    res = subprocess.run(["node", str(tmp_path / "run.js"), str(tmp_path / "meta.json"), str(tmp_path / "data.b64")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    m, _ = dequantised(blob, meta["cross"][meta["default"]])
    np.testing.assert_allclose(got["cross"], m[2, 3], rtol=1e-5, atol=1e-7)
    s, scales = dequantised(blob, meta["self"][0])
    q = int(0.4 * 8) * 8 + int(0.2 * 8)  # the query cell of [fy, fx] = [0.4, 0.2] on 8x8
    np.testing.assert_allclose(got["self"], s[1, q], rtol=1e-5, atol=1e-7)
    assert got["top"] == pytest.approx(float(scales[:, q].max()))  # one colour scale over the steps
    assert got["colour"] == [[0, 0, 4], [252, 255, 164]]


def browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(browser() is None, reason="no headless chromium")
def test_page_draws_in_a_browser(page, tmp_path):
    """Headless chromium opens the page from file://, runs its script and draws a heatmap over the image,
    a different one for each of two words chosen in the address (#word=k)."""
    from PIL import Image
    url = "file://" + os.path.abspath(page)
    common = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--window-size=1000,700", "--virtual-time-budget=3000"]
    shots = []
    for word in (3, 6):
        path = tmp_path / f"{word}.png"
        subprocess.run(common + [f"--screenshot={path}", f"{url}#word={word}"], capture_output=True, timeout=60,
                       check=True)
        shots.append(np.asarray(Image.open(path).convert("RGB"), np.int32))
    canvas = [s[90:600, 20:530] for s in shots]  # inside the 512x512 canvas at the page's top left
    assert all(len(np.unique(c.reshape(-1, 3), axis=0)) > 50 for c in canvas)  # an image with a heatmap
    assert (np.abs(canvas[0] - canvas[1]).sum(-1) > 30).mean() > 0.1  # another word, another heatmap


def test_cli_writes_the_page_and_refuses_to_overwrite(tmp_path, capsys):
    from sdlens.__main__ import main
    out = tmp_path / "page"
    assert main(["explore", "--prompt", "a red circle", "--steps", "2", "--out", str(out)]) == 0
    assert os.listdir(out) == ["index.html"] and read_page(str(out / "index.html"))["meta"]["steps"] == 2
    assert main(["explore", "--prompt", "a red circle", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err
