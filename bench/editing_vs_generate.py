"""Generation against diffusers, and editing against plain generation, side by side in one run.

    python bench/editing_vs_generate.py                     # sdlens-tiny on the CPU
    python bench/editing_vs_generate.py --random sd15 --size 128 --steps 10   # SD 1.5 topology, 16x16 latents
    python bench/editing_vs_generate.py --random sd15 --device cuda --dtype float16 --size 512

- generate: two prompts, against diffusers' StableDiffusionPipeline with DDIM on the same weights
  (written with `save_folder` and read back by diffusers) from the same latents; the images are
  checked to agree first;
- Prompt-to-Prompt: one edit of source + target against `generate` of the same two prompts;
- null-text inversion of one image (50 steps, up to 10 inner steps each), against a generate of one;
- Plug-and-Play: a whole translation including its inversion, against `generate` of one image.
Times: each job and its baseline run in one child process, interleaved `--repeats` times after
a warm-up; the ratio is the median of the paired ratios. Peak memory: each job alone in a fresh
child process (on CUDA the allocator's peak, on the CPU the growth of the peak resident set).
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


def make_runs(args, sd):
    size, steps = args.size or sd.default_size, args.steps
    from sdlens.editing import PromptToPrompt, invert_image
    from sdlens.editing.pnp import translate
    image = sd.generate("a big red star on the left", steps=2, seed=1, height=size, width=size, output="tensor",
                        progress=False)
    src, tgt = "a big red circle on the left", "a big blue circle on the left"
    f = sd.latent_factor
    latents = torch.randn(2, 4, size // f, size // f, generator=torch.Generator().manual_seed(0))
    return {
        "generate2": lambda: sd.generate([src, tgt], steps=steps, latents=latents, height=size, width=size,
                                         output="tensor", progress=False),
        "diffusers2": lambda: diffusers_twin(sd)([src, tgt], num_inference_steps=steps, latents=latents.to(sd.device, sd.dtype),
                                                 height=size, width=size, output_type="pt").images,
        "p2p": lambda: PromptToPrompt(sd, src, [tgt], steps=steps).run(seed=0, height=size, width=size,
                                                                             progress=False),
        "p2p_low_memory": lambda: PromptToPrompt(sd, src, [tgt], steps=steps).run(seed=0, height=size, width=size,
                                                                                    low_memory=True, progress=False),
        "null_text": lambda: invert_image(sd, image, src, "null-text", steps, progress=False),
        "generate1": lambda: sd.generate(src, steps=steps, seed=0, height=size, width=size, progress=False),
        "pnp": lambda: translate(sd, image, "a big blue star on the left", steps=steps, inversion_steps=steps,
                                 progress=False),
    }


_TWIN = {}


def diffusers_twin(sd):
    """diffusers' StableDiffusionPipeline (DDIM, as sdlens' scheduler config) on the same weights, built once."""
    if id(sd) not in _TWIN:
        import tempfile
        from diffusers import StableDiffusionPipeline
        from sdlens.weights.save import save_folder
        with tempfile.TemporaryDirectory() as d:
            save_folder(sd, f"{d}/model", dtype=sd.dtype)
            pipe = StableDiffusionPipeline.from_pretrained(f"{d}/model", torch_dtype=sd.dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        _TWIN[id(sd)] = pipe.to(sd.device)
    return _TWIN[id(sd)]


def memory_job(args, name, q):
    """Peak memory of one job, alone in a fresh process. CPU: the peak resident set only grows, so
    the baseline is read before the first run (model and inputs loaded). CUDA: the allocator's peak."""
    sd = build(args)
    run = make_runs(args, sd)[name]
    if name == "diffusers2":
        diffusers_twin(sd)  # building it is not the job's memory
    cuda = args.device.startswith("cuda")
    if cuda:
        run()  # warm-up: cuDNN/cuBLAS workspaces are not the job's memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        q.put(torch.cuda.max_memory_allocated() - base)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run()
        q.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def time_job(args, names, q):
    """Times of `names` in one process, interleaved (A B A B ...), so that both see the same
    machine state: CPU speed drifts by tens of percent between processes, far less between
    neighbouring runs. -> per name its list of times."""
    sd = build(args)
    runs = make_runs(args, sd)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    out = {n: runs[n]() for n in names}  # warm-up
    if "diffusers2" in out:  # the same images, or the comparison means nothing
        diff = (out["generate2"].float().cpu() - out["diffusers2"].float().cpu()).abs().max().item()
        print(f"generate vs diffusers: max|image diff| {diff:.1e}", flush=True)
        if not diff < 1e-2:  # pixels in [0, 1]; fp16 differs by ~1e-3
            raise SystemExit(f"sdlens and diffusers made different images (max diff {diff:.2e}): not timing them")
    sync()
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            t0 = time.perf_counter()
            runs[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    q.put(times)


def in_child(target, *a):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=target, args=a + (q,))
    p.start()
    out = q.get()
    p.join()
    return out


PAIRS = {"generate2": "diffusers2", "p2p": "generate2", "p2p_low_memory": "generate2", "pnp": "generate1",
         "null_text": "generate1"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--random", choices=["sd15"], default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--only", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    report = {}
    for job in args.only:
        base = PAIRS[job]
        names = [job] + ([base] if base else [])
        times = in_child(time_job, args, names)
        mem = {n: in_child(memory_job, args, n) for n in names}
        line = f"{job:15s} {min(times[job]):8.2f} s   peak +{mem[job] / 2 ** 20:8.1f} MiB"
        if base:
            ratios = sorted(a / b for a, b in zip(times[job], times[base]))
            ratio = ratios[len(ratios) // 2]
            line += (f"   vs {base} {min(times[base]):.2f} s, peak +{mem[base] / 2 ** 20:.1f} MiB: "
                     f"{ratio:.2f}x time (median of {len(ratios)} interleaved pairs), "
                     f"{mem[job] / max(mem[base], 1):.2f}x peak memory")
        print(line, flush=True)
        report[job] = {"seconds": times, "peak_bytes": mem}
    print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    main()
