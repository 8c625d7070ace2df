"""Helpers of bench/gpu.py: the same random weights in diffusers and in sdlens, the correctness
checks against diffusers, and the host-sync check. Nothing here downloads anything.

Topologies: "sd1" is SD 1.5 (diffusers' UNet2DConditionModel defaults with cross_attention_dim 768,
the VAE of SD's vae/config.json, CLIP ViT-L/14's text config); "sd2v" is SD 2.1 768-v (heads
(5, 10, 20, 20), context 1024, linear proj_in, attention upcast; OpenCLIP ViT-H's 23 used layers).
`small=True` keeps every structural feature at tiny widths (the topologies of tests/conftest.py).
"""
import copy
import os

import torch

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "clip_tokenizer")
CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
FULL = {  # the public config.json files of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
    "sd1": dict(unet=dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768),
                vae=(128, 256, 512, 512), sample=512, prediction="epsilon", pad=None,
                text=dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu",
                          num_hidden_layers=12)),
    "sd2v": dict(unet=dict(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                           use_linear_projection=True, upcast_attention=True),
                 vae=(128, 256, 512, 512), sample=768, prediction="v_prediction", pad="!",
                 text=dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
                           num_hidden_layers=23)),
}
SMALL = {  # tests/conftest.py SPECS: 4 levels, 2 ResBlocks each, no attention at the deepest level
    "sd1": dict(unet=dict(sample_size=8, block_out_channels=(32, 64, 64, 64), attention_head_dim=8, cross_attention_dim=64),
                vae=(32, 64, 64, 64), sample=64, prediction="epsilon", pad=None,
                text=dict(hidden_size=64, num_attention_heads=1, intermediate_size=128, hidden_act="quick_gelu",
                          num_hidden_layers=2)),
    "sd2v": dict(unet=dict(sample_size=16, block_out_channels=(64, 64, 128, 128), attention_head_dim=(1, 1, 2, 2),
                           cross_attention_dim=128, use_linear_projection=True, upcast_attention=True),
                 vae=(32, 64, 64, 64), sample=128, prediction="v_prediction", pad="!",
                 text=dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, hidden_act="gelu",
                           num_hidden_layers=2)),
}
# Unit roundoff u = 2^-(mantissa bits + 1): the relative error of one rounding.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def build_diffusers(kind, small, device, seed=0):
    """A float32 StableDiffusionPipeline with random weights, built on `device` (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    logging.set_verbosity_error()  # not "modules that should be kept in float32: []" at every cast
    spec = (SMALL if small else FULL)[kind]
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: initialising 1 B parameters on the CPU takes tens of seconds
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **spec["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                            block_out_channels=spec["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=spec["sample"])
        text = CLIPTextModel(CLIPTextConfig(**CLIP_IDS, **spec["text"]))
        # Random init leaves norms at 1 and biases at 0; perturb every parameter so that a key mapped to
        # the wrong place shows in the outputs (as tests/conftest.py does).
        for m in (unet, vae, text):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER, **({"pad_token": spec["pad"]} if spec["pad"] else {}))
    # sdlens' DDIMConfig: scaled_linear 0.00085-0.012, steps_offset 1, set_alpha_to_one False; no clipping.
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=spec["prediction"])
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_as(pipe, dtype, vae_dtype=None):
    """A copy of the pipeline in `dtype` (the VAE in `vae_dtype`, default the same)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    p = StableDiffusionPipeline(unet=copy.deepcopy(pipe.unet).to(dtype), vae=copy.deepcopy(pipe.vae).to(vae_dtype or dtype),
                                text_encoder=copy.deepcopy(pipe.text_encoder).to(dtype), tokenizer=pipe.tokenizer,
                                scheduler=DDIMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def to_sdlens(pipe, dtype):
    """The pipeline's weights in sdlens, through the loader's own pieces (configs_from_diffusers, the key
    converters, `fill`), in memory: a diffusers folder on disk would cost ~10 s of writing and reading."""
    from sdlens.pipeline import StableDiffusion
    from sdlens.schedulers import DDIMConfig
    from sdlens.text import CLIPTextEncoder
    from sdlens.unet import UNetModel
    from sdlens.vae import AutoencoderKL
    from sdlens.weights.config import configs_from_diffusers
    from sdlens.weights.convert import unet_to_diffusers, vae_to_diffusers
    from sdlens.weights.load import fill
    te2 = getattr(pipe, "text_encoder_2", None)  # SDXL
    ucfg, vcfg, tcfg, *t2cfg = configs_from_diffusers(dict(pipe.unet.config), dict(pipe.vae.config),
                                                      pipe.text_encoder.config.to_dict(),
                                                      tc2=te2.config.to_dict() if te2 is not None else None)
    with torch.device("meta"):
        unet, vae, text = UNetModel(ucfg), AutoencoderKL(vcfg), CLIPTextEncoder(tcfg)
        text2 = CLIPTextEncoder(t2cfg[0]) if te2 is not None else None
    u, v, t = pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()
    src = lambda d: {k: (tuple(x.shape), (lambda x=x: x)) for k, x in d.items()}
    up = lambda x: x[:, :, None, None] if x.ndim == 2 else x  # VAE mid attention: Linear there, 1x1 conv here
    dev = pipe.unet.device
    unet = fill(unet, src({k: u[unet_to_diffusers(k, ucfg)] for k in unet.state_dict()}), "UNet", "bench", dtype, dev)
    vae = fill(vae, src({k: up(v[vae_to_diffusers(k, vcfg)]) for k in vae.state_dict()}), "VAE", "bench", torch.float32, dev)
    bare = lambda k: k if k in t else k[len("text_model."):]  # transformers 5 drops the text_model. prefix
    text = fill(text, src({k: t[bare(k)] for k in text.state_dict()}), "text encoder", "bench", dtype, dev)
    sched = DDIMConfig(prediction_type=pipe.scheduler.config.prediction_type)
    size = pipe.unet.config.sample_size * 2 ** (len(vcfg.ch_mult) - 1)
    if te2 is None:
        return StableDiffusion(unet, vae, text, pipe.tokenizer, sched, default_size=size)
    t2 = te2.state_dict()
    text2 = fill(text2, src({k: t2[k] for k in text2.state_dict()}), "text encoder 2", "bench", dtype, dev)
    return StableDiffusion(unet, vae, text, pipe.tokenizer, sched, default_size=size, text_encoder_2=text2,
                           tokenizer_2=pipe.tokenizer_2, force_zeros_for_empty_prompt=True)


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (METHOD.md's measure); NaN anywhere gives NaN, which never passes."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def judge(name, dtype, ours, theirs, ref):
    """One check. Both implementations compute the same function in `dtype` with different operation
    orders; `ref` computes it in a higher precision from the same constants. Tolerance: ours' error at
    most twice diffusers' own, plus one unit roundoff u of the dtype (so that two errors at the rounding
    floor still pass): err_ours <= 2 err_diffusers + u.

    Why the rule is sound, and where: an error against `ref` is about kappa c u, with kappa the condition
    of the computation (one function, one input: the same for both) and c set by the kernels' summation
    orders, which change it by small factors (fp32 generate on the CPU: 1.55x between oneDNN's
    convolutions and ATen's); 2x covers that. Where kappa is large the error is instead one draw of
    amplified rounding, whose size depends on which bits reach the ill-conditioned operation, i.e. on the
    machine's kernels: the same code's fp32 generate error ranged over 1.6e-5 .. 1.8e-4 with the thread
    count and oneDNN alone (--small at 64^2, where the UNet's deepest GroupNorm groups hold 2 numbers).
    So the checks run on well-conditioned inputs only (Bench.correctness: CHECK_MIN_SIZE)."""
    u = UNIT_ROUNDOFF[dtype]
    eo, et = rel_err(ours, ref), rel_err(theirs, ref)
    tol = 2 * et + u
    # The rule says "no worse than diffusers": where diffusers itself overflowed (NaN), finite is enough.
    ok = eo <= tol if et == et else eo == eo
    row = dict(check=name, dtype=str(dtype).replace("torch.", ""), err_sdlens=eo, err_diffusers=et,
               sdlens_vs_diffusers=rel_err(ours, theirs), tolerance=tol, passed=bool(ok))
    print(f"  {name:14s} {row['dtype']:9s} err sdlens {eo:.2e}  diffusers {et:.2e}  |sdlens-diffusers| "
          f"{row['sdlens_vs_diffusers']:.2e}  tol {tol:.2e}  {'pass' if row['passed'] else 'FAIL'}", flush=True)
    return row


@torch.no_grad()
def check_modules(pipe, sd, dtypes, ref_dtype, latent, image):
    """UNet, text encoder and VAE (encode and decode) in each dtype, sdlens against diffusers, both
    measured against diffusers in `ref_dtype` (float64: an oracle far more precise than either).
    `latent`: the UNet's side; `image`: the VAE's (it decodes image/8 latents). The VAE's deepest level
    holds many numbers per GroupNorm group even at 64^2, so only the UNet needs gpu.CHECK_MIN_SIZE."""
    dev, g = sd.device, torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(dev)
    z = torch.randn(1, 4, image // 8, image // 8, generator=g).to(dev)
    ctx = torch.randn(2, 77, sd.unet.cfg.context_dim, generator=g).to(dev)
    img = (torch.rand(1, 3, image, image, generator=g) * 2 - 1).to(dev)
    ids = sd.tokenize(["a photo of a cat riding a bicycle", "a red circle"])
    t = 501  # ours gets a Python int as the sampler gives it; diffusers a tensor, as its pipeline does
    tt = torch.tensor(t, device=dev)
    runs = {  # name -> (ours(module, dtype), theirs(module, dtype))
        "unet": (lambda m, d: m(x, t, ctx), lambda m, d: m(x.to(d), tt, ctx.to(d)).sample),
        "text_encoder": (lambda m, d: m(ids), lambda m, d: m(ids).last_hidden_state),
        "vae_encode": (lambda m, d: m.encode(img.to(d))[0], lambda m, d: m.encode(img.to(d)).latent_dist.mean),
        "vae_decode": (lambda m, d: m.decode(z.to(d)), lambda m, d: m.decode(z.to(d)).sample),
    }
    rows = []
    for name, (ours_fn, theirs_fn) in runs.items():
        attr = name.split("_")[0] if name.startswith("vae") else name
        ours_m, theirs_m = getattr(sd, attr), getattr(pipe, attr)
        ref = theirs_fn(copy.deepcopy(theirs_m).to(ref_dtype), ref_dtype).double()
        for d in dtypes:
            o = ours_fn(copy.deepcopy(ours_m).to(d), d)
            th = theirs_fn(copy.deepcopy(theirs_m).to(d), d)
            rows.append(judge(name, d, o.float(), th.float(), ref))
    return rows


def reference_pipe(pipe, dtype):
    """The pipeline in `dtype` with its DDIM step arithmetic in `dtype` too. diffusers keeps alphas_cumprod in
    float32 whatever the model's dtype, so its float64 pipeline computes sqrt(a_t), 1 - a_t, ... in float32,
    rounding as its own float32 run does: a reference biased towards diffusers (sdlens computes them in
    Python floats). Upcasting the table keeps the constants both libraries use (the same float32 values:
    the reference measures arithmetic, not the shared schedule) and computes everything after them in
    `dtype`. Then sdlens' float64 sampler and this reference agree to 6e-16; the float32 arithmetic moved
    the reference by 2.7e-7 at 64^2."""
    p = pipe_as(pipe, dtype)
    p.scheduler.alphas_cumprod = p.scheduler.alphas_cumprod.to(dtype)
    p.scheduler.final_alpha_cumprod = p.scheduler.final_alpha_cumprod.to(dtype)
    return p


@torch.no_grad()
def check_generate(pipe, sd_of, dtypes, ref_dtype, steps, size, prompt="a photo of an astronaut riding a horse"):
    """`steps`-step DDIM generate with guidance 7.5 from the same latents: sdlens (`sd_of(dtype)`) against
    StableDiffusionPipeline with DDIMScheduler, both against the pipeline in `ref_dtype` (`reference_pipe`)."""
    lat = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="pt")
    ref = reference_pipe(pipe, ref_dtype)(prompt, latents=lat.to(pipe.device, ref_dtype), **kw).images
    rows = []
    for d in dtypes:
        ours = sd_of(d).generate(prompt, steps=steps, guidance_scale=7.5, latents=lat, height=size, width=size,
                                 output="tensor", progress=False)
        theirs = pipe_as(pipe, d)(prompt, latents=lat.to(pipe.device, d), **kw).images
        rows.append(judge(f"generate {steps}", d, ours.float().cpu(), theirs.float().cpu(), ref.cpu()))
    return rows


def host_sync_check(sd, run):
    """Run `run()` (an edit of 3 steps, eager) with CUDA's sync debug mode set to "error" from the start of
    the UNet call of step 1 to the start of step 2's: one whole step (hooks, guidance, DDIM update, the
    next call's input). A synchronizing call in it (`.item()`, a host copy, data-dependent shapes)
    raises. Inversions inside `run` number their steps too, so one of their steps is checked as well."""
    if sd.device.type != "cuda":
        return dict(result="n/a (CUDA only)")
    prev = torch.cuda.get_sync_debug_mode()

    def toggle(x, hook):
        torch.cuda.set_sync_debug_mode("error" if hook.ctx is not None and hook.ctx.step == 1 else prev)

    first = sd.unet.hook_names()[0]  # the first point a forward passes: the start of the UNet call
    try:
        with sd.unet.hooks({first: toggle}):
            run()
        return dict(result="pass", point=first)
    except RuntimeError as e:
        if "synchroniz" not in str(e):  # an out-of-memory or other failure is not a host sync
            raise
        return dict(result="FAIL", point=first, error=str(e).splitlines()[0][:300])
    finally:
        torch.cuda.set_sync_debug_mode(prev)
