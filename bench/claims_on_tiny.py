"""The Prompt-to-Prompt layout claim, measured on sdlens-tiny (python -m pytest bench/claims_on_tiny.py -s).
The other claims are tests: tests/test_claims_tiny.py.

- Prompt-to-Prompt: swapping a colour word keeps the layout, regenerating from the same seed
  with the new prompt does not (Hertz et al. 2023, Fig. 1-3).

16 word swaps drawn by a seeded generator (any shape; any two colours of one token each, since a
word swap needs equal token counts: "cyan" is two), each from its own seed. Layout: IoU of the
foreground masks of the source and the result.
"""
import random

import numpy as np
import pytest

import sdlens
from sdlens.editing import PromptToPrompt
from sdlens.editing.words import token_ids
from sdlens.tiny.checker import check, mask_iou
from sdlens.tiny.scenes import COLORS, SHAPES


@pytest.fixture(scope="module")
def tiny():
    return sdlens.load()


def swaps(tokenizer, n=16, seed=0):
    rng = random.Random(seed)
    colours = [c for c in COLORS if len(token_ids(tokenizer, c)) == 3]  # <bos> word <eos>
    article = lambda w: ("an " if w[0] in "aeiou" else "a ") + w
    for i in range(n):
        shape, a, b = rng.choice(SHAPES), *rng.sample(colours, 2)
        yield article(f"big {a} {shape}"), article(f"big {b} {shape}"), b, shape, i


def test_p2p_colour_swap_keeps_layout(tiny):
    kept, regen, obeyed = [], [], 0
    for src, tgt, colour, shape, seed in swaps(tiny.tokenizer):
        r = PromptToPrompt(tiny, src, [tgt], steps=50).run(seed=seed)
        a, b = sdlens.pipeline.to_pil(r.images)
        c = tiny.generate(tgt, seed=seed, progress=False)[0]
        kept.append(mask_iou(a, b))
        regen.append(mask_iou(a, c))
        obeyed += check(b, colour, shape)["color"]
        print(f"{src!r} -> {tgt!r}, seed {seed}: IoU P2P {kept[-1]:.2f}, regenerated {regen[-1]:.2f}")
    gap = np.array(kept) - np.array(regen)
    print(f"layout IoU: P2P {np.mean(kept):.3f}, regenerated {np.mean(regen):.3f}, gap {gap.mean():.3f} "
          f"(standard error {gap.std(ddof=1) / len(gap) ** 0.5:.3f}); target colour obeyed {obeyed}/{len(gap)}")
    assert obeyed >= 0.9 * len(gap)
    assert np.mean(kept) > 0.5 and gap.mean() > 0.15, (kept, regen)
