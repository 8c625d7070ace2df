"""The GPU path in one run: correctness against diffusers, then sdlens and diffusers timed side by side.

    python bench/gpu.py --out DIR                                  # CUDA, full SD 1.5 (+ SD 2.1 768-v for DIFT)
    python bench/gpu.py --device cpu --small --out /tmp/gpubench   # the CPU path, small models, ~2.5 minutes

Random weights in the exact public topologies (bench/gpu_models.py), the same in both libraries, built
here: nothing is downloaded. It writes DIR/gpu.json (every figure, versions, settings, the command
line), DIR/gpu.md (entry | sdlens | baseline | ratio | aim | met?) and DIR/profile.txt.

Needs diffusers. GPU machines without network have torch, transformers and safetensors but no
diffusers: bring it as a wheel. On a machine with network: `pip download diffusers==0.42.1 --no-deps -d wheels/`
(and huggingface_hub if missing); on the GPU machine: `pip install --no-deps wheels/diffusers-*.whl`.

Sections (each one's failure is recorded in gpu.json and the run goes on):
- correctness: fp32/fp16/bf16 (the CPU run: fp32) UNet, text encoder, VAE, and a `--steps` generate at 512^2 (--small: 128^2)
  from the same latents, each against diffusers, both measured against a more precise oracle (see
  gpu_models.judge);
- host_syncs: one P2P step and one PnP step under CUDA's sync debug mode "error";
- unet_forward (batch 2, 64^2 latents; sdlens gets a Python int t as its sampler gives it, diffusers a
  tensor from scheduler.timesteps, as its pipeline gives it), attention_hooks (cross-attention
  `hook_probs` hooked by an identity: the explicit-softmax path P2P forces, against SDPA: the most a
  fused attention-edit kernel could save), channels_last, generate, p2p (against a generate of its two
  prompts), pnp (with a `--steps` inversion), null_text, dift (SD 2.1 at 768^2, t = 261, up_ft_index 1,
  ensemble 8), sdxl (bench/gpu_sdxl.py: SDXL base at 1024² fp16, generate against StableDiffusionXLPipeline
  eager and compiled, SDXL-Turbo 1-step latency, P2P against a generate of its two prompts, peak memory),
  profile (top kernels of a few generate steps).
Compiled variants use `torch.compile(backend=--compile-backend, dynamic=False)` (one static graph per
shape: the bench's shapes are fixed) for sdlens' `core` and for diffusers' UNet; first-call times
(compilation) are reported apart. PnP, null-text (a backward pass) and DIFT are timed eager.
Timing: one warm-up (the first call), then `--reps` interleaved rounds; the median. CUDA: synchronised,
peak memory = torch.cuda.max_memory_allocated() over the last round of each entry.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_report import AIMS, table, write_atomic  # noqa: E402  (bench/ is no package)

ENTRIES = ("correctness", "host_syncs", "unet_forward", "attention_hooks", "channels_last", "generate", "p2p", "pnp",
           "null_text", "dift", "sdxl", "profile")
PROMPT, SRC, TGT = "a photo of an astronaut riding a horse", "a big red circle on the left", "a big blue circle on the left"
# The correctness checks' smallest image side. A check is only as sound as its computation is well-conditioned
# (gpu_models.judge). --small's 64^2 puts its UNet's deepest level at 1x1, where each GroupNorm group holds 2
# numbers (64 channels / 32 groups): at t = 334 one group's |x|max / std reached 2292, amplifying its rounding
# about as much, and the fp32 generate error swung 11x with the kernels. At 128^2 (2x2: 8 numbers a group)
# no group's |x|max / std exceeded 5 and the error stayed 0.9e-6 .. 1.4e-6 whatever the kernels.
CHECK_MIN_SIZE = 128


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fns, reps, dev, warm=None):
    """{label: fn} -> {label: first_s, times_s, median_s, peak_bytes}. The first call of each (compilation,
    allocator growth, cuDNN choice) is timed apart; `warm` may give a cheaper warm-up per label. Then
    `reps` rounds run the labels in turn, so that clock and thermal drift hit all alike."""
    out = {}
    for k, fn in fns.items():
        sync(dev)
        t0 = time.perf_counter()
        (warm or {}).get(k, fn)()
        sync(dev)
        out[k] = dict(first_s=time.perf_counter() - t0, times_s=[], peak_bytes=None)
    for r in range(reps):
        for k, fn in fns.items():
            last = dev.type == "cuda" and r == reps - 1
            if last:
                sync(dev)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            out[k]["times_s"].append(time.perf_counter() - t0)
            if last:  # the process's peak (every model loaded counts) and the run's own working memory above it
                out[k]["peak_bytes"] = torch.cuda.max_memory_allocated()
                out[k]["peak_over_base_bytes"] = out[k]["peak_bytes"] - base
    for v in out.values():
        v["median_s"] = statistics.median(v["times_s"])
    return out


class Bench:
    def __init__(self, args):
        from gpu_models import build_diffusers, pipe_as, to_sdlens
        self.args, self.dev = args, torch.device(args.device)
        self.size, self.steps = (64 if args.small else 512), args.steps
        self.pipe32 = build_diffusers("sd1", args.small, self.dev)
        self.dtype = args.dtype
        self.pipe = pipe_as(self.pipe32, self.dtype)  # diffusers as its users run it: everything in the dtype
        self.sd = to_sdlens(self.pipe32, self.dtype)  # sdlens as its users run it: the VAE in float32
        self.lat = torch.randn(1, 4, self.size // 8, self.size // 8, generator=torch.Generator().manual_seed(0))
        self.image = torch.rand(1, 3, self.size, self.size, generator=torch.Generator().manual_seed(2))
        self.ours_c = self.theirs_c = None
        if not args.skip_compile:  # compiled lazily by their first call, which timeit reports as first_s
            kw = dict(backend=args.compile_backend, dynamic=False)
            self.ours_c = self.sd.compile(**kw).unet._compiled
            self.sd.unet._compiled = None  # eager unless `ours(compiled=True)` switches it on
            self.theirs_c = torch.compile(self.pipe.unet, **kw)
            self.pipe_c = type(self.pipe)(**{**self.pipe.components, "unet": self.theirs_c}, requires_safety_checker=False)
            self.pipe_c.set_progress_bar_config(disable=True)

    def ours(self, fn, compiled=False):
        """fn run with sdlens' UNet compiled or eager (the compiled callable is kept, and reused)."""
        def run():
            self.sd.unet._compiled = self.ours_c if compiled else None
            try:
                return fn()
            finally:
                self.sd.unet._compiled = None
        return run

    def modes(self):
        return [("eager", False)] + ([("compiled", True)] if self.ours_c is not None else [])

    # ---- sections ----
    def correctness(self):
        from gpu_models import check_generate, check_modules, to_sdlens
        cuda = self.dev.type == "cuda"
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 references
        try:
            # The CPU run checks float32 alone: fp16 convolutions need a GPU, and bf16 on a CPU without bf16
            # units took 36 of the run's 56 s on 2 cores (tests/test_parity.py and test_precision.py check
            # sdlens' reduced precision against diffusers). Float64 oracles for the modules, and for the
            # generate on the CPU (on CUDA a float32 one: 50 float64 steps at 512^2 would take a large
            # share of the time budget).
            dtypes = [torch.float32, torch.float16, torch.bfloat16] if cuda else [torch.float32]
            size = max(self.size, CHECK_MIN_SIZE)
            rows = check_modules(self.pipe32, to_sdlens(self.pipe32, torch.float32), dtypes, torch.float64,
                                 size // 8, self.size)
            gdt = [torch.float16, torch.bfloat16] if cuda else [torch.float32]
            rows += check_generate(self.pipe32, lambda d: to_sdlens(self.pipe32, d), gdt,
                                   torch.float32 if cuda else torch.float64, self.steps, size)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
            del self.pipe32  # only the checks use the float32 copy: later peaks count the timed models alone
        return dict(checks=rows, passed=sum(r["passed"] for r in rows), total=len(rows), size=size,
                    rule="err = ||x - oracle|| / ||oracle||; pass if err_sdlens <= 2 err_diffusers + u(dtype), "
                         "u = 2^-24 / 2^-11 / 2^-8 for fp32 / fp16 / bf16 (unit roundoff)")

    def host_syncs(self):
        from gpu_models import host_sync_check
        from sdlens.editing import PromptToPrompt
        from sdlens.editing.pnp import translate
        kw = dict(height=self.size, width=self.size, progress=False)
        return dict(p2p=host_sync_check(self.sd, lambda: PromptToPrompt(self.sd, SRC, [TGT], steps=3).run(seed=0, **kw)),
                    pnp=host_sync_check(self.sd, lambda: translate(self.sd, self.image, TGT, steps=3, inversion_steps=3,
                                                                   progress=False)))

    def unet_inputs(self, batch=2):
        x = torch.randn(batch, 4, self.size // 8, self.size // 8, generator=torch.Generator().manual_seed(3))
        ctx = self.sd.encode_prompt(["", PROMPT] * (batch // 2))
        self.pipe.scheduler.set_timesteps(self.steps, device=self.dev)
        tt = self.pipe.scheduler.timesteps[len(self.pipe.scheduler.timesteps) // 2]  # a 0-d tensor on the device
        return x.to(self.dev), int(tt), tt, ctx.to(self.dtype)  # fp32 x, as sdlens' sampler keeps its latents

    @torch.no_grad()
    def unet_forward(self):
        x, t, tt, ctx = self.unet_inputs()
        xd = x.to(self.dtype)  # diffusers' pipeline keeps its latents in the model's dtype
        # each called as its pipeline calls it, so that generate reuses these compiled graphs
        fns = {"sdlens_eager": self.ours(lambda: self.sd.unet(x, t, ctx)),
               "diffusers_eager": lambda: self.pipe.unet(xd, tt, encoder_hidden_states=ctx, return_dict=False)[0]}
        if self.ours_c is not None:
            fns["sdlens_compiled"] = self.ours(lambda: self.sd.unet(x, t, ctx), compiled=True)
            fns["diffusers_compiled"] = lambda: self.theirs_c(xd, tt, encoder_hidden_states=ctx, return_dict=False)[0]
        return dict(batch=2, latent=self.size // 8, runs=timeit(fns, self.args.reps, self.dev))

    @torch.no_grad()
    def attention_hooks(self):
        x, t, _, ctx = self.unet_inputs()
        names = self.sd.unet.hook_names(kind="cross_attention", point="probs")
        run = self.ours(lambda: self.sd.unet(x, t, ctx))

        def hooked():
            with self.sd.unet.hooks({n: (lambda p, h: None) for n in names}):
                return run()
        res = timeit({"sdpa": run, "probs_hooked": hooked}, self.args.reps, self.dev)
        saved = res["probs_hooked"]["median_s"] - res["sdpa"]["median_s"]
        return dict(hooked_points=len(names), runs=res, fused_kernel_upper_bound_s=saved, mode="eager")

    @torch.no_grad()
    def channels_last(self):
        import copy
        x, t, _, ctx = self.unet_inputs()
        cl = copy.deepcopy(self.sd.unet).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        res = timeit({"contiguous": self.ours(lambda: self.sd.unet(x, t, ctx)), "channels_last": lambda: cl(xc, t, ctx)},
                     self.args.reps, self.dev)
        return dict(runs=res, mode="eager")

    def generate(self):
        kw = dict(latents=self.lat, steps=self.steps, height=self.size, width=self.size, output="tensor", progress=False)
        dk = dict(latents=self.lat.to(self.dev, self.dtype), num_inference_steps=self.steps, height=self.size,
                  width=self.size, output_type="pt")
        fns = {"sdlens_eager": self.ours(lambda: self.sd.generate(PROMPT, **kw)),
               "diffusers_eager": lambda: self.pipe(PROMPT, **dk)}
        if self.ours_c is not None:
            fns["sdlens_compiled"] = self.ours(lambda: self.sd.generate(PROMPT, **kw), compiled=True)
            fns["diffusers_compiled"] = lambda: self.pipe_c(PROMPT, **dk)
        res = timeit(fns, self.args.reps, self.dev)
        for v in res.values():
            v["it_per_s"] = self.steps / v["median_s"]
        return dict(steps=self.steps, size=self.size, scheduler="DDIM", runs=res)

    def p2p(self):
        from sdlens.editing import PromptToPrompt
        kw = dict(seed=0, height=self.size, width=self.size, progress=False)
        out = {}
        for mode, c in self.modes():
            fns = {"p2p": self.ours(lambda: PromptToPrompt(self.sd, SRC, [TGT], steps=self.steps).run(**kw), c),
                   "generate2": self.ours(lambda: self.sd.generate([SRC, TGT], steps=self.steps, output="tensor", **kw), c)}
            res = timeit(fns, self.args.reps, self.dev)
            out[mode] = dict(runs=res, ratio=res["p2p"]["median_s"] / res["generate2"]["median_s"])
        return out

    def pnp(self):
        from sdlens.editing.pnp import translate
        run = lambda: translate(self.sd, self.image, TGT, steps=self.steps, inversion_steps=self.steps, progress=False)
        return dict(runs=timeit({"pnp": self.ours(run)}, self.args.reps, self.dev), inversion_steps=self.steps,
                    mode="eager")

    def null_text(self):
        from sdlens.inversion import invert_image
        run = lambda n: self.ours(lambda: invert_image(self.sd, self.image, SRC, "null-text", n, progress=False))
        # One timed run (it is the longest entry); the warm-up is a 2-step inversion. Eager: it runs backward.
        return dict(runs=timeit({"null_text": run(self.steps)}, 1, self.dev, warm={"null_text": run(2)}),
                    steps=self.steps, inner_steps=10, mode="eager")

    @torch.no_grad()
    def dift(self):
        from features_vs_diffusers import dift_reference
        from gpu_models import build_diffusers, pipe_as, to_sdlens
        from sdlens.features import extract, paper_layer
        size, n, ens = (128 if self.args.small else 768), 2, 8
        pipe32 = build_diffusers("sd2v", self.args.small, self.dev, seed=1)
        sd2, pipe2 = to_sdlens(pipe32, self.dtype), pipe_as(pipe32, self.dtype, vae_dtype=torch.float32)
        del pipe32
        images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(4))
        name = paper_layer("dift", 1, sd2.unet)
        ids = pipe2.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(self.dev)
        embeds = pipe2.text_encoder(ids)[0]
        fns = {"sdlens_extract": lambda: extract(sd2, images, name, ensemble=ens),
               "diffusers_dift": lambda: dift_reference(pipe2, images, embeds, 261, 1, ens, self.dev, self.dtype)}
        res = timeit(fns, self.args.reps, self.dev)
        for v in res.values():
            v["images_per_s"] = n / v["median_s"]
        return dict(images=n, size=size, ensemble=ens, t=261, hook=name, mode="eager", runs=res)

    def sdxl(self):
        import gpu_sdxl
        return gpu_sdxl.run(self)

    def profile(self):
        from torch.profiler import ProfilerActivity, profile
        cuda, c = self.dev.type == "cuda", self.ours_c is not None
        run = self.ours(lambda: self.sd.generate(PROMPT, steps=3, latents=self.lat, height=self.size, width=self.size,
                                                 output="tensor", progress=False), c)
        run()  # warm
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            run()
            sync(self.dev)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        # Count each microsecond once: on CUDA only the kernels themselves (an op's device time repeats its
        # kernels'), and never user annotations ("Torch-Compiled Region" spans a whole step).
        from torch.autograd import DeviceType
        ev = [e for e in prof.key_averages() if not e.is_user_annotation and "Compiled" not in e.key
              and (not cuda or e.device_type == DeviceType.CUDA)]
        ev = sorted(ev, key=lambda e: getattr(e, key, 0), reverse=True)
        total = sum(getattr(e, key, 0) for e in ev) or 1
        top = [dict(name=e.key, self_us=getattr(e, key, 0), share=getattr(e, key, 0) / total, calls=e.count) for e in ev[:15]]
        self.profile_table = prof.key_averages().table(sort_by=key, row_limit=15)
        summary = "; ".join(f"{t['name'][:40]} {t['share']:.0%}" for t in top[:3])
        return dict(mode="compiled" if c else "eager", steps=3, sorted_by=key, top=top, summary=summary)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="small models in the exact SD layouts, small images, few steps")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 4 with --small)")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="timing dtype (default float16 on CUDA, float32 on the CPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor; aot_eager on --device cpu --small)")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--force", action="store_true", help="overwrite an existing DIR/gpu.json")
    ap.add_argument("--budget-s", type=float, default=420, help="start no section after this many seconds (default 420)")
    args = ap.parse_args(argv)
    json_path = os.path.join(args.out, "gpu.json")
    if os.path.exists(json_path) and not args.force:
        print(f"gpu.py: {json_path} exists; pass --force to overwrite it, or choose another --out", file=sys.stderr)
        return 2
    try:
        import diffusers
    except ImportError:
        print("gpu.py: diffusers is not installed; pip install --no-deps diffusers-*.whl (get the wheel on a machine with "
              "network: pip download diffusers==0.42.1 --no-deps -d wheels/)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: --device cuda but torch sees no CUDA GPU; run with --device cpu --small", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 3:
        print(f"gpu.py: --steps must be at least 3 (the host-sync check runs step 1 to 2), got {args.steps}", file=sys.stderr)
        return 2
    args.steps = args.steps or (4 if args.small else 50)
    args.dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    notes = []
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.device == "cpu" and args.small else "inductor"
        if args.compile_backend == "aot_eager" and not args.skip_compile:
            notes.append("compiled with aot_eager: inductor's C++ build takes ~80 s per graph on 2 CPU cores")
    if args.device == "cpu" and args.small:
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and threads on a shared CPU contend
        notes.append("one CPU thread (tiny models)")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    R = {}
    print(f"gpu.py: {args.device}, {'small' if args.small else 'full-size'} models, {args.steps} steps, {args.dtype}",
          flush=True)
    try:
        bench = Bench(args)
    except Exception as e:
        traceback.print_exc()
        bench, R = None, {n: {"error": f"setup: {type(e).__name__}: {e}"[:500]} for n in ENTRIES}
    for name in ENTRIES if bench else ():
        if (name == "profile" and args.skip_profile):
            R[name] = {"skipped": "--skip-profile"}
            continue
        if time.perf_counter() - t_start > args.budget_s:  # the rest is recorded as skipped, not lost to a kill
            R[name] = {"skipped": f"over the {args.budget_s:.0f} s budget (--budget-s)"}
            continue
        t0 = time.perf_counter()
        print(f"[{t0 - t_start:7.1f} s] {name}", flush=True)
        try:
            R[name] = getattr(bench, name)()
        except Exception as e:  # one failing entry must not lose the others
            traceback.print_exc()
            R[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        R[name]["section_s"] = time.perf_counter() - t0
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start
    aims_apply = args.device == "cuda" and not args.small
    report = dict(command=[sys.executable] + sys.argv, elapsed_s=elapsed, notes=notes, entries=R,
                  device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
                  versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                                transformers=__import__("transformers").__version__, python=platform.python_version()),
                  settings=dict(device=args.device, small=args.small, steps=args.steps, dtype=str(args.dtype), reps=args.reps,
                                compile_backend=None if args.skip_compile else args.compile_backend, dynamic=False,
                                aims=AIMS, aims_apply=aims_apply))
    md = table(R, aims_apply)
    head = (f"# sdlens GPU bench\n\n{report['device']}, torch {torch.__version__}, diffusers {diffusers.__version__}; "
            f"{'small' if args.small else 'full-size SD 1.5 / SD 2.1'} random weights, {args.steps} steps, {args.dtype}; "
            f"compile: {report['settings']['compile_backend']}; {elapsed:.0f} s in all.\n"
            + "".join(f"\nNote: {n}." for n in notes) + ("" if aims_apply else
            "\nThe aims are for full-size models on an H100: here 'met?' only says how these figures compare.")
            + "\nTimes are medians; '+x GiB' is a run's peak CUDA memory above what was allocated before it "
              "(gpu.json also has the process's peak, torch.cuda.max_memory_allocated()).\n\n")
    write_atomic(json_path, json.dumps(report, indent=1, default=str))
    write_atomic(os.path.join(args.out, "gpu.md"), head + md)
    if bench is not None and getattr(bench, "profile_table", None):
        write_atomic(os.path.join(args.out, "profile.txt"), bench.profile_table)
    print("\n" + md + f"\nwrote {json_path}, gpu.md in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
