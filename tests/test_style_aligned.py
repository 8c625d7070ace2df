"""StyleAligned: image for image against the official formulas on diffusers' pipelines (sdlens-tiny, the
random SD 1.5 topology, a small random SDXL), exact facts against plain runs, bad input, and the claim
on sdlens-tiny.

The reference is google/style-aligned @ 2faf0af, sa_handler.py. Its code stays out of the project, so
the suite's oracle is `OfficialFormulas` below: a diffusers attention processor written from
sa_handler.py's formulas (lines cited), attached with `pipe.unet.set_attn_processor`, as the official
`init_attention_processors` does. The tests marked `oracle` (deselected by default) run sa_handler.py
itself, from STYLE_ALIGNED_REF (a checkout) or else from the bare mirror this project's machines keep,
and check both ours and `OfficialFormulas` against it:

    STYLE_ALIGNED_REF=path/to/style-aligned python -m pytest -m oracle tests/test_style_aligned.py

Every comparison uses the same weights, the same initial latents (one draw per row, as the notebooks'
`randn((n, 4, h, w))`), DDIM as each model's scheduler config says, 4 steps and guidance 7.5.

Measured 2026-12-06 (CPU, one thread), max |image difference| in [0, 1]:
- ours vs OfficialFormulas, defaults: sdlens-tiny 4.5e-6, random SD 1.5 topology 1.9e-6, random SDXL 1.9e-6;
  options (random SD 1.5) 4.8e-6 / 1.7e-6 / 1.8e-6; without guidance (tiny, one half) 2.6e-6.
- oracle, sa_handler.py itself (SDXL notebook's settings / the options case): ours tiny 7.0e-6 / 6.6e-6,
  SD 1.5 1.8e-6 / 4.0e-6, SDXL 1.6e-6 / 3.0e-6; OfficialFormulas vs sa_handler.py 0 (bitwise) in all six.
"""
import copy
import importlib.util
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

import sdlens
from sdlens.editing.style_aligned import rows, shared_layers, style_aligned, switch_vector

PROMPTS = ["a big blue star on a black background", "a small circle on the left", "a square at the top"]
STEPS, GUIDANCE = 4, 7.5
REF = os.environ.get("STYLE_ALIGNED_REF", "")
MIRROR = "/work/.mirror/google+style-aligned/repo"
oracle = pytest.mark.oracle  # needs STYLE_ALIGNED_REF or the mirror


# ---- the official formulas, re-implemented here as the suite's oracle (sa_handler.py @ 2faf0af) ----

def expand_first(feat, halves=2, scale=1.0):
    """sa_handler.py:43-51: each row gets its half's first row (rows 0 and b // 2); with scale != 1 every
    copy but the reference's own is scaled. halves=1 (no guidance, one half) is our extension."""
    b = feat.shape[0]
    refs = [feat[i * b // halves] for i in range(halves)]
    out = torch.stack(refs)[:, None].repeat(1, b // halves, *[1] * (feat.ndim - 1))
    if scale != 1:
        out = torch.cat([out[:, :1], scale * out[:, 1:]], dim=1)
    return out.reshape(feat.shape)


def calc_mean_std(feat, eps=1e-5):
    """sa_handler.py:59-62: torch.var's default (unbiased) over the tokens, eps inside the sqrt."""
    return feat.mean(dim=-2, keepdim=True), (feat.var(dim=-2, keepdim=True) + eps).sqrt()


def adain(feat, halves):
    """sa_handler.py:65-71."""
    mean, std = calc_mean_std(feat)
    return (feat - mean) / std * expand_first(std, halves) + expand_first(mean, halves)


class OfficialFormulas:
    """SharedAttentionProcessor.shared_call (sa_handler.py:93-165) for diffusers' self-attention."""

    def __init__(self, adain_queries=True, adain_keys=True, adain_values=False, share_attention=True,
                 shared_score_scale=1.0, shared_score_shift=0.0, halves=2):
        self.aq, self.ak, self.av, self.share = adain_queries, adain_keys, adain_values, share_attention
        self.scale, self.shift, self.halves = shared_score_scale, shared_score_shift, halves

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b, n, _ = hidden_states.shape
        split = lambda t: t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)  # :120-128
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q = adain(q, self.halves) if self.aq else q  # :130-135
        k = adain(k, self.halves) if self.ak else k
        v = adain(v, self.halves) if self.av else v
        if self.share:  # concat_first, :54-56, :137-138: own keys, then the half's reference's
            k = torch.cat([k, expand_first(k, self.halves, self.scale)], dim=-2)
            v = torch.cat([v, expand_first(v, self.halves)], dim=-2)
        if self.share and self.shift != 0:  # :87-91
            logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale
            logits[:, :, :, q.shape[2]:] += self.shift
            out = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)  # :150-151
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor  # :154-164


def official_switch_vec(n, level):
    """_get_switch_vec, sa_handler.py:191-205 (True: the layer stays plain)."""
    if level in (0, 1):
        return torch.full((n,), bool(level))
    flip = level > .5
    level = 1 - level if flip else level
    vec = torch.arange(n) % (n // int(level * n)) == 0
    return ~vec if flip else vec


def attach_formulas(unet, only_self_level=0.0, **kw):
    """init_attention_processors, sa_handler.py:208-229: attn1 shared unless switched (index i // 2 over
    the processors in diffusers' order), every other attention the plain processor."""
    names = list(unet.attn_processors)
    plain = official_switch_vec(len([n for n in names if "attn1" in n]), only_self_level)
    unet.set_attn_processor({n: OfficialFormulas(**kw) if "attn1" in n and not plain[i // 2] else AttnProcessor2_0()
                             for i, n in enumerate(names)})


# ---- models ----

def with_own_unet(pipe):
    """The pipeline with a copy of its UNet (a fixture's pipeline is shared by other tests; the official
    registration changes processors and norm forwards)."""
    p = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def models(request, tiny, tiny_pipe):
    """(ours, diffusers pipeline with its own UNet, latent side) for "tiny", "sd1" or "sdxl"."""
    if request.param == "tiny":
        return tiny, with_own_unet(tiny_pipe), 16
    fx = request.getfixturevalue("sdxl_fixture" if request.param == "sdxl" else "sd1_fixture")
    # SD 1's middle block attends at 1/8 of the latent's side: 16 gives it 2x2 tokens (8 would give one token,
    # where the official unbiased variance is NaN: see test_one_token_map)
    return sdlens.load(fx["folder"]), with_own_unet(fx["pipe"]), 16 if request.param == "sd1" else 8


def latents(side, n=len(PROMPTS), seed=0):
    return torch.randn((n, 4, side, side), generator=torch.Generator().manual_seed(seed))


def theirs(pipe, lat, prompts=PROMPTS, guidance=GUIDANCE):
    f = pipe.vae_scale_factor
    return pipe(prompts, latents=lat, num_inference_steps=STEPS, guidance_scale=guidance, height=lat.shape[-1] * f,
                width=lat.shape[-1] * f, output_type="pt").images.float()


def ours(sd, lat, prompts=PROMPTS, guidance=GUIDANCE, **kw):
    return style_aligned(sd, prompts, latents=lat, steps=STEPS, guidance_scale=guidance, height=sd.image_size(lat)[0],
                         width=sd.image_size(lat)[1], output="tensor", progress=False, **kw)


def plain(sd, lat, prompts=PROMPTS, guidance=GUIDANCE):
    return sd.generate(prompts, latents=lat, steps=STEPS, guidance_scale=guidance, height=sd.image_size(lat)[0],
                       width=sd.image_size(lat)[1], output="tensor", progress=False)


def compare(sd, pipe, lat, label, guidance=GUIDANCE, **kw):
    """Our images and the formulas' on diffusers' pipeline -> max |difference| (printed)."""
    attach_formulas(pipe.unet, **{**kw, "halves": 2 if guidance not in (0, 1) else 1})
    try:
        ref = theirs(pipe, lat, guidance=guidance)
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    a = ours(sd, lat, guidance=guidance, **kw)
    diff = (a - ref).abs().max().item()
    print(f"{label}: max |ours - official formulas| = {diff:.2e}")
    return a, diff


# ---- against the official formulas ----

@pytest.mark.parametrize("models", ["tiny", "sd1", "sdxl"], indirect=True)
def test_matches_official_formulas(models):
    """Default options (StyleAlignedArgs with the SDXL notebook's norms off). The reference row is the
    plain run's; the others are not."""
    sd, pipe, side = models
    lat = latents(side)
    a, diff = compare(sd, pipe, lat, f"{sd.name} ({sd.family})")
    assert diff < 1e-4
    b = plain(sd, lat)
    assert (a[0] - b[0]).abs().max() < 1e-4 and (a[1:] - b[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("models", ["sd1"], indirect=True)
@pytest.mark.parametrize("options", [
    dict(adain_values=True, shared_score_scale=0.8, shared_score_shift=math.log(2)),  # log 2: the transfer notebook's
    dict(adain_queries=False, only_self_level=0.3),
    dict(only_self_level=0.8, share_attention=False),
], ids=["values-scale-shift", "level-0.3", "level-0.8-adain-only"])
def test_options_match_official_formulas(models, options):
    sd, pipe, side = models
    _, diff = compare(sd, pipe, latents(side, seed=1), str(options), **options)
    assert diff < 1e-4


@pytest.mark.parametrize("models", ["tiny"], indirect=True)
@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_without_guidance_one_half_with_row_0_as_reference(models, guidance):
    """The official code assumes guidance (references rows 0 and b // 2); with one pass of the conditional
    rows the one half's reference is row 0: the formulas with halves=1."""
    sd, pipe, side = models
    lat = latents(side, seed=2)
    a, diff = compare(sd, pipe, lat, f"w={guidance}", guidance=guidance)
    assert diff < 1e-4
    assert (a[0] - plain(sd, lat, guidance=guidance)[0]).abs().max() < 1e-4


def test_layers_follow_the_official_processor_order(tiny, tiny_pipe):
    """only_self_level's plain layers are counted in diffusers' processor order (down, up, mid): the same
    modules on both sides, told apart by their weights, for several levels; 0 is every self-attention layer."""
    names = [n for n in tiny_pipe.unet.attn_processors if "attn1" in n]
    layers = shared_layers(tiny)
    assert len(layers) == len(names) == 11
    ours_of = {}  # diffusers' processor name -> our module with the same weights
    for n in names:
        w = tiny_pipe.unet.get_submodule(n.rsplit(".", 1)[0]).to_q.weight
        ours_of[n], = [m for m in layers if torch.equal(tiny.unet.get_submodule(m).to_q.weight, w)]
    for level in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        plain_ = official_switch_vec(len(names), level)
        assert switch_vector(len(names), level) == plain_.tolist()
        assert set(shared_layers(tiny, level)) == {ours_of[n] for n, p in zip(names, plain_) if not p}


# ---- exact facts against plain runs ----

def test_everything_off_is_a_plain_batch(tiny):
    lat = latents(16)
    off = dict(adain_queries=False, adain_keys=False, share_attention=False)
    assert torch.equal(ours(tiny, lat, **off), plain(tiny, lat))
    assert torch.equal(ours(tiny, lat, only_self_level=1.0), plain(tiny, lat))


def test_one_prompt_is_a_plain_run_and_layer_norm_sharing_is_a_no_op(tiny):
    """A reference alone meets its own statistics and its own keys twice: a plain run up to rounding.
    share_layer_norm changes nothing (LayerNorm normalises each token alone)."""
    lat = latents(16, n=1)
    assert (ours(tiny, lat, prompts=PROMPTS[:1]) - plain(tiny, lat, prompts=PROMPTS[:1])).abs().max() < 1e-4
    lat = latents(16)
    assert torch.equal(ours(tiny, lat, share_layer_norm=True), ours(tiny, lat))


@pytest.mark.parametrize("models", ["sd1"], indirect=True)
def test_one_token_map(models):
    """At 8x8 latents SD 1's middle block attends over one token: the official unbiased variance is NaN
    there (and so are its images); ours uses the biased one (0) and gives finite images."""
    sd, _, _ = models
    one = torch.ones(1, 1, 1, 4)
    with pytest.warns(UserWarning, match="degrees of freedom"):
        assert calc_mean_std(one)[1].isnan().all()
    assert torch.isfinite(ours(sd, latents(8))).all()


def test_rows_name_each_half_and_its_reference():
    assert rows(3, True) == {"uncond": [0, 1, 2], "cond": [3, 4, 5], "uncond_ref": [0], "cond_ref": [3]}
    assert rows(3, False) == {"cond": [0, 1, 2], "cond_ref": [0]}


@pytest.mark.parametrize("kw, err, says", [
    (dict(prompts="a cat"), TypeError, "list of strings"),
    (dict(prompts=[]), TypeError, "list of strings"),
    (dict(adain_queries=1), TypeError, "adain_queries"),
    (dict(shared_score_scale="2"), TypeError, "shared_score_scale"),
    (dict(shared_score_shift=float("nan")), ValueError, "shared_score_shift"),
    (dict(only_self_level=1.5), ValueError, "only_self_level"),
    (dict(share_group_norm=True), ValueError, "share_group_norm"),
    (dict(denoiser=lambda *a: None), TypeError, "denoiser"),
    (dict(steps=0), ValueError, "steps"),
])
def test_bad_arguments(tiny, kw, err, says):
    kw = {"prompts": PROMPTS, **kw}
    with pytest.raises(err, match=says):
        style_aligned(tiny, kw.pop("prompts"), progress=False, **kw)
    assert not any(hp.fns for hp in tiny.unet._hook_points.values())  # nothing left attached


# ---- the official code itself (marked oracle) ----

@pytest.fixture(scope="module")
def sa_handler(tmp_path_factory):
    """sa_handler.py from STYLE_ALIGNED_REF, else from the mirror's HEAD (git show), imported from a temp dir."""
    if REF:
        path = os.path.join(REF, "sa_handler.py")
        if not os.path.isfile(path):
            pytest.fail(f"STYLE_ALIGNED_REF={REF!r} has no sa_handler.py")
    elif os.path.isdir(MIRROR):
        path = str(tmp_path_factory.mktemp("style_aligned") / "sa_handler.py")
        with open(path, "wb") as f:
            f.write(subprocess.run(["git", "-C", MIRROR, "show", "HEAD:sa_handler.py"], check=True,
                                   capture_output=True).stdout)
    else:
        pytest.skip("no official code: set STYLE_ALIGNED_REF to a checkout of google/style-aligned")
    spec = importlib.util.spec_from_file_location("sa_handler_official", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass (with `from __future__ import annotations`) looks itself up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@oracle
@pytest.mark.parametrize("models", ["tiny", "sd1", "sdxl"], indirect=True)
@pytest.mark.parametrize("options", [
    dict(share_group_norm=False, share_layer_norm=False),  # the SDXL notebook
    dict(share_group_norm=False, share_layer_norm=True, shared_score_shift=math.log(2), adain_values=True,
         shared_score_scale=0.8, only_self_level=0.3),
], ids=["notebook", "options"])
def test_matches_official_code(sa_handler, models, options):
    """sa_handler.Handler on diffusers' pipeline vs ours, and vs the suite's OfficialFormulas."""
    sd, pipe, side = models
    lat = latents(side, seed=3)
    handler = sa_handler.Handler(pipe)
    handler.register(sa_handler.StyleAlignedArgs(**options))
    try:
        official = theirs(pipe, lat)
    finally:
        handler.remove()
    kw = {k: v for k, v in options.items() if k != "share_group_norm"}
    a = ours(sd, lat, **kw)
    formulas_kw = {k: v for k, v in kw.items() if k not in ("share_layer_norm", "only_self_level")}
    attach_formulas(pipe.unet, only_self_level=kw.get("only_self_level", 0.0), **formulas_kw)
    try:
        formulas = theirs(pipe, lat)
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    d_ours, d_formulas = (a - official).abs().max().item(), (formulas - official).abs().max().item()
    print(f"{sd.name} ({sd.family}) {options}: max |ours - official| = {d_ours:.2e}, "
          f"|formulas - official| = {d_formulas:.2e}")
    assert d_ours < 1e-4 and d_formulas < 1e-5


# ---- the claim on sdlens-tiny ----
# Criterion fixed before the decisive run (see test_claim_colour_statistics_follow_the_reference).
CLAIM_SEEDS, CLAIM_STEPS, CLAIM_PROMPTS = range(5), 20, 4


def claim_prompts(seed):
    """A reference that names its colour and background, then prompts that name only a shape and a place."""
    from sdlens.tiny.scenes import BACKGROUNDS, COLORS, POSITION_PHRASE, SHAPES
    rng = random.Random(seed)
    art = lambda w: ("an " if w[0] in "aeiou" else "a ") + w
    pos = list(POSITION_PHRASE)
    ref = art(f"big {rng.choice(list(COLORS))} {rng.choice(SHAPES)} {POSITION_PHRASE[rng.choice(pos)]} on a "
              f"{rng.choice(list(BACKGROUNDS))} background")
    return [ref] + [art(f"{rng.choice(['big', 'small'])} {rng.choice(SHAPES)} {POSITION_PHRASE[rng.choice(pos)]}")
                    for _ in range(CLAIM_PROMPTS - 1)]


def colour_stats(images):
    """[B, 3, H, W] -> [B, 6]: each channel's mean and std over the pixels."""
    x = images.flatten(2)
    return torch.cat([x.mean(-1), x.std(-1)], dim=1)


@pytest.fixture(scope="module")
def claim_runs(tiny):
    """Per non-reference image: (distance of its colour statistics to the reference's, StyleAligned;
    the same for the plain batch from the same noise)."""
    out = []
    for seed in CLAIM_SEEDS:
        prompts, lat = claim_prompts(seed), latents(16, n=CLAIM_PROMPTS, seed=seed)
        kw = dict(latents=lat, steps=CLAIM_STEPS, output="tensor", progress=False)
        for imgs in (style_aligned(tiny, prompts, **kw), tiny.generate(prompts, **kw)):
            s = colour_stats(imgs)
            out.append((s[1:] - s[:1]).norm(dim=1))
    sa, pl = torch.cat(out[0::2]), torch.cat(out[1::2])
    return sa, pl


@pytest.mark.xfail(strict=True, reason="measured false on sdlens-tiny: StyleAligned closer for 7/15 images (8 needed), "
                   "though its mean distance is smaller (0.315 vs plain 0.451)")
def test_claim_colour_statistics_follow_the_reference(claim_runs):
    """StyleAligned's images share the reference's colour statistics more than a plain batch does.

    Criterion (fixed before the decisive run): 5 prompt sets (seeds 0-4, `claim_prompts`: a reference
    naming its colour and background, 3 prompts naming only a shape, a size and a place), each sampled
    from the same noise (one draw per row) with StyleAligned (defaults) and as a plain batch, 20 steps,
    the model's default guidance. An image's colour statistics are its RGB channels' means and stds in
    [0, 1] (6 numbers); for each of the 15 non-reference images, d = the Euclidean distance of its
    statistics to its reference's. The claim holds if StyleAligned's mean d is smaller than the plain
    batch's AND StyleAligned's d is smaller for a majority (>= 8 of 15) of the images.

    Decisive run (2026-12-06, on b41dd95 with this file and editing/style_aligned.py, one thread): FALSE.
    Mean d 0.315 (StyleAligned) vs 0.451 (plain), but StyleAligned closer for 7 of 15 images. It pulls
    the outliers in (plain d -> StyleAligned d: 1.070 -> 0.161, 1.017 -> 0.182, 0.611 -> 0.114; one large
    move the other way, 0.144 -> 0.406), and the images already near the reference's statistics move a
    little either way (of the 8 images where the plain batch is closer, the closest call is 0.006 apart,
    far above the images' rounding).
    strict: a change that makes it hold must remove this mark."""
    sa, pl = claim_runs
    closer = int((sa < pl).sum())
    print(f"mean distance to the reference's colour statistics: StyleAligned {sa.mean():.4f}, plain {pl.mean():.4f}; "
          f"StyleAligned closer for {closer}/{len(sa)}; SA {[round(x, 3) for x in sa.tolist()]}, "
          f"plain {[round(x, 3) for x in pl.tolist()]}")
    assert sa.mean() < pl.mean() and closer >= len(sa) // 2 + 1
