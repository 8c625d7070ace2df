"""Every ```python block of the README and of each page in docs/ runs, as written, on sdlens-tiny: the
docs cannot rot.

Each page's blocks run in order in one namespace of their own (later blocks use `sd`, `z`, `ctx`, `e`
from earlier ones on the same page), in a temporary folder holding `photo.png`, a rendered scene of
the kind sdlens-tiny was trained on.
A line that ends in a `# needs: ...` comment (real weights, a GPU) is replaced by `pass`, so such
lines must be whole statements. Everything else runs.
"""
import os
import random
import re
import time

import glob

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
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


def test_docs_are_linked_from_the_readme():
    with open(README) as f:
        text = f.read()
    assert len(PAGES) >= 8 and all(f"(docs/{os.path.basename(p)})" in text for p in PAGES[1:])
    assert len(text.splitlines()) <= 200, "README.md is the front page: keep it short, put topics in docs/"
    for page in PAGES[1:]:  # every picture a page shows is there
        with open(page) as f:
            for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", f.read()):
                assert os.path.isfile(os.path.join(os.path.dirname(page), img)), (page, img)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    from sdlens.tiny.scenes import render, scene_from
    with open(page) as f:
        blocks = python_blocks(f.read())
    if page == README:
        assert blocks, "the README lost its Python tour"
    scene = scene_from("circle", "red", "big", "left")  # "a big red circle on the left", as in the P2P snippet
    render(scene, random.Random(0)).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__readme__"}
    t0 = time.time()
    for i, block in enumerate(blocks):
        code = compile(runnable(block), f"{os.path.relpath(page, ROOT)} python block {i + 1}", "exec")
        exec(code, ns)  # a failure names the block and the line in its traceback
    with capsys.disabled():
        print(f"\n{os.path.relpath(page, ROOT)}: {len(blocks)} Python blocks ran in {time.time() - t0:.0f} s")
