"""The command line with an SDXL --model (the small random SDXL of tests/conftest.py): generate writes a PNG of
the asked size with the model's own options (its zero negative context, its steps and guidance where not given,
its sampler), hooks lists SDXL's points, an sgm single file loads with --config <folder>, and the feature
commands take SDXL's DIFT layer. In-process `main()`, as tests/test_bad_input_cli.py."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import sdlens
import sdlens.__main__ as cli

PROMPT = "a red circle on the left"


def run(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


@pytest.fixture(scope="module")
def sd(sdxl_fixture):
    return sdlens.load(sdxl_fixture["folder"])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_the_asked_size(sd, sdxl_fixture, tmp_path, capsys):
    """A 32x64 image (the size also in SDXL's time ids), equal to sd.generate with the same options: no negative
    prompt is SDXL's zero context, as diffusers."""
    out = tmp_path / "x.png"
    rc, _, err = run(["generate", "--model", sdxl_fixture["folder"], "--prompt", PROMPT, "--steps", 2,
                      "--guidance", 5, "--height", 32, "--width", 64, "--seed", 3, "--out", out], capsys)
    assert rc == 0, err
    assert Image.open(out).size == (64, 32)
    want = sd.generate(PROMPT, steps=2, guidance_scale=5.0, seed=3, height=32, width=64, progress=False)[0]
    assert np.array_equal(pixels(out), np.asarray(want))


def test_generate_takes_the_models_defaults_and_sampler(sdxl_fixture, tmp_path, capsys):
    """A folder with "trailing" spacing is a turbo model (sd.defaults: 1 step, w = 0): left out, --steps and
    --guidance are those, not 50 and 7.5; --sampler euler_ancestral is the turbo models' own."""
    folder = tmp_path / "turbo"
    shutil.copytree(sdxl_fixture["folder"], folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["timestep_spacing"] = "trailing"
    cfg_path.write_text(json.dumps(cfg))
    turbo = sdlens.load(folder)
    assert turbo.defaults == {"steps": 1, "guidance_scale": 0.0}
    out = tmp_path / "t.png"
    rc, _, err = run(["generate", "--model", folder, "--prompt", PROMPT, "--sampler", "euler_ancestral",
                      "--seed", 1, "--out", out], capsys)
    assert rc == 0, err
    want = turbo.generate(PROMPT, steps=1, guidance_scale=0.0, seed=1, sampler="euler_ancestral", progress=False)[0]
    assert np.array_equal(pixels(out), np.asarray(want)) and Image.open(out).size == (64, 64)
    # --eta is DDIM's: refused with another sampler, before the model loads
    rc, _, err = run(["generate", "--model", folder, "--prompt", PROMPT, "--sampler", "euler_ancestral",
                      "--eta", 0.5, "--out", tmp_path / "e.png"], capsys)
    assert rc == 2 and "--eta 0.5 is DDIM's" in err and not (tmp_path / "e.png").exists()


def test_hooks_lists_sdxl_points_and_sgm_file_with_config(sdxl_fixture, capsys):
    rc, folder_out, err = run(["hooks", "--model", sdxl_fixture["folder"], "--height", 32], capsys)
    assert rc == 0, err
    assert "StableDiffusion(SDXL" in folder_out and "32x64 images (4x8 latents)" in folder_out
    lines = {ln.split()[0]: ln.split() for ln in folder_out.splitlines()[2:]}
    # the small SDXL's 3-deep transformers at level 2 (2x4 map); no transformer at level 0
    assert lines["output_blocks.2.1.transformer_blocks.2.attn2.hook_probs"][1:] == \
        ["cross_attention", "up", "2", "1x2", "[1,", "4,", "2,", "77]"]
    assert not any(n.startswith(("input_blocks.1.1", "output_blocks.8.1")) for n in lines)
    # the sgm single file, its configs from the folder: the same points
    rc, single_out, err = run(["hooks", "--model", sdxl_fixture["single"], "--config", sdxl_fixture["folder"],
                               "--height", 32], capsys)
    assert rc == 0, err
    assert single_out.splitlines()[1:] == folder_out.splitlines()[1:]
    # --config is for single files: a folder carries its own
    rc, _, err = run(["hooks", "--model", sdxl_fixture["folder"], "--config", "sdxl"], capsys)
    assert rc == 2 and "config= is for single files" in err


def test_features_correspond_uses_sdxls_dift_layer(sdxl_fixture, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "corr"
    rc, _, err = run(["features", "correspond", "--model", sdxl_fixture["folder"], "--image", image, "--points",
                      "3,4;60,40", "--target", image, "--ensemble", 1, "--out", out], capsys)
    assert rc == 0, err
    rows = (out / "matches.csv").read_text().splitlines()
    assert rows[0] == "x,y,match_x,match_y" and len(rows) == 3
    for r in rows[1:]:
        x, y = (float(v) for v in r.split(",")[2:])
        assert 0 <= x <= 63 and 0 <= y <= 47
    # the default layer is SDXL's DIFT counterpart: the same matches as naming it
    rc, _, err = run(["features", "correspond", "--model", sdxl_fixture["folder"], "--image", image, "--points",
                      "3,4;60,40", "--target", image, "--ensemble", 1, "--layer", "output_blocks.2.hook_out",
                      "--out", tmp_path / "corr2"], capsys)
    assert rc == 0, err
    assert (tmp_path / "corr2" / "matches.csv").read_text() == "\n".join(rows) + "\n"
