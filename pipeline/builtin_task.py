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


# ---------------------------------------------------------------- arithmetic (`builtin:arithmetic`)
# For a real pretrained chat model (SmolLM2-135M-Instruct answers about a third of these greedily).
ARITHMETIC_TEMPLATE = "What is {a} + {b}? Answer with only the number."


def make_arithmetic_examples(
    num_train: int, num_eval: int, seed: int = 1234, low: int = 1, high: int = 20
) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval rows of "What is a + b?" with a, b in low..high (response = the sum).

    Train and eval are disjoint in the unordered pair {a, b}: an eval question is never a train question
    with its operands swapped. Raises ValueError when more prompts are asked for than there are pairs."""
    total = (high - low + 1) ** 2
    if num_train + num_eval > total:
        raise ValueError(
            f"{num_train} train + {num_eval} eval prompts asked for, but a, b in {low}..{high} give only "
            f"{total} questions; lower data.num_train_prompts / data.num_eval_prompts"
        )
    rng = random.Random(seed)
    groups = [(a, b) for a in range(low, high + 1) for b in range(a, high + 1)]  # unordered pairs
    rng.shuffle(groups)

    def rows(pairs: list[tuple[int, int]]) -> list[dict]:
        ordered = sorted({pair for a, b in pairs for pair in ((a, b), (b, a))})
        rng.shuffle(ordered)
        return [{"prompt": ARITHMETIC_TEMPLATE.format(a=a, b=b), "response": str(a + b)} for a, b in ordered]

    eval_groups: list[tuple[int, int]] = []
    count = 0
    while count < num_eval:
        a, b = groups[len(eval_groups)]
        eval_groups.append((a, b))
        count += 1 if a == b else 2
    eval_rows = rows(eval_groups)[:num_eval]
    train_rows = rows(groups[len(eval_groups) :])[:num_train]
    if len(train_rows) < num_train:
        raise ValueError(
            f"only {len(train_rows)} train prompts are left beside {num_eval} eval prompts for a, b in "
            f"{low}..{high}; lower data.num_train_prompts"
        )
    return train_rows, eval_rows
