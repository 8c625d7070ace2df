"""sdlens-tiny quality on held-out prompts and seeds, judged by the palette checker.

    python bench/tiny_quality.py [--model weights/sdlens-tiny] [--pairs 120] [--guidance 7.5]

Prints: prompt following (colour, shape, position) over prompt/seed pairs the training never
drew (seeds from 10_000 up), per-shape and per-colour rates; DDIM inversion + reconstruction
PSNR of rendered scenes at guidance 1; the checker's shape rate on VAE round trips of rendered
scenes (the ceiling any UNet on this VAE can reach); and the CPU time of load() plus one 50-step generation.
"""
import argparse
import itertools
import random
import time
from collections import defaultdict

import numpy as np
import torch

import sdlens
from sdlens.schedulers import invert, sample
from sdlens.tiny.checker import check
from sdlens.tiny.scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, render, scene_from


def heldout_prompts(n, seed=10_000):
    rng = random.Random(seed)
    combos = list(itertools.product(COLORS, SHAPES, POSITIONS))
    rng.shuffle(combos)
    out = []
    for i in range(n):
        c, s, p = combos[i % len(combos)]
        size = "big" if p == "center" else rng.choice(list(SIZES))
        out.append((f"a {size} {c} {s} {sdlens.tiny.scenes.POSITION_PHRASE[p]}".replace("a orange", "an orange"), c, s, p, seed + i))
    return out


def prompt_following(sd, pairs, guidance, batch=16):
    rows = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        latents = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(p[4])) for p in chunk])
        images = sd.generate([p[0] for p in chunk], guidance_scale=guidance, latents=latents, progress=False)
        rows += [(p, check(im, p[1], p[2], p[3])) for p, im in zip(chunk, images)]
    return rows


def psnr(a, b):
    return 10 * torch.log10(1.0 / ((a - b) ** 2).mean()).item()


def inversion_psnr(sd, n=16, steps=50):
    rng = random.Random(20_000)
    values, vae_only = [], []
    for i in range(n):
        scene = scene_from(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)),
                           rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS)), "plain", seed=i)
        image = render(scene, random.Random(i))
        x = sdlens.pipeline.to_tensor(image)
        z0 = sd.encode_image(x)
        context = sd.encode_prompt([scene.caption])
        denoise = sd.denoiser(context, 1.0, steps)
        with torch.no_grad():
            zT = invert(denoise, z0, sd.scheduler, steps)[-1]
            rec = sd.decode_latents(sample(denoise, zT, sd.scheduler, steps))
        values.append(psnr(rec, x))
        vae_only.append(psnr(sd.decode_latents(z0), x))
    return float(np.mean(values)), float(np.mean(vae_only))


def vae_ceiling(sd, n=20):
    """Shape rate of the checker on VAE round trips of rendered scenes, per shape and size: what a
    UNet that matched the data perfectly would score, since every sample passes this decoder."""
    rng, out = random.Random(123), {}
    for shape, size in itertools.product(SHAPES, SIZES):
        ok = 0
        for i in range(n):
            sc = scene_from(shape, rng.choice(list(COLORS)), size, rng.choice(list(POSITIONS)),
                            rng.choice(list(BACKGROUNDS)), rng.choice(["plain", "stripes", "gradient"]), seed=i)
            x = sdlens.pipeline.to_tensor(render(sc, random.Random(i)))
            rec = sdlens.pipeline.to_pil(sd.decode_latents(sd.encode_image(x)))[0]
            ok += check(rec, sc.objects[0].color, shape)["shape"]
        out[shape, size] = ok / n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", type=int, default=120)
    ap.add_argument("--guidance", type=float, default=7.5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    sd = sdlens.load(args.model)
    sd.generate("a red circle on the left", steps=50, seed=0, progress=False)
    t_first = time.perf_counter() - t0
    print(f"load() + one 50-step generation (batch 1, CPU, {torch.get_num_threads()} threads): {t_first:.2f} s")

    rows = prompt_following(sd, heldout_prompts(args.pairs), args.guidance)
    tot = {k: np.mean([r[k] for _, r in rows]) * 100 for k in ("color", "shape", "position")}
    print(f"\nprompt following, {len(rows)} held-out prompt/seed pairs, guidance {args.guidance}, 50 DDIM steps")
    print(f"| {'':10} | colour % | shape % | position % |\n|{'-' * 12}|----------|---------|------------|")
    print(f"| {'all':10} | {tot['color']:8.1f} | {tot['shape']:7.1f} | {tot['position']:10.1f} |")
    for key, idx in (("shape", 2), ("color", 1), ("position", 3)):
        groups = defaultdict(list)
        for p, r in rows:
            groups[p[idx]].append(r)
        for g, rs in groups.items():
            print(f"| {g:10} | {np.mean([r['color'] for r in rs]) * 100:8.1f} | {np.mean([r['shape'] for r in rs]) * 100:7.1f} "
                  f"| {np.mean([r['position'] for r in rs]) * 100:10.1f} |")
    ceiling = vae_ceiling(sd)
    print(f"\nshape % of VAE round trips of rendered scenes (the ceiling for generation), 20 per cell")
    print("| size  | " + " | ".join(f"{s:8}" for s in SHAPES) + " |")
    for size in SIZES:
        print(f"| {size:5} | " + " | ".join(f"{ceiling[s, size] * 100:8.0f}" for s in SHAPES) + " |")
    inv, vae = inversion_psnr(sd)
    print(f"\nDDIM inversion + reconstruction at guidance 1, 50 steps, 16 rendered scenes: PSNR {inv:.2f} dB "
          f"(VAE alone: {vae:.2f} dB)")


if __name__ == "__main__":
    main()
