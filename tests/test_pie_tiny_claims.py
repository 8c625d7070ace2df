"""PnPInversion's headline on PIE-tiny: with P2P at w = 7.5, direct and null-text inversion keep the
background far better than DDIM inversion, and the edits are obeyed.

Criterion and seeds fixed on 2026-11-23 BEFORE the first run of this test (no exploration run was
made on these items): PIE-tiny made with seed 1 (the README's table uses seed 0), n = 4 (one item
per editing type: shape, add object, colour, background), 20 DDIM steps at w = 7.5 (PIE's guidance;
fewer steps than its 50 so the test stays under a minute), P2P as PnPInversion runs it (faithful).
- background kept: the mean unedited-part PSNR of direct+p2p and of null-text+p2p each exceed
  ddim+p2p's by at least 3 dB, and each is ahead of ddim+p2p on at least 3 of the 4 items;
- edits obeyed: the checker finds the edit in at least half of the direct+p2p and null-text+p2p
  images together (ground-truth renders score 100%, unedited sources 0%: tests/test_pie_tiny.py).

Run at 15 steps since 2026-12-06, where both verdicts were measured unchanged before the switch (same
criterion): background FALSE at 20 (direct +0.7 dB, null-text -1.6) and at 15 (null-text 22.92 dB vs
ddim 23.34, ahead on 1/4; direct 27.34, +4.0 on 4/4, holds alone); edits obeyed TRUE at both with the
same per-image results (5/8). At 12 the second verdict flips (3/8), at 10 too.
"""
import pytest

from sdlens.editbench.run import run_bench
from sdlens.editbench.tiny import TinyMetrics, make_tiny

METHODS = ["ddim+p2p", "null-text+p2p", "direct+p2p"]
MARGIN_DB, AHEAD, SUCCESS = 3.0, 3, 0.5
STEPS = 15


@pytest.fixture(scope="module")
def rows(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("pie-tiny") / "data"
    items = make_tiny(str(root), n=4, seed=1)
    return run_bench(tiny, str(root), items, METHODS, TinyMetrics(), progress=False, steps=STEPS, guidance=7.5)


@pytest.mark.xfail(strict=True, reason="measured false on PIE-tiny (first run, 2026-11-23, 20 steps): mean unedited-part PSNR "
                   "ddim+p2p 23.25 dB, direct+p2p 23.95 (+0.7, ahead on 4/4), null-text+p2p 21.62 (-1.6); per item "
                   "ddim 23.8/13.1/22.9/33.2, direct 23.9/13.1/24.9/33.9, null-text 18.7/13.0/19.8/35.0. The P2P "
                   "edit itself changes the background far more than the inversion error does on this model. "
                   "strict: it errors if the claim starts to hold, so the README's statement is revisited")
def test_direct_and_null_text_keep_the_background_better_than_ddim(rows):
    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    mean = {m: sum(r["psnr_unedit_part"] for r in rs) / len(rs) for m, rs in by.items()}
    print({m: round(v, 2) for m, v in mean.items()}, {m: [round(r["psnr_unedit_part"], 1) for r in rs] for m, rs in by.items()})
    for m in ("direct+p2p", "null-text+p2p"):
        ahead = sum(a["psnr_unedit_part"] > b["psnr_unedit_part"] for a, b in zip(by[m], by["ddim+p2p"]))
        assert mean[m] >= mean["ddim+p2p"] + MARGIN_DB and ahead >= AHEAD, (m, mean, ahead)


def test_edits_are_obeyed(rows):
    ok = [r["edit_success"] for r in rows if r["method"] in ("direct+p2p", "null-text+p2p")]
    print("edit success", ok)
    assert sum(ok) / len(ok) >= SUCCESS, ok
