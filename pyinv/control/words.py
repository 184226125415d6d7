"""Prompt words ↔ text-encoder token positions, and the token maps Prompt-to-Prompt needs.

All positions index the padded token sequence the text encoder sees (position 0 is the
start token, so the first word starts at 1). ``L`` is that sequence's length
(``tokenizer.model_max_length``, 77 for CLIP).

- :func:`word_tokens`: the token positions of every word of a prompt.
- :func:`replace_mapper`: P2P *replace* — ``M (L, L)`` with ``P_tgt ← P_src · M``
  (same word count; a changed word's source tokens spread over its target tokens).
- :func:`refine_alignment`: P2P *refine* — a global alignment (Needleman–Wunsch, match
  +1, mismatch −1, gap 0) of the two token sequences: ``idx (L,)`` (the source position
  each target position reads) and ``alpha (L,)`` (1 where matched, 0 for new tokens).
- :func:`word_weights`: a per-position vector set to a value on chosen words' tokens
  (the reweighting "equaliser", LocalBlend's word indicators, per-word windows).
- :func:`unknown_words`: the words of a text a closed-vocabulary model (the demo model)
  was never trained on.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch

from ..errors import PyinvError
from ..text import tokenize, vocabulary


def normalise(word: str) -> str:
    """Words are compared lower-cased and without surrounding punctuation."""
    return word.lower().strip(string.punctuation)


def _count(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without the start/end tokens."""
    return len(tokenize(tokenizer, text, add_special_tokens=False)["input_ids"])


def word_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """``[(word, positions)]`` for the space-separated words of ``prompt``.

    A word's positions are the tokens that appear when it is appended to the words before
    it (CLIP's tokenizer splits on whitespace first, so this is exact); positions past the
    text encoder's length are dropped (the prompt was truncated there).
    """
    length = int(tokenizer.model_max_length)
    words = prompt.split()
    out, before = [], 0
    for k, word in enumerate(words):
        upto = _count(tokenizer, " ".join(words[: k + 1]))
        positions = [p + 1 for p in range(before, upto) if p + 1 < length - 1]
        out.append((word, positions))
        before = upto
    return out


def word_positions(tokenizer, prompt: str, word: str, what: str = "word") -> list[int]:
    """Token positions of every occurrence of ``word`` (one or more words) in ``prompt``.

    Raises a :class:`PyinvError` naming the prompt when the word is not in it.
    """
    parts = [normalise(w) for w in word.split()]
    if not parts or not all(parts):
        raise PyinvError(f"{what} {word!r} is empty")
    tokens = word_tokens(tokenizer, prompt)
    words = [normalise(w) for w, _ in tokens]
    found: list[int] = []
    for start in range(len(words) - len(parts) + 1):
        if words[start : start + len(parts)] == parts:
            for _, pos in tokens[start : start + len(parts)]:
                found.extend(pos)
    if not found:
        raise PyinvError(f"{what} {word!r} is not in the prompt {prompt!r}")
    return sorted(set(found))


def word_weights(
    tokenizer, prompt: str, values: dict[str, float], length: int, base: float = 0.0, what: str = "word"
) -> torch.Tensor:
    """``(L,)`` vector: ``base`` everywhere, ``values[word]`` on that word's tokens."""
    out = torch.full((length,), float(base), dtype=torch.float64)
    for word, value in values.items():
        out[word_positions(tokenizer, prompt, word, what)] = float(value)
    return out


def replace_mapper(tokenizer, source: str, target: str, length: int) -> torch.Tensor:
    """P2P replace: ``M (L, L)`` such that ``P_tgt = P_src · M`` (columns = target tokens).

    The prompts must have the same number of words. Unchanged words map token to token;
    a changed word's ``n`` source tokens map to each of its ``m`` target tokens (weight 1
    when ``n = m`` position by position, else ``1/m`` from every source token to every
    target token). Start, end and padding positions map diagonally after the text.
    """
    src_words, tgt_words = word_tokens(tokenizer, source), word_tokens(tokenizer, target)
    if len(src_words) != len(tgt_words):
        raise PyinvError(
            f"replace needs prompts with the same number of words; the source has {len(src_words)}"
            f" and the target {len(tgt_words)} (use --edit refine for prompts of different lengths)"
        )
    mapper = torch.zeros(length, length, dtype=torch.float64)
    mapper[0, 0] = 1.0
    last_src = last_tgt = 0
    for (ws, ps), (wt, pt) in zip(src_words, tgt_words, strict=True):
        if not ps or not pt:  # truncated away
            continue
        if normalise(ws) == normalise(wt) or len(ps) == len(pt):
            for i, j in zip(ps, pt, strict=False):
                mapper[i, j] = 1.0
        else:
            for j in pt:
                mapper[ps, j] = 1.0 / len(pt)
        last_src, last_tgt = ps[-1], pt[-1]
    # the end token and the padding after it follow the text one to one
    i, j = last_src + 1, last_tgt + 1
    while i < length and j < length:
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    while j < length:  # a longer target's tail reads the last source position
        mapper[length - 1, j] = 1.0
        j += 1
    return mapper


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenize(tokenizer, text, truncation=True, max_length=tokenizer.model_max_length)["input_ids"])


def refine_alignment(tokenizer, source: str, target: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P refine: global alignment of the token sequences (start and end tokens included).

    Scores: match +1, mismatch −1, gap 0; among equal-score paths the trace-back prefers a
    gap in the source (a new target token), then a gap in the target, then a match.
    Returns ``idx (L,)`` long and ``alpha (L,)``: target position ``j`` reads source
    position ``idx[j]`` with weight ``alpha[j]`` (0 for tokens only the target has).
    Positions after the target's end token map to themselves with ``alpha = 1``.
    """
    x, y = _ids(tokenizer, source), _ids(tokenizer, target)
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    move = [[0] * (ny + 1) for _ in range(nx + 1)]  # 1: left (gap in x), 2: up (gap in y), 3: diagonal
    for j in range(1, ny + 1):
        move[0][j] = 1
    for i in range(1, nx + 1):
        move[i][0] = 2
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else (2 if best == up else 3)
    pairs: list[tuple[int, int]] = []
    i, j = nx, ny
    while i > 0 or j > 0:
        m = move[i][j]
        if m == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif m == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    pairs.reverse()
    idx = torch.arange(length, dtype=torch.long)
    alpha = torch.ones(length, dtype=torch.float64)
    for j, i in pairs:
        if j < length:
            idx[j] = max(i, 0)
            alpha[j] = 1.0 if i >= 0 else 0.0
    return idx, alpha


def window_alpha(
    tokenizer, targets: Sequence[str], num_steps: int, window, length: int, what: str = "cross_replace"
) -> torch.Tensor:
    """Per-step, per-token cross-attention control weights ``(N+1, T, L)`` (0 or 1).

    ``window`` is a fraction ``f`` (steps ``[0, f)``), a pair ``(s, e)``, or a dict
    ``{"default_": f or (s, e), "word": f or (s, e), …}`` giving some target words their
    own window. A window ``(s, e)`` covers step indices ``int(s·(N+1)) ≤ k < int(e·(N+1))``,
    the reference's rounding. A word must appear in at least one target prompt.
    """
    spec = dict(window) if isinstance(window, dict) else {"default_": window}
    spec.setdefault("default_", (0.0, 1.0))
    alpha = torch.zeros(num_steps + 1, len(targets), length, dtype=torch.float64)
    rows = num_steps + 1

    def span(value) -> tuple[int, int]:
        s, e = check_window(value, what)
        return int(s * rows), int(e * rows)

    s, e = span(spec["default_"])
    alpha[s:e] = 1.0
    for word, value in spec.items():
        if word == "default_":
            continue
        s, e = span(value)
        hits = 0
        for t, prompt in enumerate(targets):
            try:
                pos = word_positions(tokenizer, prompt, word, f"{what} word")
            except PyinvError:
                continue
            hits += 1
            alpha[:, t, pos] = 0.0
            alpha[s:e, t, pos] = 1.0
        if not hits:
            raise PyinvError(f"{what} word {word!r} is not in the target prompt(s) {list(targets)!r}")
    return alpha


def check_window(value, what: str) -> tuple[float, float]:
    """A fraction ``f`` → ``(0, f)``; a pair ``(s, e)`` as given; both must lie in [0, 1]."""
    if isinstance(value, bool):
        raise PyinvError(f"{what} must be a number in [0, 1] or a pair (start, end), got {value!r}")
    if isinstance(value, int | float):
        pair = (0.0, float(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        try:
            pair = (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            raise PyinvError(f"{what} must be a number in [0, 1] or a pair (start, end), got {value!r}") from None
    else:
        raise PyinvError(f"{what} must be a number in [0, 1] or a pair (start, end), got {value!r}")
    s, e = pair
    if not (0.0 <= s <= 1.0 and 0.0 <= e <= 1.0):
        raise PyinvError(f"{what} window {value!r} is outside [0, 1]")
    if s > e:
        raise PyinvError(f"{what} window {value!r} starts after it ends")
    return pair


#: a tokenizer with at most this many entries is a closed vocabulary (CLIP's has 49,408)
CLOSED_VOCABULARY_MAX = 5000


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of ``text`` a closed-vocabulary model has no whole-word token for.

    A small vocabulary (at most :data:`CLOSED_VOCABULARY_MAX` entries, like the demo model's:
    the shapes world's words and byte symbols) lists every word its model was trained on as a
    whole token (``"red</w>"``); other words fall back to byte pieces the text encoder never
    saw in a caption. An open vocabulary (CLIP's) knows every word: ``[]``.
    """
    vocab = vocabulary(tokenizer)
    if len(vocab) > CLOSED_VOCABULARY_MAX:
        return []
    words = [normalise(w) for w in text.split()]
    return [w for w in words if w and f"{w}</w>" not in vocab]
