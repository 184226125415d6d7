"""Tokenizer calls from several threads at once give what they give one at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from pyinv.control.words import word_tokens

PROMPTS = ["a photo of a red ball", "a photo of a big blue cube on a green table", "a cat"]


def test_concurrent_prompt_encodings_and_word_lookups_do_not_mix_settings(editor):
    model = editor.model
    tok = model.tokenizer
    ids = {p: model.token_count(p) for p in PROMPTS}
    words = {p: word_tokens(tok, p) for p in PROMPTS}
    rounds, workers = 60, 6
    barrier = threading.Barrier(workers)

    def job(k: int) -> list[bool]:
        barrier.wait()
        same = []
        for r in range(rounds):
            p = PROMPTS[(k + r) % len(PROMPTS)]
            if (k + r) % 2:  # padded to the maximum length, truncated
                same.append(model.encode_prompts([p]).shape[1] == model.max_tokens)
            else:  # unpadded lookups
                same.append(word_tokens(tok, p) == words[p] and model.token_count(p) == ids[p])
        return same

    with ThreadPoolExecutor(workers) as pool:
        results = [ok for oks in pool.map(job, range(workers)) for ok in oks]
    assert len(results) == rounds * workers and all(results)
