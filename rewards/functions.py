"""Rule-based reward functions.

Signature of every reward function (`reward.kind: function`, `reward.function: module:function`)::

    fn(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]

`prompts` are the raw prompt texts (before the chat template), `responses` the decoded responses
(special tokens removed), `references` the dataset's ground-truth responses where the dataset has
them (None otherwise). It returns one finite float per response, in the same order.
"""

from __future__ import annotations


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
