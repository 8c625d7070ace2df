"""`python -m sdlens features VIEW ...`: the feature commands (pca, correspond, spair, sweep).

Each view registers its parser in `add_parser` and its function in VIEWS. Like every command, a
view checks what it can before the model loads and writes all of its files or none.
"""
import argparse
import os

from ..cli import add_model_args, fraction, load_model, positive, preflight, seed
from ..outputs import Staged


def add_parser(sub):
    f = sub.add_parser("features", help="diffusion features: PCA views, correspondence, SPair-71k, probe sweeps")
    fsub = f.add_subparsers(dest="view", required=True)
    pca = fsub.add_parser("pca", help="top-3 PCA of features as RGB, one basis shared by all images")
    add_model_args(pca)
    pca.add_argument("--image", nargs="+", required=True, help="one or more images, each centre-cropped and resized")
    pca.add_argument("--layers", nargs="+", default=["output_blocks.4"], help="blocks or hook names")
    pca.add_argument("--step", type=fraction, default=0.5, help="noise level as a fraction of the inversion (0 clean, 1 noise)")
    pca.add_argument("--steps", type=positive, default=50, help="DDIM inversion steps")
    pca.add_argument("--out", required=True, help="folder for pca_<layer>_<image>.png")
    pca.add_argument("--force", action="store_true", help="overwrite files in --out")
    from .probe import DEFAULT_KINDS, KINDS, SWEEP_T, TASKS
    sw = fsub.add_parser("sweep", help="a linear probe per hook x timestep: sweep.csv and a heatmap sweep.png")
    add_model_args(sw)
    sw.add_argument("--task", choices=TASKS, default="segmentation",
                    help="per-pixel classes of rendered tiny scenes: background, circle, square, triangle, star")
    sw.add_argument("--scenes", type=positive, default=32, help="training scenes, and as many held-out test scenes")
    sw.add_argument("--t", type=timestep, nargs="+", default=list(SWEEP_T), help="timesteps, each 0 to 999")
    sw.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(DEFAULT_KINDS), metavar="KIND",
                    help=f"activation kinds to probe, of: {', '.join(KINDS)}")
    sw.add_argument("--seed", type=seed, default=0, help="chooses the scenes, the noise and the training pixels")
    sw.add_argument("--out", required=True, help="folder for sweep.csv and sweep.png")
    sw.add_argument("--force", action="store_true", help="overwrite files in --out")


def timestep(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n < 1000:  # every SD scheduler has 1000 training steps; extract() checks the model's own
        raise argparse.ArgumentTypeError(f"{text} is not a timestep from 0 to 999")
    return n


def cmd_pca(args):
    inputs = [("--image", p) for p in args.image]
    preflight(args, (), inputs)
    from ..editing import load_image
    from ..editing.pnp import inversion_latents
    from ..pipeline import to_pil
    from ..schedulers import timesteps
    from .pca import collect, pca_rgb, resolve_layers
    sd = load_model(args)
    names = resolve_layers(sd, args.layers)
    outs = {n: [f"pca_{n.replace('.', '_')}_{i:02d}.png" for i in range(len(args.image))] for n in names}
    preflight(args, [f for fs in outs.values() for f in fs], inputs)
    k = round(args.step * args.steps)
    t = list(reversed(timesteps(sd.scheduler, args.steps)))[max(k - 1, 0)]
    latents = [inversion_latents(sd, load_image(p, sd=sd), steps=args.steps, progress=True)[k] for p in args.image]
    feats = collect(sd, latents, t, names)
    with Staged(args.out, args.force) as out:
        for n in names:
            for name, rgb in zip(outs[n], pca_rgb(feats[n])):
                out.save(to_pil(rgb[None])[0].resize((sd.default_size, sd.default_size), 0), name)
    print(os.path.abspath(args.out))


def cmd_sweep(args):
    if len(set(args.t)) != len(args.t):
        raise ValueError(f"--t lists a timestep twice: {' '.join(map(str, args.t))}")
    if args.scenes < 2:
        raise ValueError("--scenes must be at least 2 (a probe needs two training scenes)")
    preflight(args, ["sweep.csv", "sweep.png"])
    from ..outputs import Text
    from .probe import probe_sweep, sweep_csv, sweep_heatmap
    sd = load_model(args)
    rows = probe_sweep(sd, task=args.task, ts=args.t, kinds=args.kinds, n_train=args.scenes, n_test=args.scenes,
                       seed=args.seed, progress=True)
    title = f"{args.task}: linear-probe mIoU, {args.scenes} train / {args.scenes} held-out scenes, seed {args.seed}"
    with Staged(args.out, args.force) as out:
        out.save(Text(sweep_csv(rows)), "sweep.csv")
        out.save(sweep_heatmap(rows, title), "sweep.png")
    print(os.path.abspath(args.out))


VIEWS = {"pca": cmd_pca, "sweep": cmd_sweep}


def run(args):
    VIEWS[args.view](args)
