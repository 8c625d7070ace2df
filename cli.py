"""Command-line building blocks shared by every command (`__main__.py`, `features/cli.py`): the
argument types, the model options, and the checks made before a model loads.

Every expected failure is a ValueError with one line naming the problem and the fix; `__main__.main`
prints it and exits 2.
"""
import argparse
import math
import os

from .outputs import check_target

DTYPES = ("float32", "float16", "bfloat16")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default that says something (not None, not an unset flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):  # subparsers are made with this class too, so all get Help
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse prints the usage too: keep to one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


def fraction(text):
    x = finite(text)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return x


def positive(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return n


def at_most(limit, why):
    """A positive whole number of at most `limit`: a bound on a count that would otherwise run without
    end or die in the allocator (`why` says where the limit comes from)."""
    def check(text):
        n = positive(text)
        if n > limit:
            raise argparse.ArgumentTypeError(f"{text} is more than {limit} ({why})")
        return n
    return check


def natural(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
    return n


def seed(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n < 2 ** 63:  # torch.Generator.manual_seed takes a 64-bit integer
        raise argparse.ArgumentTypeError(f"{text} is outside 0 .. 2**63-1")
    return n


def add_model_args(p):
    p.add_argument("--model", default=None, help="single-file .safetensors or diffusers folder, SD 1.x/2.x or SDXL "
                                                 "(default: bundled sdlens-tiny)")
    p.add_argument("--config", default=None,
                   help="single files only: a preset (sd1, sd2, sd2-v, sd-turbo, sdxl, sdxl-turbo), a diffusers "
                        "folder with the model's config.json files, or a .json of sdlens configs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="of the UNet and text encoder (the VAE is float32)")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="override for SD 2 single files, which do not record it")
    p.add_argument("--allow-pickle", action="store_true", help="load a trusted .ckpt/.pt (weights_only)")


def add_sampling_args(p, out_help, seed_arg=True, model_defaults=False):
    """The options every sampling command shares (official P2P/PnP defaults: 50 steps, w = 7.5). With
    `model_defaults` (generate) steps and guidance default to None: the loaded model's own (`sd.defaults`:
    50 and 7.5, the turbo models 1 step at w = 0)."""
    if model_defaults:
        p.add_argument("--steps", type=positive, default=None,
                       help="sampling steps, 1 to 999; left out, the model's own: 1 for the turbo models (default: 50)")
        p.add_argument("--guidance", type=finite, default=None,
                       help="classifier-free guidance scale w, 0 or 1: none; left out, the model's own: 0 for the "
                            "turbo models (default: 7.5)")
    else:
        p.add_argument("--steps", type=positive, default=50, help="DDIM steps, 1 to 999")
        p.add_argument("--guidance", type=finite, default=7.5, help="classifier-free guidance scale w (1: none)")
    if seed_arg:
        p.add_argument("--seed", type=seed, default=0, help="0 to 2**63-1")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite what --out names if it exists")


def check_device(name):
    """Before loading: a device that exists here (`meta` holds no data, so it cannot make images)."""
    import torch
    kinds = [k for k in ("cuda", "mps", "xpu") if getattr(getattr(torch, k, None), "is_available", lambda: False)()]
    available = ", ".join(["cpu"] + [f"{k} ({getattr(torch, k).device_count()} device(s))" for k in kinds])
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; available here: {available}") from None
    if dev.type == "meta":
        raise ValueError(f"--device meta holds no data and cannot make images; available here: {available}")
    if dev.type != "cpu" and (dev.type not in kinds or (dev.index or 0) >= getattr(torch, dev.type).device_count()):
        raise ValueError(f"--device {name} is not available; available here: {available}")


def preflight(args, out_names, images=(), folder=True):
    """Everything checkable before the model loads: device, input images, where the outputs go."""
    from .inversion import load_image
    check_device(args.device)
    check_target(args.out, folder=folder)
    outs = [os.path.join(args.out, n) for n in out_names] if folder else [args.out]
    for flag, path in images:
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
        check_inputs_kept([(flag, path)], outs)
        load_image(path, 8)  # a bad image fails now, not after the model has loaded
    existing = [o for o in outs if os.path.exists(o)]
    if existing and not args.force:
        raise ValueError(f"{existing[0]} exists; pass --force to overwrite it or choose another --out")


def check_inputs_kept(inputs, outs):
    """Refuse, with --force too, to write over a file the command reads. `inputs`: [(flag, path)] of what it
    reads; `outs`: every path it writes (results, resume logs). Files are compared by identity (device and
    inode), so an input reached through a symlink or a hard link is still found; a path not there yet
    cannot be an input."""
    written = set()
    for path in outs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        written.add((st.st_dev, st.st_ino))
    for flag, path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in written:
            raise ValueError(f"{flag} {path} is also an output of this command; choose another --out")


def model_files(args, *flags):
    """[(flag, file)] of the model files the flags name: a file, or every file in a folder (a diffusers layout)."""
    found = []
    for flag in flags:
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is None:
            continue
        if os.path.isdir(path):
            found += [(flag, os.path.join(d, f)) for d, _, files in os.walk(path) for f in files]
        else:
            found.append((flag, path))
    return found


def load_model(args):
    import torch
    import sdlens
    return sdlens.load(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                       prediction_type=args.prediction_type, allow_pickle=args.allow_pickle,
                       config=getattr(args, "config", None))
