"""The dry-run planner against given cluster resources (logical resources: no GPU needed)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.placement import PlanError, dry_run, fit


def test_optune_preset_fits_one_8_gpu_node():
    cfg = load_config("configs/optune-zephyr-7b.yaml")  # 2 engines + 4 trainers + 1 reward = 7 GPUs
    placed = dict(fit(cfg, [{"CPU": 64, "GPU": 8}]))
    assert len(placed) == 7 and set(placed.values()) == {0}
    assert "fits the cluster" in dry_run(cfg, [{"CPU": 64, "GPU": 8}])


def test_rejects_too_few_gpus_with_a_clear_message():
    cfg = load_config("configs/optune-zephyr-7b.yaml")
    with pytest.raises(PlanError, match="does not fit the cluster: no node has 1 GPU .* 6 GPUs in all"):
        fit(cfg, [{"CPU": 64, "GPU": 6}])


def test_tensor_parallel_group_must_fit_on_one_node():
    cfg = load_config(
        "configs/optune-zephyr-7b.yaml",
        ["rollout.tensor_parallel_size=4", "rollout.num_engines=1", "train.num_workers=2"],
    )
    # 8 GPUs in all, but split 2+2+2+2: the 4-GPU TP group has no node
    with pytest.raises(PlanError, match="rollout engine 0 \\(TP 4\\)"):
        fit(cfg, [{"CPU": 16, "GPU": 2}] * 4)
    placed = dict(fit(cfg, [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}]))
    assert placed["rollout engine 0 (TP 4)"] in (0, 1)


def test_cpu_demo_fits_this_kind_of_machine_and_not_one_core():
    cfg = load_config("configs/demo-cpu.yaml")
    fit(cfg, [{"CPU": 2}])
    with pytest.raises(PlanError, match="CPU"):
        fit(cfg, [{"CPU": 1}])
