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
