"""OPTune's low-reward prompt selection (Chen et al. 2024, arXiv 2406.07657).

After the first iteration, only the fraction rho of prompts whose current responses score lowest is
regenerated; the rest reuse their pairs. `random` is the paper's Rdm_rho baseline; `all` is rho = 1.
"""

from __future__ import annotations

import math

import numpy as np

from common.records import PreferenceGroup, Rollout


def prompt_score(pool: list[Rollout], group: PreferenceGroup | None, kind: str) -> float:
    """best_reward: the best response's reward; pair_mean: mean of the current pair's two rewards."""
    if not pool:
        return -math.inf  # never generated: always first in line
    if kind == "pair_mean" and group is not None:
        return float((group.rewards[0] + group.rewards[-1]) / 2.0)
    return float(max(r.reward for r in pool))


def num_selected(n_prompts: int, rho: float) -> int:
    # The small epsilon keeps float noise (0.7 * 10 = 7.000000000000001) from adding a prompt.
    return min(n_prompts, math.ceil(rho * n_prompts - 1e-9))


def select_prompts(scores: list[float], rho: float, mode: str, rng: np.random.Generator) -> list[int]:
    """Indices (sorted) of the prompts to regenerate.

    lowest_reward: the ceil(rho * N) lowest scores; ties go to the lower prompt index.
    random: ceil(rho * N) prompts drawn uniformly without replacement.
    all: every prompt.
    """
    n = len(scores)
    if mode == "all":
        return list(range(n))
    k = num_selected(n, rho)
    if mode == "lowest_reward":
        order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
        return sorted(int(i) for i in order[:k])
    if mode == "random":
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))
    raise ValueError(f"unknown selection.mode '{mode}'")
