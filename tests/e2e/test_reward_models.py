"""Reward models as real components: the tiny learned RM through the Ray reward actor, the remote kind
against a local HTTP server, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from common.records import Rollout


def direct_score(path, prompt, response) -> float:
    """One conversation, no padding, the RM's own chat template, a plain HF forward pass."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    assert text.startswith("<|im_start|>user\n" + prompt) and text.endswith(response + "<|im_end|>\n")
    with torch.no_grad():
        return float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])


@pytest.mark.slow
def test_rm_through_ray_actor_matches_direct_forward_in_order(ray_cluster, rm_path):
    import ray

    from rewards.actor import RewardWorker

    prompts = ["reverse: abc", "reverse: hello", "reverse: xy", "reverse: qwerty", "reverse: mnop"]
    responses = ["cba", "olleh and a much longer tail to sort", "", "ytrewq", "ponm"]
    data = {"texts": prompts, "references": [None] * 5, "prompt_ids": [[1]] * 5, "sft_ids": [None] * 5}
    actor = ray.remote(RewardWorker).remote({"kind": "model", "model_path": rm_path, "batch_size": 2})
    ray.get(actor.reset.remote(data, data, {"name": "dpo"}, {"mode": "all"}, 2, 0))
    rollouts = [Rollout(i, [], r, "stop") for i, r in enumerate(responses)]
    scores = ray.get(actor.score_rollouts.remote(rollouts, "train"))
    expect = [direct_score(rm_path, p, r) for p, r in zip(prompts, responses, strict=True)]
    assert scores == pytest.approx(expect, abs=1e-4)  # same values, same order despite length sorting
    ray.kill(actor)


@pytest.mark.slow
def test_builtin_rm_through_the_pipeline(run_tiny, rm_path):
    """`reward.model_path: builtin:tiny-rm` is built by the driver and scores a whole iteration in the actor."""
    rows, _ = run_tiny(
        "iterations=1", "reward.kind=model", "reward.model_path=builtin:tiny-rm", "data.num_train_prompts=32"
    )
    scores = [rows[1]["reward_mean"], rows[0]["eval_reward_mean"], rows[1]["eval_reward_mean"]]
    assert all(math.isfinite(x) for x in scores)
    assert not all(0.0 <= x <= 1.0 for x in scores)  # RM logits, not the 0..1 rule-based reward
