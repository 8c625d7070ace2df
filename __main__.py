"""Command line: `python -m sdlens generate --prompt "..." --out cat.png`.

Every expected failure (bad argument, bad file, existing output) prints one line and exits 2.
"""
import argparse
import os
import sys
import tempfile

DTYPES = ("float32", "float16", "bfloat16")


def save_image_atomic(image, path):
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a PNG."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_model_args(p):
    p.add_argument("--model", default=None, help="single-file .safetensors or diffusers folder (default: bundled sdlens-tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="override for SD 2 single files, which do not record it")
    p.add_argument("--allow-pickle", action="store_true", help="load a trusted .ckpt/.pt (weights_only)")


def parser():
    ap = argparse.ArgumentParser(prog="python -m sdlens", description="Stable Diffusion, readable and hookable.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--out", required=True, help="PNG file to write")
    g.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    d = sub.add_parser("demo", help="a gallery from the bundled sdlens-tiny model")
    add_model_args(d)
    d.add_argument("--out", default="sdlens-demo", help="folder to create (a free name is picked if it exists)")
    d.add_argument("--seed", type=int, default=0)
    return ap


def load_model(args):
    import torch
    import sdlens
    return sdlens.load(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                       prediction_type=args.prediction_type, allow_pickle=args.allow_pickle)


def cmd_generate(args):
    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it or choose another --out")
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out {args.out!r} must end in .png")
    sd = load_model(args)
    image = sd.generate(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                        guidance_scale=args.guidance, eta=args.eta, seed=args.seed,
                        height=args.height, width=args.width)[0]
    save_image_atomic(image, args.out)
    print(args.out)


def cmd_demo(args):
    from .tiny import demo
    out = demo.free_folder(args.out)
    sd = load_model(args)
    seconds = demo.run(sd, out, seed=args.seed)
    print(f"sdlens demo: {len(demo.PROMPTS)} images in {seconds:.1f} s")
    print(os.path.abspath(out))


COMMANDS = {"generate": cmd_generate, "demo": cmd_demo}


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
