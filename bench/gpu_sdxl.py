"""bench/gpu.py's SDXL entry: SDXL base at 1024² in fp16 (random weights in the public topology of
stabilityai/stable-diffusion-xl-base-1.0's config.json files), the same weights in diffusers and sdlens.

Figures: generate against StableDiffusionXLPipeline with DDIM from the same latents (eager, and compiled
when the bench compiles), SDXL-Turbo's 1-step latency (guidance 0: one UNet pass; the turbo models are
SDXL's architecture, so the same weights time it at 512²), P2P against a generate of its two prompts,
and each run's peak memory. `--small` uses the SDXL topology of tests/conftest.py at 64².
"""
import copy

import torch

SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SDXL_TEXT = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu",
                 num_hidden_layers=12)
SDXL_TEXT_2 = dict(hidden_size=1280, num_attention_heads=20, intermediate_size=5120, hidden_act="gelu",
                   num_hidden_layers=32, projection_dim=1280)


def build_sdxl(small, device, seed=0):
    """A float32 StableDiffusionXLPipeline with random weights on `device` (DDIM, as sdlens samples)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from gpu_models import CLIP_IDS, TOKENIZER
    if small:
        import sys, os
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from conftest import SDXL_SPEC
        u, t1, t2, vae_ch = dict(SDXL_SPEC["unet"], sample_size=8), SDXL_SPEC["text"], SDXL_SPEC["text_2"], (32, 64, 64, 64)
    else:
        u, t1, t2, vae_ch = SDXL_UNET, SDXL_TEXT, SDXL_TEXT_2, (128, 256, 512, 512)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=32, **u)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                            block_out_channels=vae_ch, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_IDS, **t1))
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_IDS, **t2))
        for m in (unet, vae, text, text2):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text2.eval(),
                                     tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
                                     tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!"),
                                     unet=unet.eval(), scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(bench):
    """The SDXL entry of bench/gpu.py (`bench`: its Bench, for the settings, timeit and the compile flag)."""
    from gpu import PROMPT, SRC, TGT, timeit
    from gpu_models import to_sdlens
    from sdlens.editing import PromptToPrompt
    args, dev, dtype = bench.args, bench.dev, bench.dtype
    size, steps = (64 if args.small else 1024), bench.steps
    pipe32 = build_sdxl(args.small, dev)
    sd = to_sdlens(pipe32, dtype)
    pipe = pipe32.to(dtype)  # diffusers as its users run SDXL in fp16 (its VAE upcasts itself: force_upcast)
    del pipe32
    lat = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    kw = dict(latents=lat, steps=steps, height=size, width=size, output="tensor", progress=False)
    dk = dict(latents=lat.to(dev, dtype), num_inference_steps=steps, height=size, width=size, output_type="pt")
    fns = {"sdlens_eager": lambda: sd.generate(PROMPT, **kw), "diffusers_eager": lambda: pipe(PROMPT, **dk)}
    if not args.skip_compile:
        ckw = dict(backend=args.compile_backend, dynamic=False)
        sdc = copy.copy(sd)
        sdc.unet = copy.deepcopy(sd.unet).compile(**ckw)
        pipec = type(pipe)(**{**pipe.components, "unet": torch.compile(pipe.unet, **ckw)})
        pipec.set_progress_bar_config(disable=True)
        fns.update(sdlens_compiled=lambda: sdc.generate(PROMPT, **kw), diffusers_compiled=lambda: pipec(PROMPT, **dk))
    out = dict(size=size, steps=steps, dtype=str(dtype), generate=timeit(fns, args.reps, dev))
    # SDXL-Turbo: 1 step, guidance 0 at 512² (the turbo models' size), trailing timesteps (t = 999)
    ts = 64 if args.small else 512
    tl = torch.randn(1, 4, ts // 8, ts // 8, generator=torch.Generator().manual_seed(1))
    from sdlens.weights.presets import PRESETS
    turbo = copy.copy(sd)
    turbo.scheduler = PRESETS["sdxl-turbo"]["scheduler"]
    from diffusers import DDIMScheduler
    tpipe = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)})
    tpipe.set_progress_bar_config(disable=True)
    out["turbo_1step"] = timeit({
        "sdlens": lambda: turbo.generate(PROMPT, steps=1, guidance_scale=0.0, latents=tl, height=ts, width=ts,
                                         output="tensor", progress=False),
        "diffusers": lambda: tpipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=tl.to(dev, dtype),
                                   height=ts, width=ts, output_type="pt")}, args.reps, dev)
    pk = dict(seed=0, height=size, width=size, progress=False)
    p2p = timeit({"p2p": lambda: PromptToPrompt(sd, SRC, [TGT], steps=steps).run(**pk),
                  "generate2": lambda: sd.generate([SRC, TGT], steps=steps, output="tensor", **pk)}, args.reps, dev)
    out["p2p"] = dict(runs=p2p, ratio=p2p["p2p"]["median_s"] / p2p["generate2"]["median_s"])
    g = out["generate"]
    out["ratio_eager"] = g["sdlens_eager"]["median_s"] / g["diffusers_eager"]["median_s"]
    if "sdlens_compiled" in g:
        out["ratio_compiled"] = g["sdlens_compiled"]["median_s"] / g["diffusers_compiled"]["median_s"]
    return out
