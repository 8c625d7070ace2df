"""The freeu, pag, style-aligned and attend-excite commands: each writes the method's images beside a
plain generate from the same seed, all or none; bad input is one line, exit 2, nothing written."""
import os

import pytest
from PIL import Image

from sdlens.__main__ import main


def run(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, files", [
    (["freeu", "--prompt", "a big red circle on the left"], ["freeu.png", "plain.png"]),
    (["pag", "--prompt", "a yellow star in the center", "--layers", "mid", "up"], ["pag.png", "plain.png"]),
    (["style-aligned", "--prompt", "a big red circle on the left", "a small square at the top"],
     ["plain_0.png", "plain_1.png", "style_aligned_0.png", "style_aligned_1.png"]),
    (["attend-excite", "--prompt", "an orange square next to a cyan star", "--words", "square", "star"],
     ["attend_excite.png", "plain.png"]),
])
def test_command_writes_the_method_beside_a_plain_run(tmp_path, capsys, argv, files):
    out = tmp_path / "out"
    assert run(argv + ["--steps", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == files
    assert all(Image.open(out / f).size == (64, 64) for f in files)
    assert run(argv + ["--steps", "2", "--out", str(out)]) == 2  # exists: --force or another --out
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["pag", "--prompt", "x", "--pag-scale", "-1"], "--pag-scale"),
    (["pag", "--prompt", "x", "--layers", "middle"], "--layers"),
    (["style-aligned", "--prompt", "only one"], "two or more"),
    (["freeu", "--prompt", "x", "--b1", "nan"], "--b1"),
    (["attend-excite", "--prompt", "a red circle", "--words", "dog"], "dog"),
    (["attend-excite", "--prompt", "a red circle", "--words", "circle", "--max-iter-to-alter", "0"],
     "--max-iter-to-alter"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, argv, says):
    out = tmp_path / "out"
    rc = run(argv + ["--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert not out.exists()
