from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from common.records import Rollout
from rewards.pairs import best_worst, ground_truth, ranked_list
from rewards.selection import num_selected, prompt_score, select_prompts


def ro(ids, reward):
    return Rollout(prompt_index=0, response_ids=list(ids), text="", finish_reason="stop", reward=reward)


def test_best_worst_and_ties():
    pool = [ro([1], 0.5), ro([2], 1.0), ro([3], 0.0), ro([4], 1.0)]
    g = best_worst(0, [9], pool, None, 4)
    assert g.responses == [[2], [3]] and g.rewards == [1.0, 0.0]  # first of the tied best wins
    assert best_worst(0, [9], [ro([1], 0.3), ro([2], 0.3)], None, 2) is None
    assert best_worst(0, [9], [ro([1], 0.3)], None, 1) is None


def test_ranked_list_uses_newest_k_sorted():
    pool = [ro([0], 9.0)] + [ro([i], r) for i, r in zip([1, 2, 3], [0.1, 0.9, 0.5], strict=True)]
    g = ranked_list(0, [9], pool, None, 3)
    assert g.responses == [[2], [3], [1]] and g.rewards == [0.9, 0.5, 0.1]
    assert ranked_list(0, [9], [ro([1], 1.0), ro([2], 1.0)], None, 2) is None


def test_ground_truth_pair_for_spin():
    g = ground_truth(0, [9], [ro([1], 0.2), ro([5], 0.4)], [7, 7], 1)
    assert g.responses == [[7, 7], [5]]


@pytest.mark.parametrize("n,rho", [(10, 0.5), (10, 0.7), (7, 0.5), (3, 0.1), (100, 0.33), (5, 1.0)])
def test_selection_picks_ceil_rho_n_lowest(n, rho):
    rng = np.random.default_rng(0)
    scores = rng.permutation(n).astype(float).tolist()
    picked = select_prompts(scores, rho, "lowest_reward", rng)
    k = math.ceil(rho * n - 1e-9)
    assert len(picked) == k == num_selected(n, rho)
    assert sorted(scores[i] for i in picked) == sorted(scores)[:k]


def test_selection_ties_are_deterministic_by_index():
    scores = [0.5, 0.1, 0.5, 0.1, 0.5]
    rng = np.random.default_rng(0)
    assert select_prompts(scores, 0.6, "lowest_reward", rng) == [0, 1, 3]
    assert select_prompts(scores, 0.6, "lowest_reward", np.random.default_rng(99)) == [0, 1, 3]


def test_rho_one_equals_all_and_random_is_seeded():
    scores = [0.3, 0.1, 0.9, 0.2]
    assert (
        select_prompts(scores, 1.0, "lowest_reward", np.random.default_rng(0))
        == select_prompts(scores, 1.0, "all", np.random.default_rng(0))
        == [0, 1, 2, 3]
    )
    a = select_prompts(scores * 5, 0.5, "random", np.random.default_rng([0, 2]))
    b = select_prompts(scores * 5, 0.5, "random", np.random.default_rng([0, 2]))
    assert a == b and len(a) == 10


def test_prompt_score_kinds():
    pool = [ro([1], 0.2), ro([2], 0.8)]
    g = best_worst(0, [9], pool, None, 4)
    assert prompt_score(pool, g, "best_reward") == 0.8
    assert prompt_score(pool, g, "pair_mean") == pytest.approx(0.5)
    assert prompt_score([], None, "best_reward") == -math.inf


def test_reuse_keeps_groups_byte_identical():
    """Prompts that are not regenerated keep exactly the same group object contents."""
    from rewards.actor import RewardWorker

    w = RewardWorker({"kind": "function", "function": "rewards.functions:reverse_reward"})
    texts = [f"reverse: {x}" for x in ["abc", "defg", "hij", "klmn"]]
    data = {
        "texts": texts,
        "references": [t.split()[-1][::-1] for t in texts],
        "prompt_ids": [[1, i] for i in range(4)],
        "sft_ids": [None] * 4,
    }
    w.reset(data, data, {"name": "dpo"}, {"mode": "lowest_reward", "rho": 0.5}, 2, seed=0)
    answers = {0: ["cba", "xyz"], 1: ["gfed", "gfeq"], 2: ["jih", "aaa"], 3: ["nmlk", "zz"]}
    first = [Rollout(i, [ord(c) for c in a], a, "stop") for i, pair in answers.items() for a in pair]
    w.ingest(first, 1)
    before = copy.deepcopy(w.groups)
    selected = w.select(2)
    assert len(selected) == 2
    again = [Rollout(i, [1, 2, 3], "q", "stop") for i in selected for _ in range(2)]
    w.ingest(again, 2)
    for i in range(4):
        if i not in selected:
            assert w.groups[i] == before[i]
