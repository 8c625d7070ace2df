"""Linear probes over hook x timestep on sdlens-tiny, against the baselines (issue #14, part 4).

    python bench/probe_sweep_on_tiny.py [--seed 1] [--scenes 32] [--t 0 101 261 501 801]

Runs `probe_sweep` on the trained tiny UNet and on the same UNet with random weights (VAE and text
encoder kept), then prints the best hook of each kind at each t, the raw-pixel and VAE-latent
baselines, and the best hook overall of each model. Seed 0 was the exploration run that chose the
claim in tests/test_probe.py; seed 1 is the held-out run that decides it.
"""
import argparse
import time
from collections import defaultdict

import sdlens
from sdlens.features.probe import DEFAULT_KINDS, SWEEP_T, probe_sweep, random_unet


def table(rows, title):
    by = defaultdict(dict)
    for r in rows:
        if r["kind"] != "baseline":
            best = by[r["kind"]].get(r["t"])
            if best is None or r["miou"] > best["miou"]:
                by[r["kind"]][r["t"]] = r
    ts = sorted({r["t"] for r in rows if r["t"] is not None})
    print(f"\n{title}: best mIoU per kind (its hook at the best t)")
    print(f"{'kind':12s} " + " ".join(f"t={t:<5d}" for t in ts) + "  best hook")
    for kind in DEFAULT_KINDS:
        if kind in by:
            top = max(by[kind].values(), key=lambda r: r["miou"])
            print(f"{kind:12s} " + " ".join(f"{by[kind][t]['miou']:<7.3f}" for t in ts) + f"  {top['hook']} (t={top['t']})")
    for r in rows:
        if r["kind"] == "baseline":
            print(f"baseline {r['hook']:10s} {r['miou']:.3f}")
    best = max((r for r in rows if r["kind"] != "baseline"), key=lambda r: r["miou"])
    print(f"best: {best['hook']} t={best['t']} mIoU {best['miou']:.3f} "
          f"({', '.join(f'{k[4:]} {v:.2f}' for k, v in best.items() if k.startswith('iou_'))})")
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scenes", type=int, default=32)
    p.add_argument("--t", type=int, nargs="+", default=list(SWEEP_T))
    a = p.parse_args()
    sd = sdlens.load()
    for name, model in (("trained UNet", sd), ("random-weights UNet", random_unet(sd, seed=a.seed))):
        t0 = time.time()
        rows = probe_sweep(model, ts=a.t, n_train=a.scenes, n_test=a.scenes, seed=a.seed, progress=True)
        table(rows, f"{name}, seed {a.seed}, {a.scenes}+{a.scenes} scenes, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
