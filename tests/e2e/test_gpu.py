"""GPU path (skipped without CUDA): bf16, NCCL weight transfer, a few-hundred-M-parameter model.

Run on a GPU machine with `pytest -m gpu -s tests/e2e/test_gpu.py`; record the printed figures in BENCHMARKS.md.
Every NCCL rank gets a whole GPU (two ranks of one communicator may not share a device, and the planner
refuses it): one for the engine and one or two for the ZeRO-3 ranks, so it needs at least 2 GPUs. One-GPU
colocation (vLLM's `ipc` weight-transfer backend) runs with configs/gpu-1x-smollm2.yaml.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, gpu_overrides):
    import ray
    import torch

    from common.config_files import load_config
    from pipeline.driver import init_ray, run_with_workers, start_workers
    from pipeline.preflight import prepare

    num_gpus = torch.cuda.device_count()
    if num_gpus < 2:
        pytest.skip("needs 2 GPUs: the engine and a trainer rank each take a whole GPU (NCCL sync)")
    out = tmp_path_factory.mktemp("gpu")
    cfg = load_config("configs/demo-cpu.yaml", gpu_overrides(str(out), num_gpus))
    init_ray(cfg)
    prep = prepare(cfg)
    workers = start_workers(cfg, prep.model_path)
    rows = run_with_workers(prep, workers)
    yield cfg, prep, workers, rows
    workers.shutdown()
    ray.shutdown()


def test_two_bf16_iterations_with_nccl_sync(gpu_run):
    _, _, _, rows = gpu_run
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(r["train_steps"] > 0 and r["time_sync_s"] > 0 for r in rows[1:])


def test_engine_logprobs_equal_trainer_after_nccl_sync_bf16(gpu_run):
    import ray

    _, prep, workers, _ = gpu_run
    prompts = prep.train.prompt_ids[:8]
    responses = [p[-6:] for p in prompts]
    trainer = ray.get(workers.trainers.call_rank0("sequence_logprobs", prompts, responses))
    engine = ray.get(workers.rollouts[0].response_logprobs.remote(prompts, responses))
    # bf16 engine vs fp32 master weights: per-sequence sums of ~6 tokens agree to a few hundredths
    assert engine == pytest.approx(trainer, abs=0.25)


def device_copy_gbps(nbytes: int) -> float:
    """The reference for the sync: a device-to-device copy of the same bytes on one GPU."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    return nbytes * 5 / (time.perf_counter() - t) / 1e9


def test_nccl_sync_delivers_new_weights_at_gpu_speed(gpu_run):
    """Perturbed trainer weights reach the engine (its log-probs follow the trainer's, not the old ones) at a
    GPU-class rate, printed beside a device-to-device copy; the original weights are synced back afterwards."""
    import ray
    import torch

    from workers.weight_sync import sync_weights

    cfg, prep, workers, _ = gpu_run
    trainers, engine = workers.trainers, workers.rollouts[0]
    prompts = prep.train.prompt_ids[:8]
    responses = [p[-6:] for p in prompts]
    weights = ray.get(trainers.call_rank0("get_weights"))
    nbytes = sum(v.numel() * 2 for v in weights.values())  # sent as bf16
    before = ray.get(engine.response_logprobs.remote(prompts, responses))
    g = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
        for k, v in weights.items()
    }
    try:
        ray.get(trainers.call("set_weights", noisy))
        t = time.perf_counter()
        for _ in range(3):
            ray.get(sync_weights(trainers, workers.rollouts, cfg.sync, "nccl"))
        secs = (time.perf_counter() - t) / 3
        after = ray.get(engine.response_logprobs.remote(prompts, responses))
        trainer = ray.get(trainers.call_rank0("sequence_logprobs", prompts, responses))
    finally:
        ray.get(trainers.call("set_weights", weights))
        ray.get(sync_weights(trainers, workers.rollouts, cfg.sync, "nccl"))
    gbps, copy_gbps = nbytes / secs / 1e9, device_copy_gbps(nbytes)
    print(
        f"NCCL weight sync: {nbytes / 1e9:.2f} GB in {secs:.3f} s = {gbps:.2f} GB/s "
        f"(device-to-device copy of the same bytes: {copy_gbps:.1f} GB/s)"
    )
    assert after == pytest.approx(trainer, abs=0.25)  # the engine holds the new weights ...
    assert after != pytest.approx(before, abs=0.25)  # ... which are not the old ones
    assert gbps > 1.0  # a floor far below PCIe and NVLink rates: under it the sync is broken, not slow
