"""The dry-run planner against given cluster resources (logical resources: no GPU needed)."""

from __future__ import annotations

import re

import pytest

from common.config_files import load_config
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


# ---------------------------------------------------------------- NCCL ranks and whole GPUs
PRESET = "configs/optune-zephyr-7b.yaml"


def test_gpu_test_asks_for_whole_gpus_that_fit(tmp_path, gpu_overrides):
    for gpus in (2, 3):
        cfg = load_config("configs/demo-cpu.yaml", gpu_overrides(str(tmp_path), gpus))
        assert cfg.train.num_gpus == cfg.rollout.num_gpus == 1
        placed = fit(cfg, [{"CPU": 16, "GPU": gpus}])
        assert len(placed) == 1 + cfg.train.num_workers + 1


def test_rejects_two_nccl_ranks_of_one_communicator_on_one_gpu():
    # the old GPU test: engine 0.4 + two trainer ranks 0.2 on one device (NCCL refuses duplicate GPUs)
    old = load_config("configs/demo-cpu.yaml", ["rollout.num_gpus=0.4", "train.num_gpus=0.2", "sync.backend=nccl"])
    with pytest.raises(PlanError, match="train.num_gpus=0.2 .* one GPU"):
        fit(old, [{"CPU": 16, "GPU": 1}])
    with pytest.raises(PlanError, match="one GPU"):
        dry_run(old)  # the dry run says so too, with or without a cluster
    # DeepSpeed's NCCL group alone (CPU sync): two ranks with half a GPU each
    ds = load_config(PRESET, ["train.num_gpus=0.5", "sync.backend=cpu"])
    with pytest.raises(PlanError, match="train.num_gpus=0.5"):
        fit(ds, [{"CPU": 64, "GPU": 8}])
    # the sync's NCCL group: an engine sharing a device with trainer rank 0 (auto picks nccl: both have GPUs)
    sync = load_config("configs/demo-cpu.yaml", ["train.num_workers=1", "train.num_gpus=1", "rollout.num_gpus=0.5"])
    with pytest.raises(PlanError, match="rollout.num_gpus=0.5 .* sync.backend=cpu"):
        fit(sync, [{"CPU": 16, "GPU": 2}])
    # no NCCL group at all: fractional shares are fine
    shared = load_config(
        "configs/demo-cpu.yaml",
        ["train.num_workers=1", "train.num_gpus=0.5", "rollout.num_gpus=0.5", "sync.backend=cpu"],
    )
    assert fit(shared, [{"CPU": 16, "GPU": 1}])


def test_nccl_sync_needs_gpus_on_both_sides():
    cfg = load_config("configs/demo-cpu.yaml", ["rollout.num_gpus=1", "sync.backend=nccl"])  # CPU trainers
    with pytest.raises(PlanError, match="sync.backend=nccl needs GPUs"):
        fit(cfg, [{"CPU": 16, "GPU": 4}])


def test_tensor_parallel_needs_one_whole_gpu_per_worker():
    for share in ("0.5", "2"):
        cfg = load_config(PRESET, ["rollout.tensor_parallel_size=2", f"rollout.num_gpus={share}"])
        with pytest.raises(PlanError, match=f"tensor_parallel_size=2 with rollout.num_gpus={share}"):
            fit(cfg, [{"CPU": 64, "GPU": 16}])


def test_tensor_parallel_engine_reserves_its_cpus_per_worker():
    cfg = load_config(
        PRESET,
        ["rollout.tensor_parallel_size=4", "rollout.num_engines=1", "rollout.num_cpus=2", "train.num_workers=2"],
    )
    assert re.search(r"rollout engine 0 \(TP 4\) +CPU 8  GPU 4", dry_run(cfg))  # a CPU 2 bundle per worker
    with pytest.raises(PlanError, match="no node has 4 GPU and 8 CPU left for rollout engine 0"):
        fit(cfg, [{"CPU": 7, "GPU": 8}])
    assert len(fit(cfg, [{"CPU": 9, "GPU": 8}])) == 4


def test_cpu_weight_sync_with_tensor_parallel_engines_is_refused():
    """The `onalign_cpu` backend lives in the engine actor's process; with TP > 1 the engine's
    weights sit in vLLM's Ray TP workers, which have no such backend ("Invalid weight transfer backend")."""
    for sync in (["sync.backend=cpu", "train.num_gpus=1"], ["sync.backend=auto", "train.num_gpus=0"]):
        cfg = load_config(PRESET, ["rollout.tensor_parallel_size=2", "rollout.num_gpus=1", *sync])
        with pytest.raises(PlanError, match="CPU weight sync .*tensor_parallel_size=2: .*sync.backend=nccl"):
            dry_run(cfg)
    dry_run(load_config(PRESET, ["rollout.tensor_parallel_size=2", "rollout.num_gpus=1", "sync.backend=nccl"]))


# ---------------------------------------------------------------- one GPU: colocation
ONE_GPU = "configs/gpu-1x-smollm2.yaml"


def test_one_gpu_preset_colocates_and_fits_one_gpu():
    """The engine and the trainer rank share the GPU (Ray fractional GPUs, one bundle); the weights go through
    vLLM's CUDA IPC backend; a second GPU is not needed."""
    cfg = load_config(ONE_GPU)
    assert cfg.placement == "colocate" and cfg.sync_backend() == "ipc"
    placed = dict(fit(cfg, [{"CPU": 8, "GPU": 1}]))
    assert placed == {"bundle 0: trainer rank 0 + rollout engine 0": 0, "reward actor": 0}
    text = dry_run(cfg, [{"CPU": 8, "GPU": 1}], params=134_515_008)
    assert "memory plan, each GPU" in text and "sleeps while the trainer trains" in text


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sync.backend=nccl"], "colocate.*sync.backend=nccl.*two ranks of one NCCL group on one GPU"),
        (["rollout.num_gpus=0.6", "train.num_gpus=0.6"], "rollout.num_gpus \\+ train.num_gpus = 1.2.*at most 1"),
        (["rollout.num_gpus=0"], "colocate.*GPUs on both sides or on neither"),
        (["rollout.tensor_parallel_size=2"], "colocate.*tensor_parallel_size=1"),
        (["train.num_workers=2"], "colocate.*one engine per trainer rank.*rollout.num_engines=2"),
        (["placement=separate", "sync.backend=ipc"], "sync.backend=ipc.*placement=colocate"),
        (["placement=separate"], "fractional GPU lets two of them share one GPU.*or placement=colocate"),
    ],
)
def test_colocation_refusals(overrides, message):
    with pytest.raises(PlanError, match=message):
        dry_run(load_config(ONE_GPU, overrides))


def test_colocation_on_cpu_is_allowed_and_uses_the_cpu_sync():
    """On CPU, vLLM's sleep is a no-op, so a colocated CPU run exercises the schedule (sleep, train, wake,
    update) without freeing memory: the CPU tests run it for real."""
    cfg = load_config("configs/demo-cpu.yaml", ["placement=colocate", "train.num_workers=1"])
    assert cfg.sync_backend() == "cpu"
    assert dict(fit(cfg, [{"CPU": 2}])) == {"bundle 0: trainer rank 0 + rollout engine 0": 0, "reward actor": 0}
    with pytest.raises(PlanError, match="sync.backend=ipc needs GPUs"):
        dry_run(load_config("configs/demo-cpu.yaml", ["placement=colocate", "train.num_workers=1", "sync.backend=ipc"]))
