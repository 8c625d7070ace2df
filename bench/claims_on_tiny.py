"""The Prompt-to-Prompt layout claim, measured on sdlens-tiny (python -m pytest bench/claims_on_tiny.py -s).
The other claims are tests: tests/test_claims_tiny.py.

- Prompt-to-Prompt: swapping a colour word keeps the layout, regenerating from the same seed
  with the new prompt does not (Hertz et al. 2023, Fig. 1-3).
"""
import numpy as np
import pytest

import sdlens
from sdlens.editing import PromptToPrompt
from sdlens.tiny.checker import check, mask_iou


@pytest.fixture(scope="module")
def tiny():
    return sdlens.load()


def test_p2p_colour_swap_keeps_layout(tiny):
    """Layout: IoU between the source object's mask and the edited object's mask."""
    kept, regen, obeyed = [], [], 0
    for seed in range(4):
        src, tgt = "a big red star", "a big blue star"
        r = PromptToPrompt(tiny, src, [tgt], steps=50).run(seed=seed)
        a, b = sdlens.pipeline.to_pil(r.images)
        c = tiny.generate(tgt, seed=seed, progress=False)[0]
        kept.append(mask_iou(a, b, "red", "blue"))
        regen.append(mask_iou(a, c, "red", "blue"))
        obeyed += check(b, "blue", "star")["color"]
    print(f"layout IoU: P2P {np.mean(kept):.2f} {np.round(kept, 2)}, regenerated {np.mean(regen):.2f} {np.round(regen, 2)}")
    assert np.mean(kept) > 0.5 and np.mean(kept) > np.mean(regen) + 0.15, (kept, regen)
    assert obeyed >= 3


