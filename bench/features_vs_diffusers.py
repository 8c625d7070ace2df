"""Feature extraction throughput: `sdlens.features.extract` against DIFT's own approach on diffusers,
the same weights and the same hook, side by side in one process.

    python bench/features_vs_diffusers.py                       # sdlens-tiny on the CPU, 16 images
    python bench/features_vs_diffusers.py --model sd21 --device cuda --dtype float16 --size 768 --images 8

The reference is DIFT's SDFeaturizer (Tsingularity/dift, src/models/dift_sd.py): one image at a time,
repeated `ensemble` times in one batch, VAE posterior sample, add_noise at t = 261, a UNet that stops
after `up_blocks[up_ft_index]` (MyUNet2DConditionModel breaks out of its loop there; here a forward
hook on that block raises, which skips the same work), mean over the ensemble. sdlens runs
`extract(sd, images, paper_layer("dift", 1), ensemble=8)`, which batches rows of several images
(`max_rows`) and also stops after the last requested point. On a GPU it also reports the
peak memory.
Runs alternate between the two so that clock drift hits both alike; the median of `--reps` is shown.
"""
import argparse
import statistics
import time

import torch


class Stop(Exception):
    pass


def dift_reference(pipe, images, prompt_embeds, t, up_ft_index, ensemble, device, dtype):
    """DIFT's SDFeaturizer.forward, image by image, on a diffusers pipeline."""
    block, got = pipe.unet.up_blocks[up_ft_index], {}

    def stop(module, inputs, output):
        got["ft"] = output
        raise Stop

    handle = block.register_forward_hook(stop)
    feats = []
    try:
        for img in images:
            x = (img[None] * 2 - 1).repeat(ensemble, 1, 1, 1).to(device)
            lat = pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor
            tt = torch.tensor(t, dtype=torch.long, device=device)
            noisy = pipe.scheduler.add_noise(lat, torch.randn_like(lat), tt)
            try:
                pipe.unet(noisy.to(dtype), tt, encoder_hidden_states=prompt_embeds.repeat(ensemble, 1, 1))
            except Stop:
                pass
            feats.append(got["ft"].float().mean(0, keepdim=True))
    finally:
        handle.remove()
    return torch.cat(feats)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="diffusers folder (default: the bundled sdlens-tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--ensemble", type=int, default=8)
    ap.add_argument("--max-rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from diffusers import StableDiffusionPipeline

    import sdlens
    from sdlens.features import extract, paper_layer
    from sdlens.weights.load import TINY_DIR

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    folder = args.model or TINY_DIR
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True,
                                                   dtype=torch.float32).to(device)  # the VAE stays float32
    pipe.unet.to(dtype)
    sd = sdlens.load(folder, device=args.device, dtype=dtype)
    size = args.size or sd.default_size
    images = torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    name = paper_layer("dift", 1)
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0].to(dtype)

    # (That both compute the same features, draw for draw, is tests/test_features.py's job.)
    with torch.no_grad():
        runs = {
            "diffusers (DIFT, image by image)": lambda: dift_reference(pipe, images, embeds, 261, 1, args.ensemble,
                                                                       device, dtype),
            f"sdlens extract (max_rows={args.max_rows})": lambda: extract(sd, images, name, ensemble=args.ensemble,
                                                                          max_rows=args.max_rows),
        }
        times = {k: [] for k in runs}
        for k, fn in runs.items():  # warm-up
            fn()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.reps):
            for k, fn in runs.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
    print(f"{folder}, {size}x{size}, {args.images} images, ensemble {args.ensemble}, hook {name} "
          f"(= diffusers up_blocks[1]), {args.device} {args.dtype}, torch threads {torch.get_num_threads()}")
    base = statistics.median(times[next(iter(runs))])
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"  {k:42s} {args.images / m:8.2f} images/s  (median {m:.3f} s, runs {', '.join(f'{x:.3f}' for x in ts)})"
              f"  time ratio to diffusers {m / base:.2f}x")
    if device.type == "cuda":
        print(f"  peak GPU memory (both) {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
