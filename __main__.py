"""Command line: `python -m sdlens generate --prompt "..." --out cat.png`.

Every expected failure (bad argument, bad file, existing output, Ctrl-C) prints one line and exits
2 (130 for Ctrl-C). What can be checked is checked before the model loads; a command writes all of
its files or none (`outputs.py`).
"""
import argparse
import os
import sys

from .cli import (Parser, add_model_args, add_sampling_args, check_device, finite, fraction, load_model, natural,
                  positive, preflight, seed)
from .editbench import cli as editbench_cli
from .editing import cli as methods_cli
from .features import cli as features_cli
from .outputs import Interrupted, Quiet, Staged, save_image_atomic
from .pipeline import SAMPLERS


def parser():
    ap = Parser(prog="python -m sdlens", description="Stable Diffusion, readable and hookable.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (default: \"\"; SDXL: a zero context, as diffusers)")
    g.add_argument("--eta", type=finite, default=0.0, help="DDIM noise, 0 (deterministic) to 1")
    g.add_argument("--sampler", default="ddim", choices=SAMPLERS,
                   help="ddim, or euler_ancestral (the turbo models' own; --eta does not apply)")
    g.add_argument("--height", type=positive, default=None, help="multiple of 8 (default: the model's size)")
    g.add_argument("--width", type=positive, default=None, help="multiple of 8 (default: the model's size)")
    add_sampling_args(g, "PNG file to write", model_defaults=True)
    p = sub.add_parser("p2p", help="Prompt-to-Prompt edit of a generated or real image")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="source prompt (describes --image when one is given)")
    p.add_argument("--target", required=True, help="edited prompt")
    p.add_argument("--mode", default="replace", choices=("replace", "refine", "reweight"))
    p.add_argument("--cross-steps", type=fraction, default=0.8, help="fraction of steps with injected cross-attention")
    p.add_argument("--self-steps", type=fraction, default=0.4, help="fraction of steps with injected self-attention")
    p.add_argument("--blend", nargs=2, metavar=("SOURCE_WORD", "TARGET_WORD"), help="local blend words")
    p.add_argument("--equalize", nargs="+", metavar="WORD=WEIGHT", help="re-weight words of the target, e.g. car=2")
    p.add_argument("--image", help="edit this real image (centre-cropped, resized) instead of a generated one")
    p.add_argument("--inversion", default="null-text", choices=("ddim", "null-text", "negative-prompt", "direct"))
    p.add_argument("--low-memory", action="store_true", help="unconditional and conditional rows in separate passes")
    add_sampling_args(p, "folder for " + ", ".join(P2P_FILES))

    q = sub.add_parser("pnp", help="Plug-and-Play translation of a real image")
    add_model_args(q)
    q.add_argument("--image", required=True, help="the guidance image (centre-cropped, resized)")
    q.add_argument("--prompt", required=True, help="the target prompt")
    q.add_argument("--inversion-prompt", default="", help="prompt for the DDIM inversion (default: empty)")
    q.add_argument("--negative-prompt", default=None, help="weighed against \"\" by --alpha")
    q.add_argument("--alpha", type=finite, default=0.0,
                   help="initial weight of the empty prompt against the negative one (0: negative prompt only)")
    q.add_argument("--alpha-schedule", default="constant", choices=("constant", "linear", "exp"),
                   help="constant: alpha; linear: alpha down to 0; exp: alpha e^(-6 i/(N-1)) (LDM plug-and-play)")
    q.add_argument("--inversion-steps", type=positive, default=999,
                   help="DDIM inversion steps (999 as the official code; as many as --steps: 20x fewer UNet calls)")
    q.add_argument("--feature-injection", type=fraction, default=0.8, help="fraction of steps with injected features")
    q.add_argument("--attention-injection", type=fraction, default=0.5,
                   help="fraction of steps with injected self-attention q and k")
    q.add_argument("--feature-layers", nargs="+", default=None, help="ResBlocks to inject (default: SD output_blocks.4.0, SDXL output_blocks.1.0)")
    q.add_argument("--attention-layers", nargs="+", default=None, help="attn1 modules (default decoder layers 4-11)")
    add_sampling_args(q, "folder for " + ", ".join(PNP_FILES), seed_arg=False)

    m = sub.add_parser("masactrl", help="MasaCtrl: mutual self-attention edit of a generated or real image")
    add_model_args(m)
    m.add_argument("--prompt", required=True, help="source prompt (describes --image when one is given)")
    m.add_argument("--target", required=True, help="edited prompt (a new pose, shape or position)")
    m.add_argument("--start-step", type=natural, default=4, help="first step with mutual self-attention (official 4 of 50)")
    m.add_argument("--start-layer", type=natural, default=None,
                   help="first self-attention layer in execution order (default: the decoder's two finest "
                        "resolutions, 10 of 16 on SD as the official)")
    m.add_argument("--mask-word", nargs="+", metavar="WORD", default=None,
                   help="mask-guided: the object's word, or its word in the source then in the target")
    m.add_argument("--image", help="edit this real image (centre-cropped, resized) instead of a generated one")
    m.add_argument("--inversion", default="ddim", choices=("ddim", "null-text", "negative-prompt", "direct"),
                   help="how --image is inverted (the official code uses DDIM)")
    add_sampling_args(m, "folder for " + ", ".join(MASACTRL_FILES))

    methods_cli.add_parsers(sub)
    features_cli.add_parser(sub)
    editbench_cli.add_parser(sub)

    d = sub.add_parser("demo", help="a gallery from the bundled sdlens-tiny model")
    add_model_args(d)
    d.add_argument("--out", default="sdlens-demo", help="folder to create (a free name is picked if it exists)")
    d.add_argument("--seed", type=seed, default=0, help="0 to 2**63-1")
    d.add_argument("--steps", type=positive, default=50, help="DDIM steps")

    x = sub.add_parser("explore", help="an attention explorer page (one self-contained index.html) for a prompt")
    add_model_args(x)
    x.add_argument("--prompt", required=True)
    add_sampling_args(x, "folder for index.html (open it in a browser; no server, nothing fetched)")

    h = sub.add_parser("hooks", help="list the hook points with their kinds, places and shapes")
    add_model_args(h)
    h.add_argument("--height", type=positive, default=None, help="image height, multiple of 8 (default: the model's size)")
    h.add_argument("--width", type=positive, default=None, help="image width, multiple of 8 (default: the model's size)")
    return ap


P2P_FILES = ("source.png", "edit.png", "attention.png", "attention_edit.png", "self_attention.png")
PNP_FILES = ("guidance.png", "pnp.png")
MASACTRL_FILES = ("source.png", "edit.png")


def cmd_generate(args):
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out {args.out!r} must end in .png")
    if args.sampler != "ddim" and args.eta != 0:
        raise ValueError(f"--eta {args.eta:g} is DDIM's; --sampler {args.sampler} adds its own noise, leave --eta out")
    preflight(args, (), folder=False)
    sd = load_model(args)
    # None steps / guidance: the model's defaults (sd.defaults; turbo: 1 step, w = 0); no negative prompt: "",
    # or SDXL's zero context; height / width: the model's size, which is also what its size ids say.
    image = sd.generate(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                        guidance_scale=args.guidance, eta=args.eta, seed=args.seed,
                        height=args.height, width=args.width, sampler=args.sampler)[0]
    save_image_atomic(image, args.out)
    print(args.out)


def parse_weights(items):
    out = {}
    for item in items or []:
        word, sep, value = item.partition("=")
        try:
            out[word] = finite(value)
        except argparse.ArgumentTypeError:
            raise ValueError(f"--equalize {item!r} is not WORD=NUMBER, e.g. car=2") from None
        if not sep or not word:
            raise ValueError(f"--equalize {item!r} is not WORD=NUMBER, e.g. car=2")
    return out


def cmd_p2p(args):
    weights = parse_weights(args.equalize)
    if args.mode == "reweight" and not weights:
        raise ValueError("--mode reweight needs word weights, e.g. --equalize car=2")
    preflight(args, P2P_FILES, [("--image", args.image)] if args.image else [])
    from .editing import LocalBlend, PromptToPrompt, invert_image, load_image
    from .editing.attention_store import object_map_size
    from .visualize import cross_attention_grid, self_attention_components, token_labels
    from .pipeline import to_pil
    sd = load_model(args)
    blend = LocalBlend([[args.blend[0]], [args.blend[1]]]) if args.blend else None
    editor = PromptToPrompt(sd, args.prompt, [args.target], mode=args.mode, cross_replace_steps=args.cross_steps,
                            self_replace_steps=args.self_steps, equalize=weights or None, blend=blend, steps=args.steps)
    inversion = None
    if args.image:
        image = load_image(args.image, sd=sd)
        inversion = invert_image(sd, image, args.prompt, args.inversion, args.steps, args.guidance, progress=True)
    res = editor.run(guidance_scale=args.guidance, seed=args.seed, inversion=inversion, low_memory=args.low_memory,
                     progress=True)
    # the maps that localise objects (8x8 on sdlens-tiny, whose 16x16 layers attend almost uniformly)
    maps = res.store.aggregate(object_map_size(sd, tuple(res.latents.shape[-2:])))
    with Staged(args.out, args.force) as out:
        src, edit = to_pil(res.images)
        out.save(src, "source.png")
        out.save(edit, "edit.png")
        out.save(cross_attention_grid(res.images[0], maps[0], token_labels(sd.tokenizer, args.prompt)), "attention.png")
        out.save(cross_attention_grid(res.images[1], maps[1], token_labels(sd.tokenizer, args.target)),
                 "attention_edit.png")
        out.save(self_attention_components(res.store.aggregate(res.store.largest(), kind="self_attention")[0]),
                 "self_attention.png")
    print(os.path.abspath(args.out))


def cmd_pnp(args):
    preflight(args, PNP_FILES, [("--image", args.image)])
    from .editing import load_image
    from .editing.pnp import translate
    from .pipeline import to_pil
    sd = load_model(args)
    image = load_image(args.image, sd=sd)
    res = translate(sd, image, args.prompt, inversion_prompt=args.inversion_prompt, negative_prompt=args.negative_prompt,
                    alpha=args.alpha, alpha_schedule=args.alpha_schedule, feature_injection=args.feature_injection,
                    attention_injection=args.attention_injection, feature_layers=args.feature_layers or None,
                    attention_layers=args.attention_layers, guidance_scale=args.guidance,
                    steps=args.steps, inversion_steps=args.inversion_steps, progress=True)
    with Staged(args.out, args.force) as out:
        out.save(image, "guidance.png")
        out.save(to_pil(res.images)[0], "pnp.png")
    print(os.path.abspath(args.out))


def cmd_masactrl(args):
    if args.start_step > args.steps:
        raise ValueError(f"--start-step {args.start_step} is past --steps {args.steps}; use 0 to {args.steps}")
    if args.mask_word is not None and len(args.mask_word) > 2:
        raise ValueError("--mask-word takes one word, or two (the source's word then the target's)")
    preflight(args, MASACTRL_FILES, [("--image", args.image)] if args.image else [])
    from .editing import invert_image, load_image
    from .editing.masactrl import MasaCtrl
    sd = load_model(args)
    mask = None if args.mask_word is None else args.mask_word[0] if len(args.mask_word) == 1 else args.mask_word
    editor = MasaCtrl(sd, args.prompt, args.target, start_step=args.start_step, start_layer=args.start_layer,
                      steps=args.steps, mask_word=mask)
    inversion = None
    if args.image:
        inversion = invert_image(sd, load_image(args.image, sd=sd), args.prompt, args.inversion, args.steps,
                                 args.guidance, progress=True)
    editor.run(guidance_scale=args.guidance, seed=args.seed, inversion=inversion).save(args.out, args.force)
    print(os.path.abspath(args.out))


def cmd_demo(args):
    from .tiny import demo
    args.out, args.force = demo.free_folder(args.out), False
    preflight(args, ())
    sd = load_model(args)
    seconds = demo.run(sd, args.out, seed=args.seed, steps=args.steps)
    print(demo.summary(args.out, seconds))
    print(os.path.abspath(args.out))


def cmd_explore(args):
    preflight(args, ["index.html"])
    from .explore import explore
    sd = load_model(args)
    path = explore(sd, args.prompt, args.out, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                   force=args.force, progress=True)
    print(f"{path} ({os.path.getsize(path) / 1e6:.1f} MB): open it in a browser")


def cmd_hooks(args):
    check_device(args.device)
    sd = load_model(args)
    height, width = sd.check_size(args.height, args.width)
    f = sd.latent_factor
    print(f"{sd}\nhook points for {height}x{width} images ({height // f}x{width // f} latents), batch 1:")
    print(sd.unet.describe(height // f, width // f))


COMMANDS = {"generate": cmd_generate, "demo": cmd_demo, "explore": cmd_explore, "p2p": cmd_p2p, "pnp": cmd_pnp, "masactrl": cmd_masactrl,
            "features": features_cli.run, "hooks": cmd_hooks, "edit-bench": editbench_cli.run,
            **{name: methods_cli.run for name in methods_cli.COMMANDS}}


def main(argv=None):
    try:
        args = parser().parse_args(argv)
        COMMANDS[args.command](args)
    except Quiet as e:  # another torchrun rank says why
        return e.code
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the outputs were staged, so nothing was written (a resumable run says what it kept)
        print(f"interrupted: {e}" if isinstance(e, Interrupted) else "interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
