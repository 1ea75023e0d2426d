"""The built-in verifiable task: reverse a short lowercase word.

Generated in code from a seed, with ground-truth answers, so the demo and the tests need no
download. Train and eval words are disjoint.
"""

from __future__ import annotations

import random
import string

PROMPT_TEMPLATE = "reverse: {word}"


def make_words(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[str]:
    """`n` distinct random words; the same seed gives the same list."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        length = rng.randint(min_len, max_len)
        words["".join(rng.choice(string.ascii_lowercase) for _ in range(length))] = None
    return list(words)


def make_examples(num_train: int, num_eval: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval examples as {'prompt', 'response'} rows (response = ground truth)."""
    words = make_words(num_train + num_eval, seed)
    rows = [{"prompt": PROMPT_TEMPLATE.format(word=w), "response": w[::-1]} for w in words]
    return rows[:num_train], rows[num_train:]
