"""Prompt-to-Prompt: exact behaviours on a small random SD 1 model, alignment by hand."""
import pytest
import torch

import sdlens
from sdlens.editing import LocalBlend, PromptToPrompt
from sdlens.editing.patch import Patch
from sdlens.editing.words import global_align, refine_mapper, replace_mapper, word_positions
from sdlens.weights.load import TOKENIZER_DIR, _tokenizer

KW = dict(seed=0, height=64, width=128)


@pytest.fixture(scope="module")
def sd(sd1_fixture):
    return sdlens.load(sd1_fixture["folder"])


def test_identical_prompts_with_full_injection_give_the_source(sd):
    e = PromptToPrompt(sd, "a cat riding a bicycle", ["a cat riding a bicycle"], cross_replace_steps=1.0,
                       self_replace_steps=1.0, steps=6)
    r = e.run(**KW)
    assert torch.equal(r.images[0], r.images[1])


def test_source_branch_is_never_altered(sd):
    a = PromptToPrompt(sd, "a cat riding a bicycle", ["a dog riding a bicycle"], self_replace_steps=1.0, steps=6).run(**KW)
    none = PromptToPrompt(sd, "a cat riding a bicycle", ["a dog riding a bicycle"], cross_replace_steps=0.0,
                          self_replace_steps=0.0, steps=6).run(**KW)
    assert torch.equal(a.latents[0], none.latents[0])  # same batch, edit on or off: the source is bitwise the same
    assert (a.latents[1] - none.latents[1]).abs().max() > 1e-3
    plain = sd.generate("a cat riding a bicycle", steps=6, output="tensor", progress=False, **KW)
    torch.testing.assert_close(a.images[0], plain[0], atol=1e-4, rtol=0)  # explicit vs SDPA attention only
    assert (a.images[1] - a.images[0]).abs().max() > 1e-3  # and the edit did change the target


def test_equalizer_scales_exactly_the_chosen_column(sd):
    name = "output_blocks.4.1.transformer_blocks.0.attn2.hook_probs"
    seen = []

    class Spy(PromptToPrompt):  # a last patch on one layer sees what the editor's patches made there
        def patches(self, hw):
            look = lambda src, dst, w: seen.append((src, dst)) or dst
            return super().patches(hw) + [Patch(at={"name": name}, op=look, read="source", write="target")]

    Spy(sd, "a cat riding a bicycle", ["a cat riding a bicycle"], mode="reweight", cross_replace_steps=1.0,
        equalize={"bicycle": 3.0, "cat": -0.5}, steps=4).run(**KW)
    assert len(seen) == 4
    cat = word_positions(sd.tokenizer, "a cat riding a bicycle", "cat")[0]
    bike = word_positions(sd.tokenizer, "a cat riding a bicycle", "bicycle")[0]
    for src, tgt in seen:
        src, tgt = src[0], tgt[0]
        expect = src.clone()
        expect[..., bike] *= 3.0
        expect[..., cat] *= -0.5
        assert torch.equal(tgt, expect)
        assert not torch.equal(tgt, src)


def test_alignment_hand_worked():
    """The official seq_aligner scores (gap 0, match 1, mismatch -1) and trace back (left, up, diagonal)."""
    assert global_align([1, 2, 3, 4], [1, 5, 2, 3, 4]) == [0, -1, 1, 2, 3]  # an insertion
    assert global_align([1, 2, 3], [1, 9, 3]) == [0, -1, 2]  # free gaps: a substitution is a gap in each
    assert global_align([1, 2, 3, 4], [1, 4]) == [0, 3]  # deletions
    # A repeated token: at (2, 3) left, up and the diagonal score 2, 1, 2; left wins the tie, so the
    # source's 2 takes the target's *first* 2 (a diagonal-first trace back takes the second).
    assert global_align([1, 2], [1, 2, 2]) == [0, 1, -1]
    tok = _tokenizer(TOKENIZER_DIR)
    mapper, alphas = refine_mapper(tok, "a cat riding a bicycle", "a black cat riding a bicycle")
    # <sot> a black cat riding a bicycle <eot> : 'black' is new, the rest shift by one
    assert mapper[:8].tolist() == [0, 1, 0, 2, 3, 4, 5, 6] and alphas[:8].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    # official get_mapper: every position past the target prompt maps to itself, alpha 1
    assert mapper[8:].tolist() == list(range(8, 77)) and alphas[8:].eq(1).all()


def test_replace_mapper_hand_worked():
    """Official get_replacement_mapper_: 'burger' (1 token) -> 'lasagne' (2 tokens) spreads evenly,
    and after the last swapped word every position maps to itself."""
    tok = _tokenizer(TOKENIZER_DIR)
    assert len(tok("a burger").input_ids) == 4 and len(tok("a lasagne").input_ids) == 5
    m = replace_mapper(tok, "a burger", "a lasagne")
    expect = torch.zeros(77, 77)
    expect[0, 0] = expect[1, 1] = 1
    expect[2, 2] = expect[2, 3] = 0.5
    for j in range(4, 77):
        expect[j, j] = 1
    assert torch.equal(m, expect)
    assert torch.equal(replace_mapper(tok, "a cat riding a bicycle", "a dog riding a bicycle"), torch.eye(77))
    with pytest.raises(ValueError, match="same number of words.*refine"):
        replace_mapper(tok, "a cat", "a black cat")


def test_cross_steps_have_n_plus_one_rows():
    """Official get_time_words_attention_alpha: N + 1 rows, int(f (N + 1)) replaced: 43 at f = 0.85, N = 50."""
    from sdlens.editing.p2p import cross_alphas
    tok = _tokenizer(TOKENIZER_DIR)
    a = cross_alphas(tok, ["a big blue circle"], 0.85, 50)
    assert a.shape == (51, 1, 77) and int(a[:50, 0, 0].sum()) == 43
    a = cross_alphas(tok, ["a big blue circle"], (0.2, 0.5), 10)  # rows int(.2 * 11) = 2 to int(.5 * 11) = 5
    assert a[:, 0, 0].tolist() == [0, 0, 1, 1, 1] + [0] * 6


def test_local_blend_keeps_the_source_outside_the_mask(sd):
    """Random weights attend almost uniformly, so a hook (attached first, seen by the store) makes
    the word's cross-attention cover the left half of the image; the blend mask must follow it."""
    def left_half(p, hook):
        side = int(p.shape[2] ** 0.5)
        q = torch.arange(p.shape[2], device=p.device) % side < side // 2
        p = p.clone()
        p[..., 2] = q.to(p.dtype)  # token 2 is "cat" in the source and "dog" in the target
        return p

    e = PromptToPrompt(sd, "a cat riding a bicycle", ["a dog riding a bicycle"], steps=6,
                       blend=LocalBlend([["cat"], ["dog"]], threshold=0.3, start_blend=0.0))
    with sd.unet.hooks({lambda n: n.endswith("attn2.hook_probs"): left_half}):
        r = e.run(seed=0, height=128, width=128)  # 16x16 cross-attention maps need 128 px in this model
    inside = r.mask[0, 0]
    assert inside[:, :5].all() and not inside[:, 10:].any()  # left half, dilated by the 3x3 max-pool
    assert torch.equal(r.latents[1][:, ~inside], r.latents[0][:, ~inside])
    assert (r.latents[1][:, inside] - r.latents[0][:, inside]).abs().max() > 1e-3


def test_clear_errors(sd):
    with pytest.raises(ValueError, match="same number of words.*refine"):
        PromptToPrompt(sd, "a cat riding a bicycle", ["a cat riding a red bicycle"])
    with pytest.raises(ValueError, match="word 'dog' is not in the prompt"):
        PromptToPrompt(sd, "a cat", ["a cow"], mode="reweight", equalize={"dog": 2.0})
    with pytest.raises(ValueError, match="mode"):
        PromptToPrompt(sd, "a cat", ["a cow"], mode="swap")


def test_per_word_cross_steps(sd):
    from sdlens.editing.p2p import cross_alphas
    a = cross_alphas(sd.tokenizer, ["a lion riding a bicycle"], {"default_": 0.8, "lion": 0.4}, 10)
    lion = word_positions(sd.tokenizer, "a lion riding a bicycle", "lion")[0]
    assert a[:, 0, lion].tolist() == [1] * 4 + [0] * 7  # int(.4 * 11) of 11 rows
    assert a[:, 0, lion + 1].tolist() == [1] * 8 + [0] * 3  # int(.8 * 11)


def test_store_records_the_edited_maps(sd):
    """Official AttentionStore keeps the tensor the edit then overwrites in place, so with every
    map replaced the target's stored cross-attention is the source's."""
    r = PromptToPrompt(sd, "a cat riding a bicycle", ["a dog riding a bicycle"], cross_replace_steps=1.0,
                       self_replace_steps=0.0, steps=3).run(**KW)
    for n in r.store.sums:
        assert r.store.counts[n].item() == 3 and r.store.sums[n].abs().sum() > 0, n  # recorded at every step
        if sd.unet.hook_info(n).kind == "cross_attention":
            assert torch.equal(r.store.sums[n][1], r.store.sums[n][0]), n


def test_substruct_mask_is_not_pooled():
    """Official get_mask(maps, substruct_layers, use_pool=False) with the second threshold."""
    maps = torch.zeros(1, 16, 16, 77)
    maps[0, 5, 5, 2] = 1.0
    lb = LocalBlend([["x"]], threshold=(0.3, 0.5))
    w = torch.zeros(1, 77)
    w[0, 2] = 1
    pooled = lb.mask(maps, w, (16, 16), 0.3)
    plain = lb.mask(maps, w, (16, 16), 0.5, pool=False)
    assert int(pooled.sum()) == 9 and int(plain.sum()) == 1 and plain[0, 0, 5, 5]


def test_blend_on_a_non_square_image_fails_before_sampling(sd):
    calls = []
    e = PromptToPrompt(sd, "a cat riding a bicycle", ["a dog riding a bicycle"], steps=3,
                       blend=LocalBlend([["cat"], ["dog"]]))
    with sd.unet.hooks({"hook_out": lambda x, h: calls.append(1)}):
        with pytest.raises(ValueError, match="16x16 cross-attention maps"):
            e.run(seed=0, height=128, width=192)
    assert calls == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(cross_replace_steps=-0.5), "cross_replace_steps"),
    (dict(cross_replace_steps=(0.6, 0.2)), "start <= end"),
    (dict(cross_replace_steps=float("nan")), "cross_replace_steps"),
    (dict(self_replace_steps=1.5), "self_replace_steps"),
    (dict(cross_replace_steps={"default_": 0.8, "horse": 0.3}), "'horse', which is in no target"),
    (dict(equalize={"dog": float("inf")}), "finite"),
    (dict(blend=LocalBlend([["cat"], ["dog"]], threshold=1.5)), "threshold"),
    (dict(blend=LocalBlend([["cat"]])), "one word list per prompt"),
])
def test_bad_arguments_are_named(sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptToPrompt(sd, "a cat riding a bicycle", ["a dog riding a bicycle"], **kwargs)


def test_word_past_the_token_limit(sd):
    long = "a " * 80 + "cat"
    with pytest.raises(ValueError, match="past token 76"):
        PromptToPrompt(sd, long, [long], mode="reweight", equalize={"cat": 2.0})
