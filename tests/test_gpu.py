"""GPU path (skipped without CUDA): bf16, NCCL weight transfer, a few-hundred-M-parameter model.

Run on a GPU machine with `pytest -m gpu -s tests/test_gpu.py`; record the printed figures in BENCHMARKS.md.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    import ray

    from pipeline.config import load_config
    from pipeline.driver import init_ray, prepare, run_with_workers, start_workers

    out = tmp_path_factory.mktemp("gpu")
    cfg = load_config(
        "configs/demo-cpu.yaml",
        [
            f"output_dir={out}",
            "iterations=2",
            "model.tiny_hidden_size=1024",
            "model.tiny_layers=24",
            "model.sft_steps=0",
            "model.dtype=bfloat16",
            "rollout.num_gpus=0.4",
            "train.num_gpus=0.2",
            "train.bf16=true",
            "train.zero_stage=3",
            "sync.backend=nccl",
            "data.num_train_prompts=64",
            "data.num_eval_prompts=16",
            "rollout.gpu_memory_utilization=0.3",
            "quiet=true",
        ],
    )
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


def test_nccl_sync_bandwidth(gpu_run):
    import ray

    from workers.weight_sync import sync_weights

    cfg, _, workers, _ = gpu_run
    weights = ray.get(workers.trainers.call_rank0("get_weights"))
    nbytes = sum(v.numel() * 2 for v in weights.values())  # sent as bf16
    t = time.perf_counter()
    for _ in range(3):
        ray.get(sync_weights(workers.trainers, workers.rollouts, cfg.sync, "nccl"))
    secs = (time.perf_counter() - t) / 3
    print(f"NCCL weight sync: {nbytes / 1e9:.2f} GB in {secs:.3f} s = {nbytes / secs / 1e9:.2f} GB/s")
    assert secs > 0
