"""The GPU path's plumbing, checked on CPU: NCCL ranks of several engines, the DeepSpeed
rendezvous address, fp32 master weights under bf16, placement-group clean-up and the sync backend choice.

No GPU is needed: the NCCL endpoints are stubbed where they would open, everything else is the real code
(vLLM's trainer-side NCCL engine, DeepSpeed ZeRO 2/3 with gloo, Ray)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- 1. NCCL ranks of several engines
@pytest.mark.slow
@pytest.mark.parametrize("num_engines,tp", [(2, 1), (3, 2)])
def test_nccl_init_gives_every_engine_worker_its_own_rank(ray_cluster, monkeypatch, num_engines, tp):
    """Each engine is its own `LLM` (data-parallel index 0), so the rank offset in its init payload alone
    separates its workers from the other engines' (vLLM: rank = dp_index * TP + tp_rank + rank_offset)."""
    import ray
    from vllm.distributed.weight_transfer import nccl_common, nccl_engine

    from workers.trainer import TrainerWorker

    @ray.remote(num_cpus=0)
    class FakeEngine:  # records what vLLM's engine would receive in `init_weight_transfer_engine`
        def __init__(self) -> None:
            self.got: list[dict] = []

        def init_weight_transfer_engine(self, request) -> None:
            self.got.append(dict(request["init_info"] if isinstance(request, dict) else request.init_info))

        def payloads(self) -> list[dict]:
            return self.got

    opened = []
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", lambda info: opened.append(info) or "endpoint")
    engines = [FakeEngine.remote() for _ in range(num_engines)]
    world = 1 + num_engines * tp
    trainer = TrainerWorker.__new__(TrainerWorker)  # no process group needed for rank 0's sync set-up
    trainer.rank, trainer.device, trainer.weights = 0, torch.device("cpu"), {"w": torch.zeros(3)}
    trainer.hf_config = SimpleNamespace(tie_word_embeddings=False)
    trainer.init_nccl_sync(engines, world, "bfloat16")
    assert len(opened) == 1 and opened[0].world_size == world and opened[0].rank == 0

    # each engine worker computes its rank with vLLM's own code from the payload its engine got
    monkeypatch.setattr(nccl_common, "stateless_init_process_group", lambda addr, port, rank, world_size, device: rank)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    per_engine = []
    for got in ray.get([e.payloads.remote() for e in engines]):
        assert len(got) == 1
        info = nccl_common.NCCLWeightTransferInitInfo(**got[0])
        assert info.world_size == world and info.master_address == opened[0].master_address
        ranks = [
            nccl_common.worker_init_process_group(
                info, SimpleNamespace(data_parallel_index=0, world_size=tp, rank=tp_rank)
            )
            for tp_rank in range(tp)
        ]
        assert ranks == list(range(ranks[0], ranks[0] + tp))  # one contiguous range per engine
        per_engine.append(ranks)
    assert sorted(r for ranks in per_engine for r in ranks) == list(range(1, world))  # distinct, cover 1..world-1


# ---------------------------------------------------------------- 2. DeepSpeed's rendezvous address
@pytest.mark.slow
def test_trainer_ranks_meet_at_rank0s_address_not_the_drivers(ray_cluster, monkeypatch):
    """torch's env:// store is served by rank 0, wherever Ray puts it. Simulate a driver on another node
    (a CPU-only head under `ray job submit`): its own IP is one where nothing listens."""
    import ray

    from workers.actor_group import TrainerGroup

    unreachable = "203.0.113.1"  # TEST-NET-3: documentation only, never routed
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda *a, **k: unreachable)
    group = TrainerGroup(2, 0, 0, CPU_ENV, timeout_s=120)  # generous: a busy 2-core machine starts ranks slowly
    try:
        assert len(ray.get(group.call("memory_mb"), timeout=180)) == 2  # every rank is up
        rank0_ip, _ = ray.get(group.actors[0].rendezvous_address.remote())
        assert group.master_addr == rank0_ip != unreachable
        # the ranks formed one gloo group at rank 0's address (each all-reduced its rank + 1)
        assert [(c["rank"], c["world"], c["sum"]) for c in group.connected] == [(0, 2, 3), (1, 2, 3)]
        assert {c["master"] for c in group.connected} == {f"{group.master_addr}:{group.master_port}"}
    finally:
        group.kill()


# ---------------------------------------------------------------- 4. fp32 master weights under bf16
def _tiny_module() -> torch.nn.Module:
    # odd sizes: ZeRO-3 pads the last rank's partition (DeepSpeed's own setter trips over the padding)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    m.register_buffer("scale", torch.full((3,), 1.0 / 3.0))
    return m


def _fp32_masters_rank(rank: int, world: int, stage: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK="0",
        WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed

    from common.config import TrainConfig
    from workers.ds_engine import gather_fp32, load_fp32_masters
    from workers.trainer import TrainerWorker

    deepspeed.init_distributed(dist_backend="gloo")
    model = _tiny_module()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}  # fp32, not bf16 values
    model = model.to(torch.bfloat16)
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-9, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    load_fp32_masters(engine, w0)
    for _ in range(2):
        x = torch.randn(2, 7, dtype=torch.bfloat16)
        engine.backward((engine(x).float() * engine.module.scale).sum())
        engine.step()
    trainer = SimpleNamespace(train_cfg=TrainConfig(zero_stage=stage, bf16=True), weights=w0)
    got = gather_fp32(engine, list(w0), TrainerWorker._untrained(trainer, engine.module), masters=True)
    if rank == 0:
        torch.save({"w0": w0, "got": got}, out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_zero_keeps_fp32_master_weights(stage, tmp_path):
    """The engine starts from the fp32 weights (not their bf16 rounding) and the gather returns the fp32
    masters: with a 1e-9 learning rate the weights move by ~1e-9, far below bf16's rounding (~1e-3)."""

    from ranks import spawn_ranks

    out = str(tmp_path / "gathered.pt")
    spawn_ranks(_fp32_masters_rank, lambda port: (2, stage, port, out), nprocs=2)
    res = torch.load(out)
    w0, got = res["w0"], res["got"]
    assert list(got) == list(w0)
    rounding = max(float((v.bfloat16().float() - v).abs().max()) for v in w0.values())
    assert rounding > 1e-4  # the test means something: bf16 would lose this much
    for k, v in got.items():
        assert v.dtype == torch.float32 and v.shape == w0[k].shape
        assert float((v - w0[k]).abs().max()) < 1e-6, k


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_training_iterations_keep_fp32_weights(ray_cluster, model_path, stage):
    """End to end on two DeepSpeed ranks (gloo): a bf16 iteration with a negligible learning rate leaves the
    fp32 policy where it was; before, every iteration rounded it to bf16."""
    import ray

    from common.records import PreferenceBatch, PreferenceGroup
    from workers.actor_group import TrainerGroup

    group = TrainerGroup(2, 0, 0, CPU_ENV, timeout_s=120)
    try:
        train = {"num_workers": 2, "zero_stage": stage, "lr": 1e-9, "epochs": 1, "micro_batch_size": 2, "bf16": True}
        ray.get(group.call("setup", model_path, train, {"name": "dpo", "beta": 0.1}, 0), timeout=300)
        w0 = ray.get(group.call_rank0("get_weights"))
        groups = [PreferenceGroup(i, [5, 6, 7 + i], [[8, 9, 10], [11, 12]], [1.0, 0.0]) for i in range(4)]
        stats = ray.get(group.call("train", PreferenceBatch(groups), 1), timeout=300)
        assert all(s["steps"] > 0 for s in stats)
        w1 = ray.get(group.call_rank0("get_weights"))
    finally:
        group.kill()
    rounding = max(float((v.bfloat16().float() - v).abs().max()) for v in w0.values())
    assert rounding > 1e-4
    assert all(v.dtype == torch.float32 for v in w1.values())
    drift = max(float((w1[k] - w0[k]).abs().max()) for k in w0)
    assert drift < rounding / 100, (drift, rounding)


# ---------------------------------------------------------------- 5. TP placement groups are removed
@pytest.mark.slow
def test_engine_placement_groups_are_removed_at_shutdown(ray_cluster):
    from ray.util import placement_group_table

    from pipeline.placement import engine_placement, remove_engine_placements

    # Not waited for: the session's shared actors may hold every CPU, and a pending group must be removed too.
    groups = [engine_placement(2, 0, 0.01) for _ in range(2)]
    assert remove_engine_placements() == 2
    assert [placement_group_table(pg)["state"] for pg in groups] == ["REMOVED", "REMOVED"]
    assert remove_engine_placements() == 0  # idempotent


@pytest.mark.slow
@pytest.mark.full  # guards a bench script; fp32 masters and the bf16 sync source have tests of their own
def test_the_gpu_trainer_check_runs_on_cpu_ranks(tmp_path):
    """bench/gpu_trainer_check.py (the trainer side of the GPU path, for a GPU machine without vLLM or Ray)
    runs its checks on CPU ranks too, so it cannot rot between GPU loans: bf16 ZeRO-2 and ZeRO-3 keep the
    fp32 masters, the sync tensors are bit-exact, bf16 log-probs are close to fp32's."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "bench/gpu_trainer_check.py", "--cpu", "--hidden", "64", "--layers", "2"],
        cwd=root,
        env={**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith(("PASS", "FAIL"))]
    assert len(lines) == 8 and all(line.startswith("PASS") for line in lines), proc.stdout
    assert (tmp_path / "gpu_trainer_check.json").is_file()
