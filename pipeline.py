"""The text-to-image pipeline: tokenizer -> CLIP text -> DDIM over the UNet -> VAE decode.

SDXL adds a second tokenizer and text encoder (OpenCLIP bigG), whose pooled vector and the image
size enter the UNet as its added conditioning (`unet.model.pack_added_cond`)."""
import math
import numbers
import warnings
from typing import List, Optional, Union

import numpy as np
import torch
from PIL import Image

from .hooks import StepContext
from .schedulers import DDIMConfig, classifier_free_guidance, sample, sample_euler_ancestral
from .schedulers.ddim import check_eta
from .unet.model import pack_added_cond
from .checks import finite_tensor, kind, tensor_shape, whole

SAMPLERS = ("ddim", "euler_ancestral")


def uses_guidance(guidance_scale) -> bool:
    """Whether classifier-free guidance runs (two passes, unconditional rows). w = 1 is the
    conditional prediction; w = 0 means "no guidance" too, as diffusers (guidance only for w > 1)
    and the turbo models' cards use it, not the unconditional prediction the formula would give."""
    return guidance_scale not in (0, 1)


class StableDiffusion:
    """The loaded model (`sdlens.load(...)`): `unet`, `vae`, `text_encoder`, `tokenizer`, the DDIM
    `scheduler` config, and `default_size`, the side of the images it was trained on. SDXL also has
    `text_encoder_2` and `tokenizer_2` (None otherwise) and `force_zeros_for_empty_prompt` (its
    model_index.json: no negative prompt means a zero unconditional context). `name` is the preset
    or folder it came from ("sdxl-turbo", ...), `defaults` the steps and guidance it is meant for."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler: DDIMConfig, default_size: int = 512,
                 text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt=False, name="", defaults=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler, self.default_size = scheduler, default_size
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt, self.name = force_zeros_for_empty_prompt, name
        self.defaults = dict(defaults or {})

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        if self.is_sdxl:
            return "SDXL"
        # CLIP L / OpenCLIP H
        return {768: "SD 1.x", 1024: "SD 2.x"}.get(self.unet.cfg.context_dim, "SD architecture, custom widths")

    def __repr__(self):
        dim = self.unet.cfg.context_dim
        s, f, c = self.default_size, self.latent_factor, self.unet.cfg.in_channels
        millions = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"
        text = millions(self.text_encoder) + (f" + {millions(self.text_encoder_2)}" if self.is_sdxl else "")
        name = f" {self.name}," if self.name else ""
        return (f"StableDiffusion({self.family}:{name} {s}x{s} images, latents [B, {c}, {s // f}, {s // f}] "
                f"(VAE factor {f}), {self.dtype} on {self.device} (VAE float32), {self.scheduler.prediction_type} "
                f"prediction, {len(self.unet.hook_names())} hook points; UNet {millions(self.unet)}, "
                f"text encoder {text} (context {dim}), VAE {millions(self.vae)} parameters)")

    def compile(self, **kwargs):
        """Compile the UNet, where nearly all the time goes, with `torch.compile(**kwargs)`; returns self.
        The first call of each new shape or hook set pays the compilation; every later step reuses
        it. Hooks keep working (see `UNetModel.compile`). `sd.compile(backend=None)` undoes it."""
        self.unet.compile(**kwargs)
        return self

    @property
    def device(self):
        """Where the UNet (and so the sampler) runs."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        """The UNet's and text encoder's dtype (float32, float16 or bfloat16); the VAE is float32."""
        return next(self.unet.parameters()).dtype

    @property
    def latent_dtype(self):
        """The sampler's latents: float32 for a float32 / float16 / bfloat16 model (float64 for float64).
        The UNet casts its input to its own dtype and returns float32 (see UNetModel.forward)."""
        return torch.promote_types(self.dtype, torch.float32)

    @property
    def latent_factor(self):
        """Image side / latent side: 8 for SD, 4 for sdlens-tiny."""
        return 2 ** (len(self.vae.cfg.ch_mult) - 1)

    # ---- building blocks ----
    def tokenize(self, prompts: List[str], tokenizer=None) -> torch.Tensor:
        """Prompts -> [B, 77] CLIP token ids, padded; a prompt longer than 77 tokens is cut (with a warning).
        Word positions (P2P's) come from this, the first tokenizer, on SDXL too: both have the same vocabulary."""
        tok = tokenizer or self.tokenizer
        n = self.text_encoder.cfg.max_positions
        if tokenizer is None:  # warn once, not once per tokenizer
            for p in prompts:
                ids = tok(p).input_ids
                if len(ids) > n:
                    warnings.warn(f"prompt is {len(ids)} tokens, longer than {n}; truncated to: "
                                  f"{tok.decode(ids[1:n - 1])!r}")
        ids = tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: Union[str, List[str]], size=None) -> torch.Tensor:
        """A prompt or a list of them (any strings, "" for the unconditional one) -> [B, 77, D] text
        embeddings, the UNet's cross-attention context (D = 768 for SD 1.x, 1024 for SD 2.x).

        SDXL: [B, 78, 2048], CLIP-L's 768 ‖ bigG's 1280 per token, then the added-conditioning row
        (bigG's pooled vector and the time ids: original size, crop (0, 0), target size, as diffusers'
        defaults). `size` = (height, width) of the image, default `default_size` square."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.is_sdxl:
            return self.text_encoder(self.tokenize(prompts))
        tokens_l = self.text_encoder(self.tokenize(prompts))
        tokens_g, pooled = self.text_encoder_2.encode(self.tokenize(prompts, self.tokenizer_2))
        tokens = torch.cat([tokens_l, tokens_g.to(tokens_l.dtype)], dim=-1)
        return pack_added_cond(tokens, pooled.to(tokens.dtype), self.time_ids(len(prompts), size), self.unet.cfg)

    def image_size(self, latents: torch.Tensor):
        """(height, width) in pixels of the images that `latents` [..., h, w] decode to."""
        return latents.shape[-2] * self.latent_factor, latents.shape[-1] * self.latent_factor

    def time_ids(self, batch, size=None):
        """SDXL's size conditioning [B, 6]: original (h, w), crop (top, left) = (0, 0), target (h, w)."""
        h, w = (self.default_size,) * 2 if size is None else size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(batch, 6)

    @torch.no_grad()
    def encode_negative(self, negative_prompt, batch: int, size=None) -> torch.Tensor:
        """The unconditional context for `batch` rows: None means "" (SD 1/2), or zeros where the model
        says `force_zeros_for_empty_prompt` (SDXL: zero tokens and pooled vector, the time ids kept,
        as diffusers and sgm do). An explicit "" is always encoded."""
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            cfg = self.unet.cfg
            tokens = torch.zeros(batch, self.text_encoder.cfg.max_positions, cfg.context_dim, device=self.device,
                                 dtype=self.dtype)
            return pack_added_cond(tokens, tokens.new_zeros(batch, cfg.pooled_dim), self.time_ids(batch, size), cfg)
        neg = "" if negative_prompt is None else negative_prompt
        neg = [neg] * batch if isinstance(neg, str) else _strings(neg, "negative_prompt")
        if len(neg) != batch:
            raise ValueError(f"{len(neg)} negative prompts for {batch} prompts; give one, or one per prompt")
        return self.encode_prompt(neg, size)

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """PIL image(s) or a [B,3,H,W] tensor in [0,1] -> diffusion-space latents [B, 4, H/f, W/f]
        (posterior mean x scaling factor; f = `latent_factor`, 8 for SD, 4 for sdlens-tiny). H and W
        must be multiples of f; far from `default_size` a warning says so (`load_image(path, sd=sd)`).
        A tensor with NaN or inf, or of another shape, is refused (ValueError naming `image`)."""
        x = to_tensor(image).to(self.device, torch.float32)
        f = self.latent_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {f}; crop or resize it")
        self.warn_size(*x.shape[-2:])
        mean, _ = self.vae.encode(2 * x - 1)
        return mean * self.vae.cfg.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents [B, 4, h, w] -> images [B,3,h f,w f] in [0,1]. The VAE always runs in float32,
        because its decoder overflows fp16 on some inputs (NaN images)."""
        x = self.vae.decode(z.to(torch.float32) / self.vae.cfg.scaling_factor)
        return (x / 2 + 0.5).clamp(0, 1)

    def warn_size(self, height, width, stacklevel=4):  # 4: the caller of a @no_grad method
        """Warn when an image side is outside [default_size / 2, 2 default_size]: a UNet trained at one
        size gives poor images far from it (SD 1.5 at 1024 repeats objects), and time grows as H x W."""
        s = self.default_size
        if not all(s / 2 <= n <= 2 * s for n in (height, width)):
            warnings.warn(f"{height}x{width} images are far from this model's {s}x{s} (sd.default_size): expect poor "
                          f"images and about {height * width / s ** 2:.2g}x the time per step; "
                          f"load_image(path, sd=sd) resizes to it", stacklevel=stacklevel)

    def check_size(self, height, width):
        """(height, width), None meaning `default_size`; ValueError unless positive multiples of 8."""
        height = self.default_size if height is None else height  # 0 is an error, not "the default"
        width = self.default_size if width is None else width
        if not (_is_int(height) and _is_int(width)):
            raise TypeError(f"height and width must be integers, got {height!r} and {width!r}")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
        return height, width

    def denoiser(self, context: torch.Tensor, guidance_scale: float, num_steps: int, rows: Optional[dict] = None):
        """A `denoise(x, t, step)` for the sampler: one UNet call with classifier-free guidance.

        `context` holds the unconditional rows first, then the conditional ones (Ho & Salimans
        2022: eps = eps_u + w (eps_c - eps_u)). It sets the hook context before each call: the
        sampler's step is the only place the step is known.
        """
        n = context.shape[0] // 2 if uses_guidance(guidance_scale) else 0
        rows = rows or ({"uncond": list(range(n)), "cond": list(range(n, 2 * n))} if n else
                        {"cond": list(range(context.shape[0]))})

        def denoise(x, t, step):
            with self.unet.step_context(StepContext(step=step, t=int(t), num_steps=num_steps, rows=rows)):
                if not n:
                    return self.unet(x, t, context)
                return classifier_free_guidance(*self.unet(torch.cat([x, x]), t, context).chunk(2), guidance_scale)
        return denoise

    # ---- generation ----
    @torch.no_grad()
    def generate(self, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, eta=0.0, seed=None,
                 latents=None, height=None, width=None, output="pil", progress=True, sampler="ddim",
                 denoiser=None, prepare=None):
        """Text to images with DDIM (or Euler ancestral) and classifier-free guidance.

        prompt: a string or a list of B strings. negative_prompt: None ("", or zeros on SDXL), a
        string, or B strings. steps: 1 to 999; None is the model's `defaults` (50; 1 for the turbo
        models). guidance_scale: w, any number; 0 and 1 turn guidance off (one UNet pass); None is the
        model's default (SD's usual 7.5; 0 for turbo). eta: 0 (deterministic DDIM) to 1 (DDPM-like noise).
        sampler: "ddim", or "euler_ancestral" (the turbo models' own, equal to diffusers' given the
        same generator; eta does not apply).
        seed: an int for reproducible noise, None for fresh noise, or a list of B ints: row i then starts
        from the noise that `generate(prompt[i], seed=seed[i])` draws, so prompts sampled one call per seed
        run as one batch (about 3x faster per image on sdlens-tiny on a CPU; the images equal the one-call
        ones up to the rounding of batched kernels; DDIM with eta 0 only, as the other samplers draw
        noise at every step). latents: the starting noise
        instead, [B, 4, height/f, width/f] with f = `latent_factor` (8 for SD, 4 for sdlens-tiny:
        [B, 4, 16, 16] at its 64x64). height, width: multiples of 8, default `default_size`; far from
        it a warning says so. output: "pil" (a list of B PIL images) or "tensor" ([B,3,H,W] in [0,1],
        on the CPU). progress: a tqdm bar on stderr.
        For methods built on generate (editing/pag.py, attend_excite.py): `denoiser(context,
        guidance_scale, steps)` makes the `denoise(x, t, step)` in place of `self.denoiser` (context: the
        unconditional rows then the conditional ones, or only those without guidance); `prepare(step, t,
        x)` may replace x before each model call (DDIM only)."""
        prompts = _strings(prompt, "prompt")
        steps = self.defaults.get("steps", 50) if steps is None else steps
        guidance_scale = self.defaults.get("guidance_scale", 7.5) if guidance_scale is None else guidance_scale
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', not {output!r}")
        height, width = self.check_size(height, width)
        self.warn_size(height, width)
        whole("steps", steps, 1)
        for name, v in (("guidance_scale", guidance_scale), ("eta", eta)):
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, not {v!r}")
        check_eta(eta)
        seeds = seed if isinstance(seed, (list, tuple)) else None
        if seeds is not None:
            if not all(_is_int(s) for s in seeds):
                raise TypeError(f"seed as a list must hold integers, one per prompt, not {seed!r}")
            if len(seeds) != len(prompts):
                raise ValueError(f"seed as a list must hold one integer per prompt ({len(prompts)}), got {len(seeds)}")
            if sampler != "ddim" or eta != 0 or latents is not None:
                raise ValueError("seed as a list fixes each row's starting noise: it needs sampler='ddim' with eta=0 "
                                 "(the others draw noise at every step) and no latents=")
        elif seed is not None and not _is_int(seed):
            raise TypeError(f"seed must be an integer, a list of integers (one per prompt) or None, not {seed!r}")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, not {kind(latents)}")
        b = len(prompts)
        uncond = self.encode_negative(negative_prompt, b, (height, width))  # checks it even without guidance
        cond = self.encode_prompt(prompts, (height, width))
        context = torch.cat([uncond, cond]) if uses_guidance(guidance_scale) else cond
        generator = torch.Generator().manual_seed(seed) if seed is not None and seeds is None else None
        f = self.latent_factor
        shape = (b, self.unet.cfg.in_channels, height // f, width // f)
        if seeds is not None:
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])
        elif latents is None:
            latents = torch.randn(shape, generator=generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        else:
            finite_tensor("latents", latents)  # NaN noise samples a flat image without complaint
        x = latents.to(self.device, self.latent_dtype)
        denoise = (denoiser or self.denoiser)(context, guidance_scale, steps)
        if sampler == "ddim":
            x = sample(denoise, x, self.scheduler, steps, eta, generator, progress=progress, prepare=prepare)
        elif prepare is not None:
            raise ValueError(f"sampler {sampler!r} takes no prepare=; use sampler='ddim'")
        else:
            x = sample_euler_ancestral(denoise, x, self.scheduler, steps, generator, progress=progress)
        images = self.decode_latents(x)
        return images.cpu() if output == "tensor" else to_pil(images)


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _strings(x, name):
    """A string or a non-empty list of strings -> a list; else an error naming the argument."""
    xs = [x] if isinstance(x, str) else x
    if not isinstance(xs, (list, tuple)) or not all(isinstance(p, str) for p in xs):
        raise TypeError(f"{name} must be a string or a list of strings, not {kind(x)}")
    if not xs:
        raise ValueError(f"{name} is an empty list; give a string or at least one")
    return list(xs)


def to_tensor(image, batch=None) -> torch.Tensor:
    """PIL image / list of them / [B,3,H,W] or [3,H,W] tensor in [0,1] -> [B,3,H,W] float. `batch`: the B
    required (None: any). A tensor of another shape, not floating point, or with NaN or inf is refused,
    naming `image`, here where it enters rather than as an error from inside the VAE's convolutions."""
    expected = f"[{'B' if batch is None else batch}, 3, H, W] (or [3, H, W])"
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        tensor_shape("image", x, (batch, 3, None, None), expected)
        if not x.is_floating_point():
            raise TypeError(f"image must be a floating-point tensor in [0, 1], not {x.dtype} (e.g. x.float() / 255)")
        return finite_tensor("image", x)
    images = image if isinstance(image, (list, tuple)) else [image]
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise TypeError(f"image must be a PIL image, a list of them or a [B,3,H,W] tensor, not {kind(image)}")
    if batch is not None and len(images) != batch:
        raise ValueError(f"image must be {batch} PIL image(s), got {len(images)}")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    # contiguous: a channels-last view sends CPU convolutions down a less accurate path
    # (2.4e-5 vs 1.4e-6 against float64 on the VAE encoder)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """[B,3,H,W] in [0,1] (any float dtype, any device) -> B PIL RGB images."""
    arr = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
