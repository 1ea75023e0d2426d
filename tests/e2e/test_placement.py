"""The dry-run planner against given cluster resources (logical resources: no GPU needed)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_colocated_run_sleeps_the_engine_while_the_trainer_trains(tmp_path):
    """Colocation's call order, run for real on CPU (vLLM tracks its sleep there too; only the memory is not
    freed): per iteration the engine generates, sleeps, and after training wakes its weights, takes the update,
    wakes its KV cache and generates the eval answers; the trainer trains while it sleeps."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "tests/colocated_run.py", str(tmp_path / "run"), "iterations=2", "quiet=true"]
    cmd += ["data.num_train_prompts=32", "data.num_eval_prompts=8", "train.micro_batch_size=8", "train.epochs=1"]
    cmd += ["tensorboard=false", "ray_num_cpus=2"]
    proc = subprocess.run(
        cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, events = result["rows"], result["events"]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and all(r["train_steps"] for r in rows[1:])
    names = [name for _, name in events]
    # start: the initial sync and eval; then per iteration: rollout, sleep, wake, update, wake, eval
    per_iteration = ["generate", "sleep(1)", "wake_up(weights)", "start_weight_update", "finish_weight_update"]
    per_iteration += ["wake_up(kv_cache)", "generate"]
    assert names == ["start_weight_update", "finish_weight_update", "generate", *per_iteration, *per_iteration]
    times = dict(enumerate(t for t, _ in events))
    for it, row in zip((1, 2), rows[1:], strict=True):
        asleep = times[3 + 7 * (it - 1) + 2] - times[3 + 7 * (it - 1) + 1]  # sleep -> wake_up(weights)
        assert asleep >= 0.9 * row["time_train_s"], (asleep, row["time_train_s"])
