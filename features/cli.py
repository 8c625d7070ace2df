"""`python -m sdlens features VIEW ...`: the feature commands (pca, correspond, spair, sweep).

Each view registers its parser in `add_parser` and its function in VIEWS. Like every command, a
view checks what it can before the model loads and writes all of its files or none.
"""
import argparse
import json
import os
import sys

from ..cli import add_model_args, at_most, check_inputs_kept, fraction, load_model, model_files, positive, preflight, seed
from ..outputs import Interrupted, Staged, Text, csv_text, fingerprint, read_resume_log


def add_parser(sub):
    f = sub.add_parser("features", help="diffusion features: PCA views, correspondence, SPair-71k, probe sweeps")
    fsub = f.add_subparsers(dest="view", required=True)
    pca = fsub.add_parser("pca", help="top-3 PCA of features as RGB, one basis shared by all images")
    add_model_args(pca)
    pca.add_argument("--image", nargs="+", required=True, help="one or more images, each centre-cropped and resized")
    pca.add_argument("--layers", nargs="+", default=None,
                     help="blocks or hook names (default: Plug-and-Play's feature ResBlock, output_blocks.4.0 on SD, "
                          "output_blocks.1.0 on SDXL)")
    pca.add_argument("--step", type=fraction, default=0.5, help="noise level as a fraction of the inversion (0 clean, 1 noise)")
    pca.add_argument("--steps", type=positive, default=50, help="DDIM inversion steps")
    pca.add_argument("--out", required=True, help="folder for pca_<layer>_<image>.png")
    pca.add_argument("--force", action="store_true", help="overwrite files in --out")
    from .probe import DEFAULT_KINDS, KINDS, SWEEP_T, TASKS
    sw = fsub.add_parser("sweep", help="a linear probe per hook x timestep: sweep.csv and a heatmap sweep.png")
    add_model_args(sw)
    sw.add_argument("--task", choices=TASKS, default="segmentation",
                    help="per-pixel classes of rendered tiny scenes: background, circle, square, triangle, star")
    sw.add_argument("--scenes", type=at_most(1024, "the probes hold every scene's features in memory"), default=32,
                    help="training scenes, and as many held-out test scenes (at most 1024)")
    sw.add_argument("--t", type=timestep, nargs="+", default=list(SWEEP_T), help="timesteps, each 0 to 999")
    sw.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(DEFAULT_KINDS), metavar="KIND",
                    help=f"activation kinds to probe, of: {', '.join(KINDS)}")
    sw.add_argument("--seed", type=seed, default=0, help="chooses the scenes, the noise and the training pixels")
    sw.add_argument("--out", required=True, help="folder for sweep.csv and sweep.png")
    sw.add_argument("--force", action="store_true", help="overwrite files in --out")

    c = fsub.add_parser("correspond", help="DIFT: match points of one image in another, drawn side by side")
    add_model_args(c)
    c.add_argument("--image", required=True, help="the source image (any size; resized, not cropped, as DIFT)")
    c.add_argument("--points", required=True, type=points_arg, help='"x,y;x,y": source pixels to match')
    c.add_argument("--target", required=True, help="the image to find them in")
    add_dift_args(c, ensemble=8)
    c.add_argument("--prompt", default="", help="text condition of the UNet call (DIFT's default: empty)")
    c.add_argument("--out", required=True, help="folder for " + ", ".join(CORRESPOND_FILES))
    c.add_argument("--force", action="store_true", help="overwrite files in --out")

    s = fsub.add_parser("spair", help="PCK@0.1 on SPair-71k's test pairs, as DIFT's eval_spair.py")
    add_model_args(s)
    s.add_argument("--data", required=True, help="SPair-71k's root: JPEGImages/, PairAnnotation/test/")
    s.add_argument("--limit", type=positive, default=None, help="only the first N pairs (sorted by category, file)")
    add_dift_args(s, ensemble=8)
    s.add_argument("--out", required=True, help="CSV file: one row per keypoint (a rerun resumes from "
                                                ".<name>.partial beside it)")
    s.add_argument("--force", action="store_true", help="overwrite --out")


CORRESPOND_FILES = ("matches.png", "matches.csv")


def points_arg(text):
    try:
        pts = [tuple(float(v) for v in p.split(",")) for p in text.split(";") if p.strip()]
    except ValueError:
        pts = None
    if not pts or any(len(p) != 2 for p in pts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of points like \"12,30;40,8\" (x,y;x,y)")
    return pts


def timestep(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n < 1000:  # every SD scheduler has 1000 training steps; extract() checks the model's own
        raise argparse.ArgumentTypeError(f"{text} is not a timestep from 0 to 999")
    return n


def add_dift_args(p, ensemble):
    from .extract import ENSEMBLE_MAX
    p.add_argument("--layer", default=None, help="hook point (default: DIFT's up_ft_index, 1 on SD and 0 on SDXL: "
                                                 "features.layers.dift_layer)")
    p.add_argument("--t", type=timestep, default=261, help="timestep (DIFT: 261)")
    p.add_argument("--ensemble", type=at_most(ENSEMBLE_MAX, "DIFT uses 8; each draw is one more UNet row per image"),
                   default=ensemble, help=f"noise draws averaged (DIFT: 8; at most {ENSEMBLE_MAX})")
    p.add_argument("--seed", type=seed, default=0, help="of the noise draws")


def check_layer(sd, layer):
    """--layer checked after the model loads, with extract's message under the flag's name."""
    from .extract import check_names
    if layer is None:
        from .layers import dift_layer
        return dift_layer(sd)
    try:
        return check_names(sd, layer)[0]
    except ValueError as e:
        raise ValueError("--layer" + str(e)[len("names"):]) from None


def cmd_pca(args):
    inputs = [("--image", p) for p in args.image]
    preflight(args, (), inputs)
    from ..inversion import inversion_latents, load_image
    from .layers import default_feature_layers
    from ..pipeline import to_pil
    from ..schedulers import timesteps
    from .pca import collect, pca_rgb, resolve_layers
    sd = load_model(args)
    names = resolve_layers(sd, args.layers or [n for m in default_feature_layers(sd) for n in sd.unet.hook_names(module=m, point="out")])
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


def cmd_correspond(args):
    from PIL import Image, ImageOps
    from .correspondence import check_points, draw_matches, match, prepare
    from .extract import extract
    preflight(args, CORRESPOND_FILES, [("--image", args.image), ("--target", args.target)])
    src_img, trg_img = (ImageOps.exif_transpose(Image.open(p)) for p in (args.image, args.target))  # as prepare()
    pts = check_points(args.points, (src_img.height, src_img.width), "--points")  # before the model loads
    sd = load_model(args)
    name = check_layer(sd, args.layer)
    (src, src_hw), (trg, trg_hw) = (prepare(p, sd.default_size, f) for f, p in (("--image", args.image),
                                                                                ("--target", args.target)))
    import torch
    f = extract(sd, torch.stack([src, trg]), name, t=args.t, prompt=args.prompt, ensemble=args.ensemble,
                seed=args.seed, progress=True)[name]
    pred = match(f[0], f[1], pts.to(f.device), src_hw, trg_hw)
    rows = ["x,y,match_x,match_y"] + [f"{a:g},{b:g},{c:g},{d:g}" for (a, b), (c, d) in zip(pts.tolist(), pred.tolist())]
    with Staged(args.out, args.force) as out:
        out.save(draw_matches(src_img, trg_img, pts, pred), "matches.png")
        out.save(Text("\n".join(rows) + "\n"), "matches.csv")
    print(os.path.abspath(args.out))


def cmd_spair(args):
    from .spair import check_images, evaluate, in_order, pair_files, read_pair, report, summarize
    files = pair_files(args.data)
    pairs = [read_pair(p, args.data) for p in files]  # every annotation checked before the model loads,
    check_images([d for d, _ in in_order(pairs, files, args.limit)])  # and every image the run will read
    partial = os.path.join(os.path.dirname(os.path.abspath(args.out)), f".{os.path.basename(args.out)}.partial")
    # --force or not, neither the CSV nor the resume log (opened for writing in place) may be a file SPair-71k
    # or the model is made of.
    data = files + [d[f"{side}_path"] for d in pairs for side in ("src", "trg")]
    check_inputs_kept([("--data", p) for p in data] + model_files(args, "--model", "--config"), [args.out, partial])
    preflight(args, (), folder=False)
    sd = load_model(args)
    name = check_layer(sd, args.layer)
    # every setting that changes a row, and what the rows are made from: a log that differs is refused
    settings = dict(model=args.model, config=args.config, layer=name, t=args.t, ensemble=args.ensemble,
                    seed=args.seed, size=sd.default_size, dtype=args.dtype, data=os.path.abspath(args.data),
                    prediction_type=sd.scheduler.prediction_type, device=str(sd.device), limit=args.limit,
                    inputs=fingerprint(data))
    done = resume(partial, settings)
    os.makedirs(os.path.dirname(partial), exist_ok=True)  # the log lives beside --out, so a rerun finds it
    with open(partial, "w") as log:  # rewritten whole: a line cut short by an interruption goes
        log.write("".join(json.dumps(x) + "\n" for x in [settings] + list(done.items())))

        def on_pair(fname, rows):
            log.write(json.dumps([fname, rows]) + "\n")
            log.flush()

        try:
            rows = evaluate(sd, args.data, limit=args.limit, name=name, t=args.t, ensemble=args.ensemble,
                            seed=args.seed, progress=True, done=done, on_pair=on_pair)
        except KeyboardInterrupt:  # --out is not written, but the finished pairs are kept for a rerun
            raise Interrupted(f"{args.out} was not written; the finished pairs are kept in {partial}, and the same "
                              "command resumes from them") from None
    text = csv_text(rows)
    with Staged(os.path.dirname(os.path.abspath(args.out)), args.force) as out:
        out.save(Text(text), os.path.basename(args.out))
    os.unlink(partial)
    print(report(summarize(rows)))
    print(os.path.abspath(args.out))


ROW_KEYS = {"pair", "category", "point", "src_x", "src_y", "trg_x", "trg_y", "pred_x", "pred_y", "dist", "threshold",
            "correct"}  # features/spair.py's rows


def resume(path, settings):
    """{pair file: rows} from an interrupted run with the same settings ({} if there is none); another
    run's log, or a record that is not [pair file, its rows], is refused (`read_resume_log`)."""
    def valid(record):
        return (isinstance(record, list) and len(record) == 2 and isinstance(record[0], str)
                and isinstance(record[1], list) and record[1] and all(isinstance(r, dict) and set(r) == ROW_KEYS
                                                                      for r in record[1]))
    return {fname: rows for fname, rows in read_resume_log(path, settings, valid)}


def cmd_sweep(args):
    if len(set(args.t)) != len(args.t):
        raise ValueError(f"--t lists a timestep twice: {' '.join(map(str, args.t))}")
    if args.scenes < 2:
        raise ValueError("--scenes must be at least 2 (a probe needs two training scenes)")
    preflight(args, ["sweep.csv", "sweep.png"])
    from .probe import probe_sweep, sweep_csv, sweep_heatmap
    sd = load_model(args)
    rows = probe_sweep(sd, task=args.task, ts=args.t, kinds=args.kinds, n_train=args.scenes, n_test=args.scenes,
                       seed=args.seed, progress=True)
    title = f"{args.task}: linear-probe mIoU, {args.scenes} train / {args.scenes} held-out scenes, seed {args.seed}"
    with Staged(args.out, args.force) as out:
        out.save(Text(sweep_csv(rows)), "sweep.csv")
        out.save(sweep_heatmap(rows, title), "sweep.png")
    print(os.path.abspath(args.out))


VIEWS = {"pca": cmd_pca, "correspond": cmd_correspond, "spair": cmd_spair, "sweep": cmd_sweep}


def run(args):
    VIEWS[args.view](args)
