"""End to end on the shared actors: a refused resume writes nothing, and a truncated checkpoint is
named and skipped, the run going on from the previous one exactly as an uninterrupted run would."""

from __future__ import annotations

import json

import pytest

from pipeline.checkpoint import ResumeError


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_and_refused_resume_writes_nothing(run_tiny, tmp_path, capsys):
    full, out = run_tiny("iterations=2", out=tmp_path)
    config_before = (tmp_path / "config.yaml").read_text()
    metrics_before = (tmp_path / "metrics.jsonl").read_text()

    with pytest.raises(ResumeError, match=r"algorithm\.beta: checkpoint 0\.1 vs config 0\.2"):
        run_tiny("iterations=3", "resume=true", "algorithm.beta=0.2", out=tmp_path)
    assert (tmp_path / "config.yaml").read_text() == config_before
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before

    bad = tmp_path / "checkpoints" / "iter_2" / "policy" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1000])
    capsys.readouterr()
    rows, _ = run_tiny("iterations=3", "resume=true", out=tmp_path)
    said = capsys.readouterr().out
    assert str(bad) in said and "iter_1" in said
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    for key in ("eval_reward_mean", "reward_mean", "loss", "pairs", "generated_tokens"):  # iteration 2 redone
        if full[2][key] is None:
            assert rows[2][key] is None
        else:
            assert rows[2][key] == pytest.approx(full[2][key], rel=1e-5, abs=1e-7), key
    changes = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"iteration": 2, "changes": {"iterations": [2, 3]}}]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_2", "iter_3"]
