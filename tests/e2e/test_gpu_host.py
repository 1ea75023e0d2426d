"""On a GPU host, every actor computes where the resource plan puts it.

A GPU host is simulated by telling torch that CUDA is there (tests/gpu_host.py): Ray 2.60 leaves
CUDA_VISIBLE_DEVICES alone for an actor given no GPU, so an actor that asks `torch.cuda.is_available()`
instead of the plan puts the CPU demo's two DeepSpeed ranks on one GPU ("Duplicate GPU detected")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_cpu_demo_runs_on_a_gpu_host(tmp_path):
    """The CPU demo, one iteration, where every process believes a GPU is visible: it must train on CPU
    (before the fix both ranks took cuda:0 and DeepSpeed's NCCL backend failed)."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "tests/gpu_host.py",
        str(out),
        "iterations=1",
        "data.num_train_prompts=32",
        "data.num_eval_prompts=8",
        "train.micro_batch_size=8",
        "train.epochs=1",
        "quiet=true",
        "tensorboard=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iterations done: 1" in proc.stdout
    assert (out / "checkpoints").is_dir()
