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


def add_sampling_args(p, out_help, seed=True):
    """The options every sampling command shares (official P2P/PnP defaults: 50 steps, w = 7.5)."""
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite what --out names if it exists")


def parser():
    ap = argparse.ArgumentParser(prog="python -m sdlens", description="Stable Diffusion, readable and hookable.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    add_sampling_args(g, "PNG file to write")
    p = sub.add_parser("p2p", help="Prompt-to-Prompt edit of a generated or real image")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="source prompt (describes --image when one is given)")
    p.add_argument("--target", required=True, help="edited prompt")
    p.add_argument("--mode", default="replace", choices=("replace", "refine", "reweight"))
    p.add_argument("--cross-steps", type=float, default=0.8, help="fraction of steps with injected cross-attention")
    p.add_argument("--self-steps", type=float, default=0.4, help="fraction of steps with injected self-attention")
    p.add_argument("--blend", nargs=2, metavar=("SOURCE_WORD", "TARGET_WORD"), help="local blend words")
    p.add_argument("--equalize", nargs="+", metavar="WORD=WEIGHT", help="re-weight words of the target, e.g. car=2")
    p.add_argument("--image", help="edit this real image (centre-cropped, resized) instead of a generated one")
    p.add_argument("--inversion", default="null-text", choices=("ddim", "null-text", "negative-prompt", "direct"))
    p.add_argument("--low-memory", action="store_true", help="unconditional and conditional rows in separate passes")
    add_sampling_args(p, "folder for source.png, edit.png, attention.png")

    q = sub.add_parser("pnp", help="Plug-and-Play translation of a real image")
    add_model_args(q)
    q.add_argument("--image", required=True, help="the guidance image (centre-cropped, resized)")
    q.add_argument("--prompt", required=True, help="the target prompt")
    q.add_argument("--inversion-prompt", default="", help="prompt for the DDIM inversion (default: empty)")
    q.add_argument("--negative-prompt", default=None)
    q.add_argument("--alpha", type=float, default=0.0,
                   help="initial weight of the empty prompt against the negative one (0: negative prompt only)")
    q.add_argument("--alpha-schedule", default="constant", choices=("constant", "linear", "exp"),
                   help="constant: alpha; linear: alpha down to 0; exp: alpha e^(-6 i/(N-1)) (LDM plug-and-play)")
    q.add_argument("--inversion-steps", type=int, default=999,
                   help="DDIM inversion steps (999 as the official code; as many as --steps: 20x fewer UNet calls)")
    q.add_argument("--feature-injection", type=float, default=0.8)
    q.add_argument("--attention-injection", type=float, default=0.5)
    q.add_argument("--feature-layers", nargs="+", default=None, help="ResBlocks to inject (default output_blocks.4.0)")
    q.add_argument("--attention-layers", nargs="+", default=None, help="attn1 modules (default decoder layers 4-11)")
    add_sampling_args(q, "folder for guidance.png and pnp.png", seed=False)

    f = sub.add_parser("features", help="feature views")
    fsub = f.add_subparsers(dest="view", required=True)
    pca = fsub.add_parser("pca", help="top-3 PCA of features as RGB, one basis shared by all images")
    add_model_args(pca)
    pca.add_argument("--image", nargs="+", required=True)
    pca.add_argument("--layers", nargs="+", default=["output_blocks.4"], help="blocks or hook names")
    pca.add_argument("--step", type=float, default=0.5, help="noise level as a fraction of the inversion (0 clean, 1 noise)")
    pca.add_argument("--steps", type=int, default=50)
    pca.add_argument("--out", required=True)
    pca.add_argument("--force", action="store_true")

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


def parse_weights(items):
    out = {}
    for item in items or []:
        word, sep, value = item.partition("=")
        try:
            out[word] = float(value)
        except ValueError:
            raise ValueError(f"--equalize {item!r} is not WORD=NUMBER, e.g. car=2") from None
        if not sep or not word:
            raise ValueError(f"--equalize {item!r} is not WORD=NUMBER, e.g. car=2")
    return out


def check_out_folder(folder, names, force):
    existing = [n for n in names if os.path.exists(os.path.join(folder, n))]
    if existing and not force:
        raise ValueError(f"{os.path.join(folder, existing[0])} exists; pass --force or choose another --out")


def cmd_p2p(args):
    from .editing import LocalBlend, PromptToPrompt, invert_image, load_image
    from .editing.visualize import cross_attention_grid, self_attention_components, token_labels
    names = ("source.png", "edit.png", "attention.png", "attention_edit.png", "self_attention.png")
    check_out_folder(args.out, names, args.force)
    if args.image and not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such file")
    sd = load_model(args)
    weights = parse_weights(args.equalize)
    blend = LocalBlend([[args.blend[0]], [args.blend[1]]]) if args.blend else None
    editor = PromptToPrompt(sd, args.prompt, [args.target], mode=args.mode, cross_replace_steps=args.cross_steps,
                            self_replace_steps=args.self_steps, equalize=weights or None, blend=blend, steps=args.steps)
    inversion = None
    if args.image:
        image = load_image(args.image, sd.default_size)
        inversion = invert_image(sd, image, args.prompt, args.inversion, args.steps, args.guidance, progress=True)
    res = editor.run(guidance_scale=args.guidance, seed=args.seed, inversion=inversion, low_memory=args.low_memory,
                     progress=True)
    from .pipeline import to_pil
    src, edit = to_pil(res.images)
    save_image_atomic(src, os.path.join(args.out, "source.png"))
    save_image_atomic(edit, os.path.join(args.out, "edit.png"))
    size = res.store.largest()
    maps = res.store.aggregate(size)
    save_image_atomic(cross_attention_grid(res.images[0], maps[0], token_labels(sd.tokenizer, args.prompt)),
                      os.path.join(args.out, "attention.png"))
    save_image_atomic(cross_attention_grid(res.images[1], maps[1], token_labels(sd.tokenizer, args.target)),
                      os.path.join(args.out, "attention_edit.png"))
    save_image_atomic(self_attention_components(res.store.aggregate(size, kind="self_attention")[0]),
                      os.path.join(args.out, "self_attention.png"))
    print(os.path.abspath(args.out))


def cmd_pnp(args):
    from .editing import load_image
    from .editing.pnp import FEATURE_LAYERS, translate
    from .pipeline import to_pil
    check_out_folder(args.out, ("guidance.png", "pnp.png"), args.force)
    if not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such file")
    sd = load_model(args)
    image = load_image(args.image, sd.default_size)
    res = translate(sd, image, args.prompt, inversion_prompt=args.inversion_prompt, negative_prompt=args.negative_prompt,
                    alpha=args.alpha, alpha_schedule=args.alpha_schedule, feature_injection=args.feature_injection,
                    attention_injection=args.attention_injection, feature_layers=args.feature_layers or FEATURE_LAYERS,
                    attention_layers=args.attention_layers, guidance_scale=args.guidance,
                    steps=args.steps, inversion_steps=args.inversion_steps, progress=True)
    save_image_atomic(image, os.path.join(args.out, "guidance.png"))
    save_image_atomic(to_pil(res.images)[0], os.path.join(args.out, "pnp.png"))
    print(os.path.abspath(args.out))


def cmd_features(args):
    import torch
    from .editing import load_image
    from .editing.features import collect, pca_rgb, resolve_layers
    from .editing.pnp import inversion_latents
    from .pipeline import to_pil
    from .schedulers import timesteps
    for p in args.image:
        if not os.path.isfile(p):
            raise ValueError(f"--image {p}: no such file")
    if not 0 <= args.step <= 1:
        raise ValueError("--step is a fraction between 0 and 1")
    sd = load_model(args)
    names = resolve_layers(sd, args.layers)
    outs = [f"pca_{n.replace('.', '_')}_{i:02d}.png" for n in names for i in range(len(args.image))]
    check_out_folder(args.out, outs, args.force)
    k = round(args.step * args.steps)
    t = list(reversed(timesteps(sd.scheduler, args.steps)))[max(k - 1, 0)]
    latents = [inversion_latents(sd, load_image(p, sd.default_size), steps=args.steps)[k] for p in args.image]
    feats = collect(sd, latents, t, names)
    for n in names:
        for i, rgb in enumerate(pca_rgb(feats[n])):
            im = to_pil(rgb[None])[0].resize((sd.default_size, sd.default_size), 0)
            save_image_atomic(im, os.path.join(args.out, f"pca_{n.replace('.', '_')}_{i:02d}.png"))
    print(os.path.abspath(args.out))


def cmd_demo(args):
    from .tiny import demo
    out = demo.free_folder(args.out)
    sd = load_model(args)
    seconds = demo.run(sd, out, seed=args.seed)
    print(f"sdlens demo: {len(demo.PROMPTS)} images in {seconds:.1f} s")
    print(os.path.abspath(out))


COMMANDS = {"generate": cmd_generate, "demo": cmd_demo, "p2p": cmd_p2p, "pnp": cmd_pnp, "features": cmd_features}


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
