"""End-to-end runs on real Ray, vLLM and DeepSpeed with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REQUIRED = [
    "iteration",
    "reward_mean",
    "reward_std",
    "eval_reward_mean",
    "win_rate_vs_initial",
    "pairs",
    "pairs_dropped_ties",
    "generated_tokens",
    "loss",
    "pair_accuracy",
    "time_generate_s",
    "time_score_s",
    "time_train_s",
    "time_sync_s",
    "time_total_s",
]


def test_two_iterations_end_to_end(run_tiny):
    rows, out = run_tiny("iterations=2")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["pairs"] > 0 and r["train_steps"] > 0
        assert r["loss"] is not None and r["loss"] == r["loss"]  # not NaN
        assert 0.0 <= r["pair_accuracy"] <= 1.0
        assert r["generated_tokens"] > 0
        # n independent samples per prompt: most of them differ
        assert r["distinct_response_fraction"] > 0.5
    assert rows[0]["win_rate_vs_initial"] == 0.5  # the initial policy against itself: all ties
    on_disk = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    assert on_disk == rows
    ckpt = Path(out, "checkpoints", "iter_2", "policy")
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()


def test_sync_makes_engine_logprobs_equal_trainer(run_tiny, workers, model_path):
    """After a training iteration and a sync, vLLM scores fixed responses like the trainer does."""
    import ray
    from transformers import AutoTokenizer

    run_tiny("iterations=1")
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts, responses = [], []
    for word in ["abc", "hello", "xyzzy", "qwerty"]:
        p = tok.apply_chat_template([{"role": "user", "content": f"reverse: {word}"}], add_generation_prompt=True)
        prompts.append(list(p["input_ids"]))
        responses.append(tok(word[::-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    trainer_lp = ray.get(workers.trainers.call_rank0("sequence_logprobs", prompts, responses))
    engine_lp = ray.get(workers.rollouts[0].response_logprobs.remote(prompts, responses))
    initial_lp = _hf_logprobs(model_path, prompts, responses)
    assert engine_lp == pytest.approx(trainer_lp, abs=1e-3)
    # and the weights really moved (the check is not vacuous)
    assert max(abs(a - b) for a, b in zip(trainer_lp, initial_lp, strict=True)) > 1e-3


def test_sampled_logprobs_are_the_reference_logprobs(run_tiny, workers, model_path, tmp_path):
    """The engine's log-prob of each response it samples equals the trainer's forward pass of the same policy
    (after a sync), so `train.reference_logps: rollout` may skip the reference forward for them; the run
    reports how many reference log-probs came from the rollout."""
    import ray
    from transformers import AutoTokenizer

    rows, _ = run_tiny("iterations=1")
    assert rows[1]["ref_logps_from_rollout"] == 1.0  # dpo, reference = previous: every pair was just sampled
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [
        list(
            tok.apply_chat_template([{"role": "user", "content": f"reverse: {w}"}], add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for w in ["abc", "hello", "xyzzy", "qwerty"]
    ]
    samples = ray.get(workers.rollouts[0].generate.remote(prompts, [0, 1, 2, 3], 2, 1.0, 1.0, 16, 7, 1))
    trainer_lp = ray.get(
        workers.trainers.call_rank0(
            "sequence_logprobs", [prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples]
        )
    )
    assert [s.sample_logprob for s in samples] == pytest.approx(trainer_lp, abs=1e-3)
    # the text the reward sees is the response decoded without the token that stopped it, as vLLM gives it
    stopped = [s.response_ids[:-1] if s.finish_reason == "stop" else s.response_ids for s in samples]
    assert [s.text for s in samples] == [tok.decode(ids, skip_special_tokens=True) for ids in stopped]
    forward, _ = run_tiny("iterations=1", "train.reference_logps=forward", out=tmp_path / "forward")
    assert forward[1]["ref_logps_from_rollout"] == 0.0


def _hf_logprobs(path, prompts, responses):
    import torch
    from transformers import AutoModelForCausalLM

    from workers.logprobs import batched_sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return batched_sequence_logprobs(model, prompts, responses, 0)[0].tolist()


def test_fsspec_output_dir_is_mirrored_and_resumable(run_tiny, tmp_path):
    """output_dir may be an fsspec URL: metrics, report and checkpoints land there after every iteration,
    and a resume reads them back from there."""
    remote = tmp_path / "bucket" / "run"
    url = f"file://{remote}"
    run_tiny("iterations=1", out=url)
    assert len((remote / "metrics.jsonl").read_text().splitlines()) == 2
    assert (remote / "report.html").is_file() and (remote / "plots" / "eval_reward.png").is_file()
    assert (remote / "checkpoints" / "iter_1" / "state.json").is_file()
    assert (remote / "checkpoints" / "iter_1" / "policy" / "model.safetensors").is_file()
    rows, _ = run_tiny("iterations=2", "resume=true", out=url)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert len((remote / "metrics.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["iter_1", "iter_2"]
