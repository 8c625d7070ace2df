"""Our UNet forward vs diffusers' on the same weights and input, side by side in one process.

    python bench/unet_vs_diffusers.py                      # CPU: SD 1.5 topology, 16x16 latents
    python bench/unet_vs_diffusers.py --device cuda --dtype float16 --latent 64 --batch 2

Random weights (speed does not depend on them), copied from the diffusers model into ours, and
the outputs are checked equal before timing. Each model gets the timestep as its own sampler gives
it: sdlens a Python int (`sdlens.schedulers.sample` iterates over ints), diffusers a 0-d tensor on
the device, an element of `scheduler.timesteps` (StableDiffusionPipeline's loop). Runs alternate
between the two models so that clock drift and thermal state hit both alike. Also reports the cost of the idle hook points.
"""
import argparse
import statistics
import time

import torch


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from sdlens.unet import SD1, UNetModel
    from sdlens.weights.convert import unet_to_diffusers

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    sd = theirs.state_dict()
    with torch.device("meta"):
        ours = UNetModel(SD1)
    ours.load_state_dict({k: sd[unet_to_diffusers(k, SD1)] for k in ours.state_dict()}, assign=True)
    theirs, ours = theirs.to(dev, dtype).eval(), ours.to(dev, dtype).eval()
    theirs.set_attn_processor(__import__("diffusers").models.attention_processor.AttnProcessor2_0())
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=dev, dtype=dtype)
    ctx = torch.randn(args.batch, 77, 768, device=dev, dtype=dtype)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50, device=dev)  # as StableDiffusionPipeline does before its loop
    tt = sched.timesteps[25]  # what diffusers' UNet is given: a 0-d tensor on the device (t = 481)
    t = int(tt)  # what ours is given: a Python int, as sdlens' DDIM sampler passes it
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        a, b = ours(x, t, ctx), theirs(x, tt, ctx).sample
        err = (a.float() - b.float()).abs().max().item()
        for _ in range(2):  # warm-up
            ours(x, t, ctx), theirs(x, tt, ctx)
        times_o, times_t = [], []
        for _ in range(args.reps):
            times_o.append(timed(lambda: ours(x, t, ctx), sync))
            times_t.append(timed(lambda: theirs(x, tt, ctx), sync))
    hp = ours.hook_point("hook_out")
    n = 100_000
    t0 = time.perf_counter()
    for _ in range(n):
        hp(x)
    per_call = (time.perf_counter() - t0) / n
    mo, mt = statistics.median(times_o), statistics.median(times_t)
    print(f"device={dev} dtype={args.dtype} batch={args.batch} latent={args.latent} t={t} reps={args.reps} max|diff|={err:.2e}")
    print(f"sdlens    median {mo * 1e3:9.2f} ms")
    print(f"diffusers median {mt * 1e3:9.2f} ms")
    print(f"ratio sdlens/diffusers = {mo / mt:.3f}")
    calls = len(ours.hook_names())
    print(f"idle hook points: {calls} per forward x {per_call * 1e9:.0f} ns = {calls * per_call * 1e6:.1f} us "
          f"({calls * per_call / mo * 100:.3f}% of a forward)")


if __name__ == "__main__":
    main()
