"""Words -> token positions, and the token alignment that Prompt-to-Prompt's refine mode needs.

Positions count the <|startoftext|> token as 0, as the text encoder sees them.
"""
from typing import List

import torch


def word_tokens(tokenizer, prompt: str) -> List[List[int]]:
    """Token positions of each space-separated word of `prompt` (a word may be several tokens)."""
    out, pos = [], 1
    for word in prompt.split():
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        out.append(list(range(pos, pos + n)))
        pos += n
    return out


def word_positions(tokenizer, prompt: str, word: str) -> List[int]:
    """All token positions of `word` (or of a word index, given as an int) in `prompt`."""
    words = prompt.split()
    spans = word_tokens(tokenizer, prompt)
    if isinstance(word, int):
        if not 0 <= word < len(words):
            raise ValueError(f"word index {word} is outside the prompt {prompt!r}")
        return spans[word]
    hits = [p for w, span in zip(words, spans) if w.strip(".,!?;:").lower() == word.lower() for p in span]
    if not hits:
        raise ValueError(f"word {word!r} is not in the prompt {prompt!r}")
    return hits


def token_ids(tokenizer, prompt: str) -> List[int]:
    return tokenizer(prompt).input_ids  # with <|startoftext|> and <|endoftext|>, no padding


def global_align(a: List[int], b: List[int], match=1, mismatch=-1, gap=-1):
    """Needleman-Wunsch global alignment of two token sequences (the scores of the P2P paper's code).

    Returns `mapper`: for each position of `b`, the aligned position in `a`, or -1 where `b` has
    a token that `a` lacks (an insertion).
    """
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, m + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (match if a[i - 1] == b[j - 1] else mismatch)
            score[i][j] = max(diag, score[i - 1][j] + gap, score[i][j - 1] + gap)
    mapper = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:  # trace back, preferring the diagonal
        if score[i][j] == score[i - 1][j - 1] + (match if a[i - 1] == b[j - 1] else mismatch):
            if a[i - 1] == b[j - 1]:
                mapper[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i][j - 1] + gap:
            j -= 1
        else:
            i -= 1
    return mapper


def refine_mapper(tokenizer, source: str, target: str, length: int = 77):
    """(mapper [length] long, alphas [length] float): target position k takes source position
    mapper[k] where alphas[k] is 1; new words (alphas 0) keep their own attention. Padding maps
    onto padding, as in the official code."""
    a, b = token_ids(tokenizer, source), token_ids(tokenizer, target)
    if max(len(a), len(b)) > length:
        raise ValueError(f"prompts are longer than {length} tokens")
    m = global_align(a, b)
    mapper = torch.arange(length)
    alphas = torch.zeros(length)
    for k, src in enumerate(m):
        mapper[k] = max(src, 0)
        alphas[k] = float(src >= 0)
    mapper[len(b):] = torch.arange(len(a), len(a) + length - len(b)).clamp(max=length - 1)
    alphas[len(b):] = 1.0
    return mapper, alphas
