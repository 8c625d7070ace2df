"""DIFT-style correspondence on sdlens-tiny: every layer x timestep against three baselines.

    python bench/correspondence_on_tiny.py [--seeds 0:48] [--ensemble 8] [--csv out.csv]

Pairs come from `tiny/pairs.py` (same shape moved, recoloured, on another background; keypoints
at the centre and the vertices, ground truth from the renderer). Each image's features are matched
as DIFT does (`features.correspondence.match`) and scored with per-point PCK@0.1 of the target's box.

Measured: every block output, every ResBlock hook_out, and self-attention q and k, at each t, for
the trained UNet and for the same UNet with untrained weights (seed 0); and two baselines with no
UNet: raw pixels (RGB as the feature) and VAE latents. Prints one table per model (layers x t),
each one's best, and writes every number to --csv.

The seeds 0:48 are the exploration set; tests/test_correspond.py's claim uses other seeds.
"""
import argparse
import csv
import sys
import time

import torch

import sdlens
from sdlens.features import extract
from sdlens.features.probe import random_unet
from sdlens.tiny.pairs import images, make_pairs, pair_pck

TS = (0, 101, 261, 501, 801)


def layer_names(unet):
    return (unet.hook_names(kind="block") + unet.hook_names(kind="resblock", point="out")
            + unet.hook_names(kind="self_attention", point="q") + unet.hook_names(kind="self_attention", point="k"))


def sweep(sd, pairs, x, names, ensemble, label):
    rows = []
    for t in TS:
        t0 = time.time()
        feats = extract(sd, x, names, t=t, ensemble=ensemble, max_rows=64)
        for n in names:
            rows.append((label, n, t, pair_pck(pairs, feats[n])))
        print(f"  {label} t={t}: {time.time() - t0:.0f} s", file=sys.stderr)
    return rows


def short(n):
    return n.replace(".transformer_blocks.0.", ".").replace(".hook_", ":")


def table(rows, label):
    names = list(dict.fromkeys(r[1] for r in rows if r[0] == label))
    get = {(r[1], r[2]): r[3] for r in rows if r[0] == label}
    print(f"\n{label}: PCK@0.1 per point, layer x t")
    print(f"{'layer':34s}" + "".join(f"{t:>7d}" for t in TS))
    for n in names:
        print(f"{short(n):34s}" + "".join(f"{get[n, t]:7.3f}" for t in TS))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", default="0:48", help="pair seeds, start:stop")
    ap.add_argument("--ensemble", type=int, default=8)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    sd = sdlens.load(args.model)
    a, b = map(int, args.seeds.split(":"))
    pairs = make_pairs(range(a, b))
    x = images(pairs)
    names = layer_names(sd.unet)
    rows = [("pixels", "rgb", -1, pair_pck(pairs, x)),
            ("vae", "latent", -1, pair_pck(pairs, sd.encode_image(x).float()))]
    rows += sweep(sd, pairs, x, names, args.ensemble, "trained")
    rows += sweep(random_unet(sd, 0), pairs, x, names, args.ensemble, "random")
    for label in ("trained", "random"):
        table(rows, label)
    print(f"\nbest per model over {len(pairs)} pairs ({sum(len(p.src_kps) for p in pairs)} points), seeds {args.seeds}:")
    for label in ("pixels", "vae", "random", "trained"):
        best = max((r for r in rows if r[0] == label), key=lambda r: r[3])
        print(f"  {label:8s} {best[3]:.3f}  {best[1]}" + (f" t={best[2]}" if best[2] >= 0 else ""))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "layer", "t", "pck@0.1"])
            w.writerows(rows)


if __name__ == "__main__":
    main()
