"""Prompt-to-Prompt on a small random SDXL (tests/conftest.py, 64x64 images: 8x8 latents, attention at
4x4 and 2x2). SDXL follows RoyiRa/prompt-to-prompt-with-sdxl: the maps that the store keeps, that
self-attention replacement edits and that local blend reads are its attn_res, ceil(image / 32):
2x2 here, 32x32 at 1024^2. SD keeps the official 16x16 (tests/test_p2p.py and shared/oracles/p2p)."""
from types import SimpleNamespace

import pytest
import torch

import sdlens
from sdlens.editing import LocalBlend, PromptToPrompt
from sdlens.editing.attention_maps import attention_maps
from sdlens.editing.attention_store import default_map_size
from sdlens.editing.patch import hooks

SRC, TGT = "a cat riding a bicycle", "a dog riding a bicycle"
KW = dict(seed=0, guidance_scale=7.5, progress=False)
STEPS = 4


@pytest.fixture(scope="module")
def sd(sdxl_fixture):
    return sdlens.load(sdxl_fixture["folder"])


def plain(sd, prompt, **kw):
    return sd.generate(prompt, steps=STEPS, output="tensor", **{**KW, **kw})[0]


def attention_probs(sd):
    return [n for kind in ("cross_attention", "self_attention") for n in sd.unet.hook_names(kind=kind, point="probs")]


def test_default_map_size_is_the_official_16_or_royiras_attn_res():
    sd1, xl = SimpleNamespace(is_sdxl=False), SimpleNamespace(is_sdxl=True)
    assert default_map_size(sd1, (512, 512)) == default_map_size(sd1, (1024, 768)) == (16, 16)  # absolute, as official
    assert default_map_size(xl, (1024, 1024)) == (32, 32)  # RoyiRa run.py's size: its 32**2 store limit
    assert default_map_size(xl, (512, 512)) == (16, 16)
    assert default_map_size(xl, (1024, 768)) == (32, 24)  # (h, w): the deepest level of a 128x96 latent
    assert default_map_size(xl, (64, 64)) == (2, 2)


@pytest.mark.parametrize("mode, target, blend, extra", [
    ("replace", TGT, [["cat"], ["dog"]], {}),
    ("refine", "a black cat riding a bicycle", [["cat"], ["black", "cat"]], {}),
    ("reweight", SRC, [["cat"], ["cat"]], dict(equalize={"cat": 2.0})),
], ids=["replace", "refine", "reweight"])
def test_source_row_is_a_plain_generate(sd, mode, target, blend, extra):
    """The edit and the blend touch only target rows: the source is the prompt sampled alone."""
    e = PromptToPrompt(sd, SRC, [target], mode=mode, steps=STEPS, blend=LocalBlend(blend, start_blend=0.0), **extra)
    r = e.run(**KW)
    assert r.mask is not None
    torch.testing.assert_close(r.images[0], plain(sd, SRC), atol=1e-4, rtol=0)  # explicit vs SDPA attention only
    assert (r.images[1] - r.images[0]).abs().max() > 1e-3


def test_edit_injects_maps_and_store_keeps_the_deepest_level(sd):
    none = PromptToPrompt(sd, SRC, [TGT], cross_replace_steps=0.0, self_replace_steps=0.0, steps=STEPS).run(**KW)
    cross = PromptToPrompt(sd, SRC, [TGT], self_replace_steps=0.0, steps=STEPS).run(**KW)
    both = PromptToPrompt(sd, SRC, [TGT], steps=STEPS).run(**KW)
    target = plain(sd, TGT)
    torch.testing.assert_close(none.images[1], target, atol=1e-4, rtol=0)  # nothing injected: the target alone
    assert (cross.images[1] - target).abs().max() > 1e-3  # the source's cross-attention changed the target
    assert (both.latents[1] - cross.latents[1]).abs().max() > 1e-3  # and so did its self-attention

    # Which points: by hook_info, not by name. The deepest level (1/32 of the image: 2x2 at 64x64) in
    # every place, each transformer block, both kinds; nothing of the 4x4 level.
    info = sd.unet.hook_info
    deepest = max(info(n).level for n in attention_probs(sd))
    expect = {n for n in attention_probs(sd) if info(n).level == deepest}
    assert default_map_size(sd, (64, 64)) == (2, 2)
    assert set(both.store.sizes) == expect and set(both.store.sums) == expect
    assert all(both.store.counts[n].item() == STEPS for n in expect)  # each recorded once per step
    assert set(both.store.sizes.values()) == {(2, 2)}
    assert {info(n).place for n in expect} == {"down", "mid", "up"}
    assert {info(n).transformer_block for n in expect} == {0, 1, 2}  # this model's 3-deep transformers
    assert all(both.store.sums[n].shape[:2] == (2, 4) for n in expect)  # the 2 cond rows, 2x2 queries
    assert both.store.aggregate((2, 2)).shape == (2, 2, 2, 77)  # 77 token keys: the added row is not a key
    # self-attention replacement: the same level (RoyiRa: queries <= attn_res^2)
    e = PromptToPrompt(sd, SRC, [TGT], steps=STEPS)
    edited_self = {n for n in hooks(sd, e.patches((8, 8))) if info(n).kind == "self_attention"}
    assert edited_self == {n for n in expect if info(n).kind == "self_attention"}


def test_local_blend_mask_follows_the_words_maps(sd):
    """As tests/test_p2p.py on SD: a hook seen by the store makes the word's cross-attention the left
    half, so the mask must be too. At 128x128 the maps are 4x4 (ceil(128 / 32)); the 3x3 max-pool
    widens the left 2 columns to 3, i.e. 12 of the 16 latent columns."""
    def left_half(p, hook):
        side = int(p.shape[2] ** 0.5)
        q = torch.arange(p.shape[2], device=p.device) % side < side // 2
        p = p.clone()
        p[..., 2] = q.to(p.dtype)  # token 2 is "cat" in the source and "dog" in the target
        return p

    e = PromptToPrompt(sd, SRC, [TGT], steps=STEPS, blend=LocalBlend([["cat"], ["dog"]], start_blend=0.0))
    cross = {n for n in sd.unet.hook_names(kind="cross_attention", point="probs")}
    with sd.unet.hooks({lambda n: n in cross: left_half}):
        r = e.run(seed=0, height=128, width=128, progress=False)
    assert set(r.store.sizes.values()) == {(4, 4)}
    inside = r.mask[0, 0]
    assert r.mask.shape == (1, 1, 16, 16)  # the latent's size
    assert inside[:, :12].all() and not inside[:, 12:].any()
    assert torch.equal(r.latents[1][:, ~inside], r.latents[0][:, ~inside])
    assert (r.latents[1][:, inside] - r.latents[0][:, inside]).abs().max() > 1e-3


def test_local_blend_on_a_non_square_image(sd):
    """SD refuses it (the official 16x16 maps); SDXL's attn_res follows the image: 2x4 maps at 64x128."""
    e = PromptToPrompt(sd, SRC, [TGT, "a cow riding a bicycle"], steps=STEPS,
                       blend=LocalBlend([["cat"], ["dog"], ["cow"]], start_blend=0.0))
    r = e.run(seed=0, height=64, width=128, progress=False)
    assert set(r.store.sizes.values()) == {(2, 4)}
    assert r.mask.shape == (2, 1, 8, 16) and r.mask.dtype == torch.bool
    torch.testing.assert_close(r.images[0], plain(sd, SRC, height=64, width=128), atol=1e-4, rtol=0)


def test_low_memory_equals_one_batch(sdxl_fixture):
    """Two passes of n rows = one of 2n. In float64, so the check does not depend on the kernels:
    in float32 they differ in the last bits (batch 4 vs 2 GEMMs), 5e-5 on latents of size 13 here."""
    sd = sdlens.load(sdxl_fixture["folder"], dtype=torch.float64)
    e = PromptToPrompt(sd, SRC, [TGT], steps=STEPS, blend=LocalBlend([["cat"], ["dog"]], start_blend=0.0))
    a, b = e.run(**KW), e.run(low_memory=True, **KW)
    assert a.latents.dtype == torch.float64
    torch.testing.assert_close(b.latents, a.latents, atol=1e-9, rtol=0)
    torch.testing.assert_close(b.images, a.images, atol=1e-5, rtol=0)
    assert torch.equal(b.mask, a.mask)
    for n in a.store.sums:
        assert a.store.counts[n].item() == b.store.counts[n].item() == STEPS and a.store.sums[n].abs().sum() > 0
        torch.testing.assert_close(b.store.sums[n], a.store.sums[n], atol=1e-9, rtol=0)


def test_attention_maps_default_to_attn_res(sd):
    maps = attention_maps(sd, "a cat riding a bicycle", seed=0, steps=2)
    assert list(maps) == ["a", "cat", "riding", "bicycle"] and maps["cat"].shape == (2, 2)
    assert attention_maps(sd, "a cat", seed=0, steps=2, res=4)["cat"].shape == (4, 4)  # an explicit res still wins
