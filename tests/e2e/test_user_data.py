"""One end-to-end tiny run on a local JSONL prompt file instead of the built-in task."""

from __future__ import annotations

import json

import pytest

from pipeline.builtin_task import make_examples

pytestmark = pytest.mark.slow


def test_run_on_local_jsonl(run_tiny, tmp_path):
    train, _ = make_examples(40, 0, seed=77)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["response"]}) + "\n" for r in train))
    rows, _ = run_tiny(
        f"data.train={path}",
        "data.prompt_column=question",
        "data.response_column=answer",
        "data.num_eval_prompts=8",
        "iterations=1",
        out=tmp_path / "run",
    )
    assert rows[-1]["iteration"] == 1 and rows[-1]["pairs"] > 0


def test_fresh_prompt_slice_per_iteration(run_tiny, tmp_path):
    """RLHFlow style: iteration k trains on the k-th slice of prompts; pairs come from that slice only."""
    rows, _ = run_tiny("data.prompts_per_iteration=16", "iterations=2", out=tmp_path / "slices")
    for r in rows[1:]:
        assert r["prompts_regenerated"] == 16 and 0 < r["pairs"] <= 16
        assert r["pairs"] + r["pairs_dropped_ties"] == 16
        assert r["generation_saved_fraction"] == pytest.approx(0.0, abs=1e-9)


def test_fresh_slices_wrap_and_differ():
    from rewards.actor import RewardWorker

    w = RewardWorker({"kind": "function"})
    data = {
        "texts": [f"reverse: {c}bc" for c in "abcde"],
        "references": [None] * 5,
        "prompt_ids": [[1]] * 5,
        "sft_ids": [None] * 5,
    }
    w.reset(data, data, {"name": "dpo"}, {"mode": "all"}, 2, 0, prompts_per_iteration=2)
    assert [w.select(k) for k in (1, 2, 3)] == [[0, 1], [2, 3], [0, 4]]
