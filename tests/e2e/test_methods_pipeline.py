"""Each method from the groups the reward actor builds to the loss inputs the trainer computes.

The losses alone are checked in test_losses.py; these tests check what the pipeline feeds them (which
samples, which iteration sampled them, the SFT target, the weights), on the real tiny policy.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.config import AlgorithmConfig
from workers.losses import wdpo_weights


@pytest.mark.slow
def test_apo_does_not_extrapolate_when_no_step_ran(run_tiny, tmp_path):
    tied = tmp_path / "tied.py"
    tied.write_text("def tied(prompts, responses, references):\n    return [1.0] * len(responses)\n")
    from pipeline.loop import PipelineError

    with pytest.raises(PipelineError, match="no iteration trained"):
        run_tiny(
            "iterations=1",
            "algorithm.name=apo",
            "algorithm.nll_coef=0",
            f"reward.function={tied}:tied",
            out=tmp_path / "run",
        )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_steps"] == 0 and rows[-1]["pairs"] == 0
    assert rows[-1]["apo_step_norm"] is None  # no optimiser output this iteration: no Nesterov step


@pytest.mark.slow
def test_wdpo_pair_weights_in_samples_belong_to_their_prompts(run_tiny, tmp_path):
    """Samples.jsonl held the weights in micro-batch order, so the report set them against the
    wrong prompts. Each weight now comes with its prompt, and equals g(beta2 * gap) of that prompt's pair,
    recomputed here from the rewards the rollout recorded (best against worst of its samples)."""
    import json

    run_tiny("iterations=1", "algorithm.name=wdpo", "algorithm.wdpo_beta2=2.0", "algorithm.nll_coef=0", out=tmp_path)
    record = next(
        r for r in map(json.loads, (tmp_path / "samples.jsonl").read_text().splitlines()) if r.get("pair_weights")
    )
    prompts, weights, rewards = record["pair_prompts"], record["pair_weights"], record["rollout_rewards"]
    assert prompts == sorted(prompts) and len(prompts) == len(weights)
    n = 4  # rollout.n_samples of the demo config; selection.mode=all: prompt p has samples n*p .. n*p+n-1
    gaps = torch.tensor([max(rewards[n * p : n * p + n]) - min(rewards[n * p : n * p + n]) for p in prompts])
    expected = wdpo_weights(gaps, AlgorithmConfig(name="wdpo", wdpo_beta2=2.0))
    assert torch.allclose(torch.tensor(weights), expected, atol=1e-5)
