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


class WordNotInPrompt(ValueError):
    """A word is not in the prompt (a ValueError; its own class so callers can tell it from the others)."""


def word_positions(tokenizer, prompt: str, word, length: int = 77) -> List[int]:
    """All token positions of `word` (or of a word index, given as an int) in `prompt`.

    Unlike the official `get_word_inds` (exact, case-sensitive match, silently empty when absent),
    a word matches ignoring case and surrounding punctuation, and a missing word is an error. A
    word the text encoder never sees (past token `length`, truncated) is an error too."""
    words = prompt.split()
    spans = word_tokens(tokenizer, prompt)
    if isinstance(word, int):
        if not 0 <= word < len(words):
            raise ValueError(f"word index {word} is outside the prompt {prompt!r}")
        hits = spans[word]
    else:
        hits = [p for w, span in zip(words, spans) if w.strip(".,!?;:").lower() == str(word).lower() for p in span]
        if not hits:
            raise WordNotInPrompt(f"word {word!r} is not in the prompt {prompt!r}")
    if max(hits) >= length - 1:  # the last position is <|endoftext|> after truncation
        raise ValueError(f"word {word!r} is past token {length - 1} of {prompt!r}, where the text encoder "
                         "truncates the prompt; shorten the prompt")
    return hits


def token_ids(tokenizer, prompt: str) -> List[int]:
    return tokenizer(prompt).input_ids  # with <|startoftext|> and <|endoftext|>, no padding


def global_align(a: List[int], b: List[int]) -> List[int]:
    """Needleman-Wunsch global alignment of token sequences `a` (source) and `b` (target), as the
    official `seq_aligner.global_align`: gap 0, match 1, mismatch -1; where scores tie, the trace
    back prefers a gap in `a` (left), then a gap in `b` (up), then the diagonal.

    Returns for each position of `b` the aligned position of `a` (matched *or* mismatched: the
    official mapper keeps both), or -1 where `b` has a token that `a` lacks.
    """
    gap, match, mismatch = 0, 1, -1
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1 left, 2 up, 3 diagonal
    for j in range(1, m + 1):
        score[0][j], move[0][j] = j * gap, 1
    for i in range(1, n + 1):
        score[i][0], move[i][0] = i * gap, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1] + gap, score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if a[i - 1] == b[j - 1] else mismatch)
            score[i][j] = best = max(left, up, diag)
            move[i][j] = 1 if best == left else 2 if best == up else 3
    mapper = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            mapper[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return mapper


def refine_mapper(tokenizer, source: str, target: str, length: int = 77):
    """(mapper [length] long, alphas [length] float): target position k takes source position
    mapper[k] where alphas[k] is 1; new tokens (alphas 0) keep their own attention.

    Positions past the target prompt map to themselves (official `get_mapper`), so the target's
    padding takes the source's tokens at the same positions."""
    a, b = token_ids(tokenizer, source), token_ids(tokenizer, target)
    if max(len(a), len(b)) > length:
        raise ValueError(f"prompts are longer than {length} tokens; shorten them")
    m = global_align(a, b)
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    for k, src in enumerate(m):
        mapper[k] = max(src, 0)  # the official keeps -1 (the last token) here; its alpha 0 discards it
        alphas[k] = float(src >= 0)
    return mapper, alphas


def replace_mapper(tokenizer, source: str, target: str, length: int = 77) -> torch.Tensor:
    """[length, length] matrix M for a word swap: target column n takes sum_w source[w] M[w, n]
    (official `seq_aligner.get_replacement_mapper_`).

    The prompts must have the same number of words. A swapped word spanning the same number of
    tokens maps one to one; otherwise each of its source tokens spreads evenly over the target's
    tokens. Between swaps the positions advance together; after the last swap the official code
    maps every remaining position to itself (M[j, j] = 1), which we keep."""
    ws, wt = source.split(), target.split()
    if len(ws) != len(wt):
        raise ValueError(f"a word swap needs prompts with the same number of words: {source!r} has {len(ws)}, "
                         f"{target!r} has {len(wt)}; use mode 'refine' to add or remove words")
    swapped = [k for k in range(len(wt)) if ws[k] != wt[k]]
    src = [word_positions(tokenizer, source, k, length) for k in swapped]
    tgt = [word_positions(tokenizer, target, k, length) for k in swapped]
    m = torch.zeros(length, length)
    i = j = c = 0
    while i < length and j < length:
        if c < len(swapped) and src[c][0] == i:
            if len(src[c]) == len(tgt[c]):
                m[src[c], tgt[c]] = 1.0
            else:
                for t in tgt[c]:
                    m[src[c], t] = 1.0 / len(tgt[c])
            i, j, c = i + len(src[c]), j + len(tgt[c]), c + 1
        elif c < len(swapped):
            m[i, j] = 1.0
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1.0
            i, j = i + 1, j + 1
    return m
