"""`python -m sdlens freeu | pag | style-aligned | attend-excite`: the methods that change how an image is
generated, each written beside a plain `generate` from the same noise, so the difference is the method's.

Like every command: checked before the model loads, all files or none (`outputs.Staged`), one line and
exit 2 on bad input.
"""
import os

from ..cli import add_model_args, add_sampling_args, finite, load_model, positive, preflight

# The files each command writes into --out.
FILES = {"freeu": ("plain.png", "freeu.png"), "pag": ("plain.png", "pag.png"),
         "attend-excite": ("plain.png", "attend_excite.png")}


def style_files(n):
    return [f"plain_{i}.png" for i in range(n)] + [f"style_aligned_{i}.png" for i in range(n)]


def add_parsers(sub):
    def common(p, out_help):
        add_model_args(p)
        p.add_argument("--height", type=positive, default=None, help="multiple of 8 (default: the model's size)")
        p.add_argument("--width", type=positive, default=None, help="multiple of 8 (default: the model's size)")
        add_sampling_args(p, out_help, model_defaults=True)

    f = sub.add_parser("freeu", help="FreeU: re-weight the decoder's backbone and skip features (Si et al. 2024)")
    f.add_argument("--prompt", required=True)
    for name, what in (("b1", "backbone scale, deepest decoder level"), ("b2", "backbone scale, next level"),
                       ("s1", "skip low-frequency scale, deepest level"), ("s2", "skip low-frequency scale, next")):
        f.add_argument(f"--{name}", type=finite, default=None, help=f"{what} (default: the FreeU README's for the model)")
    common(f, "folder for " + ", ".join(FILES["freeu"]))

    p = sub.add_parser("pag", help="Perturbed-Attention Guidance (Ahn et al. 2024)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--pag-scale", type=finite, default=3.0, help="guidance away from the perturbed row (default 3.0)")
    p.add_argument("--layers", nargs="+", choices=("down", "mid", "up"), default=None,
                   help="where self-attention is perturbed (default: the middle block, the official 'm0')")
    common(p, "folder for " + ", ".join(FILES["pag"]))

    s = sub.add_parser("style-aligned", help="StyleAligned: a batch in the style of its first image (Hertz et al. 2024)")
    s.add_argument("--prompt", nargs="+", required=True, help="two or more prompts; the first is the reference")
    common(s, "folder for plain_<i>.png and style_aligned_<i>.png")

    a = sub.add_parser("attend-excite", help="Attend-and-Excite: every chosen word gets attention (Chefer et al. 2023)")
    a.add_argument("--prompt", required=True)
    a.add_argument("--words", nargs="+", required=True, help="words of the prompt that must appear")
    a.add_argument("--max-iter-to-alter", type=positive, default=25, help="steps with latent updates (default 25)")
    a.add_argument("--scale-factor", type=finite, default=20.0, help="latent step size (default 20)")
    common(a, "folder for " + ", ".join(FILES["attend-excite"]))


def run(args):
    files = style_files(len(args.prompt)) if args.command == "style-aligned" else FILES[args.command]
    if args.command == "pag" and args.pag_scale < 0:
        raise ValueError(f"--pag-scale {args.pag_scale:g} is negative; use 0 (plain guidance) or more (official 3.0)")
    if args.command == "style-aligned" and len(args.prompt) < 2:
        raise ValueError("--prompt needs two or more prompts for style-aligned: the reference first, then the others")
    preflight(args, files)
    from ..outputs import Staged
    from . import attend_and_excite, freeu, pag_generate, style_aligned
    sd = load_model(args)
    kw = dict(steps=args.steps, guidance_scale=args.guidance, seed=args.seed, height=args.height, width=args.width)
    prompts = args.prompt if isinstance(args.prompt, list) else [args.prompt]
    # the method first: it checks its own arguments (a word not in the prompt) before any sampling
    if args.command == "freeu":
        with freeu(sd, b1=args.b1, b2=args.b2, s1=args.s1, s2=args.s2):
            made = sd.generate(prompts, **kw)
    elif args.command == "pag":
        made = pag_generate(sd, args.prompt, pag_scale=args.pag_scale, layers=args.layers, **kw)
    elif args.command == "style-aligned":
        made = style_aligned(sd, args.prompt, **kw)
    else:
        made = attend_and_excite(sd, args.prompt, args.words, max_iter_to_alter=args.max_iter_to_alter,
                                 scale_factor=args.scale_factor, **kw)
    plain = sd.generate(prompts, **kw)
    with Staged(args.out, args.force) as out:
        for name, image in zip(files, list(plain) + list(made)):
            out.save(image, name)
    print(os.path.abspath(args.out))


COMMANDS = ("freeu", "pag", "style-aligned", "attend-excite")
