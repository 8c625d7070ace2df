"""Per-word cross-attention in one call: `attention_maps(sd, prompt, seed=0) -> {word: [res, res]}`.

Built on `AttentionStore` (the public hook API): while the prompt is sampled it records the
conditional rows' cross-attention probabilities, and the maps are averaged over steps, heads and
every layer whose map is res x res (the official `aggregate_attention`). By default the maps are those
that localise objects (`object_map_size`): 16 x 16 for SD at 512 x 512 (the notebooks'), 32 x 32 for
SDXL at 1024 x 1024 (RoyiRa's attn_res), 8 x 8 on sdlens-tiny.
"""
from typing import Dict

import torch

from ..checks import whole
from .attention_store import AttentionStore, object_map_size
from .words import word_tokens

PUNCTUATION = ".,!?;:"


class WordMaps(dict):
    """{word: [res, res] map} in prompt order, plus the sampled `image` (PIL) and the `prompt`."""
    image = None
    prompt = ""


def word_columns(tokenizer, prompt: str, length=77) -> Dict[str, list]:
    """{word: its token positions}: a word is matched ignoring case and surrounding punctuation (as
    `words.word_positions`), so a repeated word gathers the tokens of all its occurrences, and a
    punctuation token is left out of a word that has others."""
    groups: Dict[str, list] = {}
    ids = tokenizer(prompt).input_ids
    for word, span in zip(prompt.split(), word_tokens(tokenizer, prompt)):
        # "circle." is two tokens; the map of "circle" leaves out the period's own column
        span = [p for p in span if p >= len(ids) or tokenizer.decode([ids[p]]).strip(PUNCTUATION)] or span
        key = word.strip(PUNCTUATION) or word
        key = next((k for k in groups if k.lower() == key.lower()), key)
        if max(span) >= length - 1:  # the last position is <|endoftext|> after truncation
            raise ValueError(f"prompt: the word {word!r} is past token {length - 1}, where the text encoder "
                             "truncates the prompt; shorten the prompt")
        groups.setdefault(key, []).extend(span)
    return groups


def word_maps(maps: torch.Tensor, tokenizer, prompt: str) -> WordMaps:
    """[h, w, 77] token maps of one prompt (e.g. `AttentionStore.aggregate(...)[row]`) -> {word: [h, w]},
    the mean over each word's tokens."""
    out = WordMaps((word, maps[..., cols].float().mean(-1).cpu()) for word, cols in word_columns(tokenizer, prompt).items())
    out.prompt = prompt
    return out


@torch.no_grad()
def attention_maps(sd, prompt: str, seed=None, res=None, steps=50, guidance_scale=7.5, height=None,
                   width=None) -> WordMaps:
    """Sample `prompt` and return {word: [res, res] float map}: the cross-attention probability that
    each latent position gives the word, averaged over sampling steps, heads and the layers of that
    resolution, conditional rows only. A word of several tokens gets the *mean* of its tokens'
    maps (a sum would differ by a constant factor per word; the mean keeps every map a probability
    in [0, 1], comparable across words). The result also has `.image` and `.prompt`.

    `res`: the maps' side; None: the model's maps that localise objects (`object_map_size`, the
    deepest level with cross-attention in its encoder and decoder): 16 on SD at 512 (the notebooks'),
    (ceil(H / 32), ceil(W / 32)) on SDXL (RoyiRa's attn_res; [h, w] for a non-square image), 8 on
    sdlens-tiny, whose 16 x 16 layers attend almost uniformly."""
    if not isinstance(prompt, str) or not prompt.split():
        raise ValueError(f"prompt must be a non-empty string, not {prompt!r}")
    if res is not None:
        whole("res", res, 1, hint=" (the side of the maps) or None", not_int=TypeError)
    word_columns(sd.tokenizer, prompt)  # a truncated prompt fails before sampling
    height, width = sd.check_size(height, width)
    hw = (height // sd.latent_factor, width // sd.latent_factor)
    size = object_map_size(sd, hw) if res is None else (res, res)
    store = AttentionStore(sd.unet, hw, max_size=size, self_attn=False)
    if size not in store.sizes.values():
        sides = sorted({h for h, w in AttentionStore(sd.unet, hw, max_size=10 ** 6, self_attn=False).sizes.values()
                        if h == w})
        raise ValueError(f"res={res}: this model has no {size[0]}x{size[1]} cross-attention at {height}x{width}; "
                         f"use one of {sides}")
    with sd.unet.hooks(store.hooks()):
        image = sd.generate(prompt, steps=steps, guidance_scale=guidance_scale, seed=seed, height=height,
                            width=width, progress=False)[0]
    out = word_maps(store.aggregate(size)[0], sd.tokenizer, prompt)
    out.image = image
    return out
