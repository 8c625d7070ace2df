"""What a newcomer meets in the first hour (issue 13): the model says what it is, the hook points can
be listed with their shapes, images load at the model's size, far sizes warn, long loops show
progress, and every --help shows its defaults."""
import re
import warnings

import pytest
import torch
from PIL import Image

from sdlens.__main__ import main, parser
from sdlens.editing import PromptToPrompt, invert_image, load_image
from sdlens.editing.pnp import translate


@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (15, 9)])
def test_hook_shapes_match_a_real_forward(tiny, hw):
    """The meta-device shapes equal those a real forward records at every point, hook_probs included,
    also at sizes that the downsamplers round up (15 -> 8 -> 4)."""
    torch.manual_seed(0)
    z, ctx = torch.randn(1, 4, *hw), tiny.encode_prompt(["a red circle"])
    _, cache = tiny.unet.run_with_cache(z, 500, ctx, names=lambda n: True)
    assert tiny.unet.hook_shapes(*hw) == {n: tuple(v.shape) for n, v in cache.items()}
    assert len(cache) == len(tiny.unet.hook_names())


def test_describe_lists_every_point_with_its_map(tiny):
    table = tiny.unet.describe(16, 8).splitlines()
    assert table[0].split() == ["hook", "point", "kind", "place", "block", "map", "shape"]
    rows = {r.split()[0]: r.split() for r in table[1:]}
    assert list(rows) == tiny.unet.hook_names()
    shapes = tiny.unet.hook_shapes(16, 8)
    for name, (_, kind, place, block, hw, *_) in rows.items():
        info = tiny.unet.hook_info(name)
        assert (kind, place, int(block)) == (info.kind, info.place or "-", info.block)
        h, w = map(int, hw.split("x"))
        assert (h, w) == (-(-16 // info.downscale), -(-8 // info.downscale))  # each downsample rounds up
        if info.point == "q":  # one query per position of the map
            assert shapes[name][2] == h * w


def test_repr_says_what_the_model_is(tiny):
    text = repr(tiny)
    for part in ("64x64 images", "[B, 4, 16, 16]", "VAE factor 4", "torch.float32", "cpu", "epsilon prediction",
                 f"{len(tiny.unet.hook_names())} hook points"):
        assert part in text, (part, text)


def test_load_image_defaults_to_the_model_size(tiny, tmp_path):
    Image.new("RGB", (300, 200), "red").save(tmp_path / "photo.png")
    assert load_image(tmp_path / "photo.png", sd=tiny).size == (64, 64)
    assert load_image(tmp_path / "photo.png", 32, sd=tiny).size == (32, 32)
    with pytest.raises(TypeError, match="sd=sd"):
        load_image(tmp_path / "photo.png")


def test_sizes_far_from_the_model_warn(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 32 .. 128 is within a factor 2 of 64: silent
        tiny.generate("a red circle", steps=1, height=128, width=32, progress=False)
        tiny.encode_image(torch.rand(1, 3, 64, 64))
    with pytest.warns(UserWarning, match=r"256x64 images are far from this model's 64x64") as rec:
        tiny.generate("a red circle", steps=1, height=256, progress=False)
    assert rec[0].filename == __file__  # points at the caller, not into sdlens
    with pytest.warns(UserWarning, match="load_image"):
        tiny.encode_image(torch.rand(1, 3, 16, 16))


def bars(capsys):
    return capsys.readouterr().err


def test_long_loops_show_progress_and_can_be_silenced(tiny, capsys):
    image = torch.rand(1, 3, 64, 64)
    invert_image(tiny, image, "a red circle", "ddim", steps=2)
    assert "DDIM inversion" in bars(capsys)
    invert_image(tiny, image, "a red circle", "null-text", steps=2)
    err = bars(capsys)
    assert "null-text inversion" in err and "inner=1/10" in err
    PromptToPrompt(tiny, "a red circle", ["a blue circle"], steps=2).run(seed=0)
    assert "DDIM" in bars(capsys)
    translate(tiny, image, "a blue circle", steps=2, inversion_steps=2)
    err = bars(capsys)
    assert "DDIM inversion" in err and "DDIM:" in err
    invert_image(tiny, image, "a red circle", "null-text", steps=2, progress=False)
    PromptToPrompt(tiny, "a red circle", ["a blue circle"], steps=2).run(seed=0, progress=False)
    translate(tiny, image, "a blue circle", steps=2, inversion_steps=2, progress=False)
    assert bars(capsys) == ""


def help_of(argv, capsys, fn=main):
    with pytest.raises(SystemExit) as e:
        fn(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def commands():
    sub = next(a for a in parser()._actions if a.dest == "command")  # argparse keeps subparsers here
    return [[c] if c != "features" else [c, "pca"] for c in sub.choices]


@pytest.mark.parametrize("argv", commands(), ids=" ".join)
def test_every_help_shows_its_defaults(argv, capsys):
    text = help_of(argv, capsys)
    assert "(default: cpu)" in text and "(default: float32)" in text
    if argv[0] != "hooks":
        assert "(default: 50)" in text  # --steps
    assert "(default: None)" not in text and "(default: False)" not in text


def test_hooks_command_prints_the_table(capsys):
    assert main(["hooks", "--height", "64", "--width", "32"]) == 0
    out = capsys.readouterr().out
    assert "StableDiffusion(" in out and "16x8 latents" in out
    assert re.search(r"^input_blocks\.1\.1\.transformer_blocks\.0\.attn2\.hook_probs\s+cross_attention\s+down\s+1\s+"
                     r"16x8\s+\[1, 2, 128, 77\]$", out, flags=re.M)
    assert main(["hooks", "--height", "60"]) == 2
    assert "multiples of 8" in capsys.readouterr().err


def test_train_help_names_the_module_and_the_whole_description(capsys):
    from sdlens.tiny.train import main as train
    text = help_of([], capsys, train)
    assert text.startswith("usage: python -m sdlens.tiny.train ")
    assert "writes a diffusers folder." in text and "(default: 4000)" in text


def test_p2p_from_noise_warns_at_far_sizes(tiny):
    with pytest.warns(UserWarning, match="far from this model's 64x64"):
        PromptToPrompt(tiny, "a red circle", ["a blue circle"], steps=1).run(seed=0, height=192, width=64,
                                                                            progress=False)
