"""Rule-based reward functions.

Signature of every reward function (`reward.kind: function`, `reward.function: module:function`)::

    fn(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]

`prompts` are the raw prompt texts (before the chat template), `responses` the decoded responses
(special tokens removed), `references` the dataset's ground-truth responses where the dataset has
them (None otherwise). It returns one finite float per response, in the same order.
"""

from __future__ import annotations

import re


def reverse_score(response: str, target: str) -> float:
    """1.0 for the exact answer, else 0.5 x share of positions that are right (length-penalised)."""
    got = response.strip()
    if got == target:
        return 1.0
    if not got or not target:
        return 0.0
    right = sum(a == b for a, b in zip(got, target, strict=False))
    return 0.5 * right / max(len(got), len(target))


def reverse_reward(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
    """Correctness reward of the built-in `reverse: WORD` task, checked against the ground truth."""
    out = []
    for prompt, response, ref in zip(prompts, responses, references, strict=True):
        target = ref if ref is not None else prompt.rsplit(":", 1)[-1].strip()[::-1]
        out.append(reverse_score(response, target))
    return out


# ---------------------------------------------------------------- `builtin:arithmetic`
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MAX_NUMBERS = 3  # "3 + 4 = 7" is a fair answer; a list of guesses is not
MAX_RESPONSE_CHARS = 200


def last_integer_score(response: str, target: int) -> float:
    """1.0 when the last number of the response equals `target`, else 0.0.

    Hard to game: 0.0 for a response longer than MAX_RESPONSE_CHARS or holding more than MAX_NUMBERS
    numbers (hedging over guesses, padding), and a decimal counts as a number (7.5 is not 7)."""
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    numbers = _NUMBER.findall(response)
    if not numbers or len(numbers) > MAX_NUMBERS:
        return 0.0
    return 1.0 if float(numbers[-1]) == target else 0.0


def last_integer_reward(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
    """Correctness reward of `builtin:arithmetic` ("What is a + b?"): the response's last number against
    the ground truth (or a + b read from the prompt when there is none)."""
    out = []
    for prompt, response, ref in zip(prompts, responses, references, strict=True):
        if ref is not None:
            target = int(ref.strip())
        else:
            a, b = _NUMBER.findall(prompt)[:2]
            target = int(a) + int(b)
        out.append(last_integer_score(response, target))
    return out
