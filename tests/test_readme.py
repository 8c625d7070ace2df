"""Every ```python block of the README runs, as written, on sdlens-tiny: the README cannot rot.

The blocks run in order in one namespace (later blocks use `sd`, `z`, `ctx`, `e` from earlier ones),
in a temporary folder holding `photo.png`, a rendered scene of the kind sdlens-tiny was trained on.
A line that ends in a `# needs: ...` comment (real weights, a GPU) is replaced by `pass`, so such
lines must be whole statements. Everything else runs.
"""
import os
import random
import re
import time

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
NEEDS = re.compile(r"#\s*needs:")


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def runnable(block):
    """The block with every `# needs:` line replaced by `pass` at its indentation."""
    lines = [re.match(r"\s*", l).group() + "pass" if NEEDS.search(l) else l for l in block.splitlines()]
    return "\n".join(lines) + "\n"


def test_runnable_keeps_statements_and_drops_needs_lines():
    block = 'a = 1\nb = load("x.safetensors", device="cuda")   # needs: real weights, cuda\nif a:\n    c = 2  # needs: cuda\n'
    ns = {}
    exec(compile(runnable(block), "block", "exec"), ns)
    assert ns["a"] == 1 and "b" not in ns and "c" not in ns


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    from sdlens.tiny.scenes import render, scene_from
    with open(README) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 5, "the README lost its Python blocks"
    scene = scene_from("circle", "red", "big", "left")  # "a big red circle on the left", as in the P2P snippet
    render(scene, random.Random(0)).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__readme__"}
    t0 = time.time()
    for i, block in enumerate(blocks):
        code = compile(runnable(block), f"README.md python block {i + 1}", "exec")
        exec(code, ns)  # a failure names the block and the line in its traceback
    with capsys.disabled():
        print(f"\nREADME: {len(blocks)} Python blocks ran in {time.time() - t0:.0f} s")
