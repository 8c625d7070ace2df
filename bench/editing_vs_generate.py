"""Editing cost against plain generation, measured side by side in one run.

    python bench/editing_vs_generate.py                     # sdlens-tiny on the CPU
    python bench/editing_vs_generate.py --random sd15 --device cuda --dtype float16 --size 512

- Prompt-to-Prompt: one edit of source + target against `generate` of the same two prompts;
- null-text inversion of one image (50 steps, up to 10 inner steps each);
- Plug-and-Play: a whole translation including its inversion, against `generate` of one image.
Each job runs in a fresh child process, so its peak memory can be read: on CUDA the allocator's
peak, on the CPU the growth of the peak resident set over the loaded model during the first run.
Times are the best of `--repeats` runs after that one.
"""
import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

import torch


def build(args):
    import sdlens
    if args.random is None:
        return sdlens.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    from sdlens.pipeline import StableDiffusion
    from sdlens.schedulers import DDIMConfig
    from sdlens.text import CLIPTextEncoder
    from sdlens.text.clip import SD1 as TEXT1
    from sdlens.unet import SD1, UNetModel
    from sdlens.vae import AutoencoderKL, VAEConfig
    from sdlens.weights.load import TOKENIZER_DIR, _tokenizer
    torch.manual_seed(0)  # random weights at full SD 1.5 size: speed does not depend on the values
    dt, dev = getattr(torch, args.dtype), args.device
    unet = UNetModel(SD1).to(dev, dt).eval().requires_grad_(False)
    text = CLIPTextEncoder(TEXT1).to(dev, dt).eval().requires_grad_(False)
    vae = AutoencoderKL(VAEConfig()).to(dev).eval().requires_grad_(False)
    return StableDiffusion(unet, vae, text, _tokenizer(TOKENIZER_DIR), DDIMConfig(), default_size=512)


def job(args, name, q):
    sd = build(args)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size, steps = args.size or sd.default_size, args.steps
    from sdlens.editing import PromptToPrompt, invert_image
    from sdlens.editing.pnp import translate
    image = sd.generate("a big red star on the left", steps=2, seed=1, height=size, width=size, output="tensor",
                        progress=False)
    src, tgt = "a big red circle on the left", "a big blue circle on the left"
    runs = {
        "generate2": lambda: sd.generate([src, tgt], steps=steps, seed=0, height=size, width=size, progress=False),
        "p2p": lambda: PromptToPrompt(sd, src, [tgt], steps=steps).run(seed=0, height=size, width=size),
        "p2p_low_memory": lambda: PromptToPrompt(sd, src, [tgt], steps=steps).run(seed=0, height=size, width=size,
                                                                                    low_memory=True),
        "null_text": lambda: invert_image(sd, image, src, "null-text", steps),
        "generate1": lambda: sd.generate(src, steps=steps, seed=0, height=size, width=size, progress=False),
        "pnp": lambda: translate(sd, image, "a big blue star on the left", steps=steps),
    }
    # CPU: the peak resident set only grows, so read the baseline before the first run (the model
    # and inputs are loaded; the job's own buffers are not). CUDA: the allocator's exact peak.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runs[name]()  # warm-up (and, on the CPU, the memory measurement)
    sync()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = []
    for _ in range(args.repeats):  # the best of a few runs: CPU timings are noisy
        t0 = time.perf_counter()
        runs[name]()
        sync()
        seconds.append(time.perf_counter() - t0)
    seconds = min(seconds)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    q.put((name, seconds, peak))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--random", choices=["sd15"], default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = {}
    for name in args.only or ["generate2", "p2p", "p2p_low_memory", "null_text", "generate1", "pnp"]:
        q = ctx.Queue()
        p = ctx.Process(target=job, args=(args, name, q))
        p.start()
        n, s, m = q.get()
        p.join()
        out[n] = (s, m)
        print(f"{n:15s} {s:8.2f} s   peak +{m / 2 ** 20:8.1f} MiB", flush=True)
    r = lambda a, b: f"{out[a][0] / out[b][0]:.2f}x time, {out[a][1] / max(out[b][1], 1):.2f}x peak memory"
    if "p2p" in out and "generate2" in out:
        print(f"p2p edit / generate of the same two prompts: {r('p2p', 'generate2')}")
    if "p2p_low_memory" in out and "generate2" in out:
        print(f"p2p low-memory / generate of two prompts:    {r('p2p_low_memory', 'generate2')}")
    if "pnp" in out and "generate1" in out:
        print(f"pnp translation incl. inversion / generate of one image: {r('pnp', 'generate1')}")
    print(json.dumps({k: {"seconds": round(v[0], 3), "peak_bytes": v[1]} for k, v in out.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
