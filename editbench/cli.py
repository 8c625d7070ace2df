"""`python -m sdlens edit-bench`: PIE-Bench editing runs -> one CSV row per image and method.

Resumable as `features spair`: finished rows go to `.<out>.partial` (JSON lines, the settings
first) as they are made, a rerun with the same settings skips them, and the CSV is written whole at
the end. Under torchrun (WORLD_SIZE > 1) rank r takes the items i with i % N == r, logs its rows to
`.<out>.rank<r>.partial`, and rank 0 merges them, after a barrier, into the CSV a single process
would write.
"""
import glob
import json
import os

import numpy as np

from ..cli import add_model_args, at_most, check_inputs_kept, finite, load_model, model_files, natural, positive
from ..outputs import Quiet, Staged, Text, check_target, fingerprint, read_resume_log
from . import run as bench

TEST_HOOK = "SDLENS_EDIT_BENCH_STOP_AFTER"  # tests: interrupt (KeyboardInterrupt) after this many new rows


def add_parser(sub):
    e = sub.add_parser("edit-bench", help="PIE-Bench editing: inversions x editors, one CSV row per image and method")
    add_model_args(e)
    e.add_argument("--data", help="PIE-Bench folder (mapping_file.json, annotation_images/) or PIE-tiny")
    e.add_argument("--methods", default=",".join(bench.METHODS), type=lambda s: s.split(","),
                   help="comma-separated inversion+editor, of: " + ",".join(bench.METHODS))
    e.add_argument("--limit", type=positive, default=None, help="only the first N images")
    e.add_argument("--steps", type=positive, default=50, help="DDIM steps (PIE-Bench: 50)")
    e.add_argument("--guidance", type=finite, default=7.5, help="classifier-free guidance w (PIE-Bench: 7.5)")
    e.add_argument("--mode", default="faithful", choices=bench.MODES,
                   help="faithful: the official scripts' decisions; corrected: three of them fixed (see editbench/run.py)")
    e.add_argument("--metrics", default=None, choices=("pie", "tiny"),
                   help="pie: DINO/CLIP/LPIPS as PIE-Bench; tiny: no downloads (default: tiny on PIE-tiny, else pie)")
    e.add_argument("--dino", help="DINO ViT-B/8 weights (--metrics pie)")
    e.add_argument("--clip", help="CLIP ViT-L/14 weights (--metrics pie)")
    e.add_argument("--lpips", help="LPIPS weights (--metrics pie)")
    e.add_argument("--out", help="CSV file (a rerun resumes from .<name>.partial beside it)")
    e.add_argument("--force", action="store_true",
                   help="overwrite --out (never an input); with --make-tiny, replace PIE-tiny's files in a non-empty "
                        "DIR, keeping every other file")
    e.add_argument("--make-tiny", metavar="DIR", help="write PIE-tiny, a small PIE-format set, to DIR and exit")
    e.add_argument("--items", type=at_most(4096, "PIE-Bench itself has 700 images"), default=64,
                   help="--make-tiny: number of items, the 4 edit types in turn (at most 4096)")
    e.add_argument("--tiny-seed", type=natural, default=0, help="--make-tiny: seed of the rendered scenes")


def partial_path(out, rank=None):
    folder, name = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".{name}.partial" if rank is None else f".{name}.rank{rank}.partial")


def read_log(path, settings):
    """{(item, method): row} of a log written with the same settings ({} if there is none); another run's
    log, or a row without all of its metrics, is refused (`read_resume_log`)."""
    columns = settings["columns"]

    def valid(row):  # every metric a number (NaN, written as null, is a value PIE's metrics give)
        return (isinstance(row, dict) and isinstance(row.get("item"), str) and row.get("method") in settings["methods"]
                and all(c in row and (row[c] is None or isinstance(row[c], (int, float))) for c in columns))
    return {(row["item"], row["method"]): row for row in read_resume_log(path, settings, valid)}


def logs(out):
    ranks = sorted(glob.glob(glob.escape(partial_path(out))[:-len(".partial")] + ".rank*.partial"))
    return [p for p in [partial_path(out)] + ranks if os.path.isfile(p)]


def distributed():
    """(rank, world, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def is_tiny(items):
    """PIE-tiny has no marker field (it is plain PIE-Bench format): an item is PIE-tiny's when its
    prompts are the ones `make_tiny` renders for its key."""
    from .pie import strip_brackets
    from .tiny import index_of, render_pair
    try:
        return bool(items) and all(tuple(map(strip_brackets, render_pair(0, index_of(it))[5][:2])) == (it.original_prompt, it.editing_prompt)
                                   for it in items)
    except (ValueError, IndexError):  # a key that is no PIE-tiny index
        return False


def metric_columns(kind):
    """The metric columns every row of `kind` ("tiny" or "pie") has: a logged row without one is refused."""
    if kind == "tiny":
        return ["psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part", "structure_iou", "edit_success"]
    from .metrics import COLUMNS
    return list(COLUMNS)


def make_metrics(args, items):
    """(kind, metrics(src, edited, item) -> {column: value}): tiny's checker metrics, or PIE-Bench's, whose
    three metric models must all be named (each missing one says what to fetch and which flag takes it)."""
    kind = args.metrics or ("tiny" if is_tiny(items) else "pie")
    if kind == "tiny":
        from .tiny import TinyMetrics
        return kind, TinyMetrics(args.mode)
    from .metrics import FETCH, PieMetrics
    from .pie import mask_at
    for what in ("dino", "clip", "lpips"):
        if getattr(args, what) is None:
            raise ValueError(f"--metrics pie: {FETCH[what]} (for a PIE-tiny folder pass --metrics tiny)")
    pie = PieMetrics(mode=args.mode, dino=args.dino, clip=args.clip, lpips=args.lpips)

    def metrics(src, edited, item):
        a, b = (np.asarray(x.convert("RGB"), dtype=np.uint8) for x in (src, edited))
        return pie(a, b, mask_at(item.mask, a.shape[:2]).astype(np.uint8), item.editing_prompt)

    return kind, metrics


def cmd_edit_bench(args):
    if args.make_tiny:
        from .tiny import make_tiny
        make_tiny(args.make_tiny, n=args.items, seed=args.tiny_seed, force=args.force)
        print(os.path.abspath(args.make_tiny))
        return
    if not args.data or not args.out:
        raise ValueError("edit-bench needs --data DIR and --out FILE.csv (or --make-tiny DIR)")
    rank, world, local = distributed()
    if world > 1:
        import signal

        import torch.distributed as dist
        # gloo on GPUs too: the ranks only agree on small objects (errors, settings) and wait for each
        # other; their rows go through files. Started before anything is checked, so that bad input is
        # agreed on and said once. Ranks wait for the slowest at the end: with a short timeout a long
        # null-text item on one rank would kill the others after their rows are done.
        from datetime import timedelta
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
        # When one rank fails mid-run, torchrun stops the others with SIGTERM: they leave quietly through
        # their `finally` blocks (progress bars cleared, logs closed), so the failing rank's line is the only one.
        signal.signal(signal.SIGTERM, _stop_quietly)
    try:
        items, methods, kind, metrics = together(rank, world, lambda: check_run(args, world))
        if world > 1 and args.device.startswith("cuda"):
            import torch
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        sd, settings, done = start(args, items, methods, kind, rank, world)
        finish(args, items, methods, metrics, rank, world, sd, settings, done)
    except Agreed:
        raise
    except (ValueError, RuntimeError) as e:  # RuntimeError: out of memory, for one
        if world > 1:  # which rank met it: the others stop quietly (`collective`, and on torchrun's SIGTERM)
            raise (ValueError if isinstance(e, ValueError) else RuntimeError)(f"rank {rank}: {e}") from None
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


def _stop_quietly(signum, frame):
    raise Quiet()


class Agreed(ValueError):
    """An error every rank knows of (`together`), said by rank 0 alone."""


def together(rank, world, fn):
    """fn() on every rank -> this rank's result, where an error on any rank (bad input, the same on every
    rank; or one rank's own, out of memory, say) is first made known to all: rank 0 says the first one
    (naming its rank when it is another's) and exits 2, the others leave with 0. Were they to exit 2
    first, torchrun could stop rank 0 before it has printed, and no rank would say why."""
    try:
        value, error = fn(), None
    except (ValueError, RuntimeError) as e:
        value, error = None, e
    if world == 1:
        if error is not None:
            raise error
        return value
    import torch.distributed as dist
    said = [None] * world
    collective(lambda: dist.all_gather_object(said, None if error is None else str(error)))
    first = next((r for r in range(world) if said[r] is not None), None)
    if first is None:
        return value
    if rank != 0:
        raise Quiet(code=0)
    raise Agreed(said[0] if first == 0 else f"rank {first}: {said[first]}")


def check_run(args, world):
    """Everything checkable before the model loads -> (items, methods, metrics kind, metrics)."""
    methods = bench.check_methods(args.methods)
    from ..cli import check_device
    from .pie import read_benchmark
    check_device(args.device)
    check_target(args.out)
    every = read_benchmark(args.data)  # every annotation and image checked before the model loads
    items = every[:args.limit]
    # --force or not, no file the benchmark is made of (read in this run or not) and no model file is written
    # over: not by the CSV, nor by the resume logs, which are opened for writing in place.
    data = [os.path.join(args.data, "mapping_file.json")] + [os.path.join(args.data, "annotation_images", it.image_path)
                                                             for it in every]
    written = [args.out, partial_path(args.out)] + [partial_path(args.out, r) for r in range(world)] + logs(args.out)
    models = model_files(args, "--model", "--config", "--dino", "--clip", "--lpips")
    check_inputs_kept([("--data", p) for p in data] + models, written)
    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it or choose another --out")
    kind, metrics = make_metrics(args, items)
    return items, methods, kind, metrics


def collective(fn, *args):
    """A torch.distributed call. It raises when a peer has failed, and that peer has printed why: leave
    quietly. (Only these calls: a rank's own RuntimeError is its error, said with its rank.)"""
    try:
        return fn(*args)
    except RuntimeError:
        raise Quiet() from None


def barrier(world):
    if world > 1:
        import torch.distributed as dist
        collective(dist.barrier)


def start(args, items, methods, kind, rank, world):
    """What every rank does alike -> (model, settings, rows of earlier runs), its errors agreed on (`together`)."""
    def load():
        sd = load_model(args)
        # every setting that changes a row, and what the rows are made from: a log that differs is refused
        paths = [os.path.join(args.data, "mapping_file.json")] + [os.path.join(args.data, "annotation_images",
                                                                               it.image_path) for it in items]
        metric_files = [p for p in (args.dino, args.clip, args.lpips) if p]
        return sd, dict(model=args.model, config=args.config, dtype=args.dtype, size=sd.default_size,
                        prediction_type=sd.scheduler.prediction_type, device=str(sd.device),
                        data=os.path.abspath(args.data), steps=args.steps, guidance=args.guidance, mode=args.mode,
                        metrics=kind, methods=list(methods), columns=metric_columns(kind), inputs=fingerprint(paths),
                        metric_models=fingerprint(metric_files) if metric_files else None)
    sd, settings = together(rank, world, load)
    if world > 1:  # rank 0's settings for all: nodes may mount the shared folder at other paths
        import torch.distributed as dist
        shared = [settings]
        collective(lambda: dist.broadcast_object_list(shared, src=0))
        settings = shared[0]

    def read_logs():  # any earlier run's rows, whatever its number of processes
        done = {}
        for path in logs(args.out):
            done.update(read_log(path, settings))
        return done
    done = together(rank, world, read_logs)  # every rank has read the logs before any rewrites its own
    return sd, settings, done


def finish(args, items, methods, metrics, rank, world, sd, settings, done):
    """This rank's items, logged as they finish; then rank 0 merges every rank's log into the CSV."""
    ids = {it.key for it in items}
    mine = {it.key for i, it in enumerate(items) if i % world == rank}
    log_path = partial_path(args.out, rank if world > 1 else None)
    if rank == 0:
        for path in logs(args.out):  # the logs of other layouts: their rows are in `done`, re-logged below
            if path != log_path and not (world > 1 and path in [partial_path(args.out, r) for r in range(world)]):
                os.unlink(path)
    stop = int(os.environ.get(TEST_HOOK, "0"))
    made = [0]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:  # rewritten whole: a line cut short by an interruption goes
        log.write("".join(json.dumps(x) + "\n" for x in [settings] + [r for k, r in done.items() if k[0] in mine or (rank == 0 and k[0] not in ids)]))
        log.flush()

        def on_row(row):
            log.write(json.dumps(row) + "\n")
            log.flush()
            made[0] += 1
            if made[0] == stop:
                raise KeyboardInterrupt

        rows = bench.run_bench(sd, args.data, items, methods, metrics, done=done, on_row=on_row, rank=rank, world=world,
                               steps=args.steps, guidance=args.guidance, mode=args.mode)
    barrier(world)  # every rank's log is complete
    if rank != 0:
        return
    if world > 1:
        got = {}
        for r in range(world):
            got.update(read_log(partial_path(args.out, r), settings))
        missing = [(it.key, m) for it in items for m in methods if (it.key, m) not in got]
        if missing:
            raise RuntimeError(f"{len(missing)} rows are missing from the rank logs beside --out (first: item "
                               f"{missing[0][0]}, {missing[0][1]}); rerun the same command to compute them")
        rows = [got[it.key, m] for it in items for m in methods]  # the single-process order
    with Staged(os.path.dirname(os.path.abspath(args.out)), args.force) as out:
        out.save(Text(bench.csv_text(rows)), os.path.basename(args.out))
    for path in logs(args.out):
        os.unlink(path)
    print(bench.table(rows, methods))
    print(os.path.abspath(args.out))


def run(args):
    cmd_edit_bench(args)
