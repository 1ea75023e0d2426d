"""The rollout actor's start-up environment: tcmalloc preloaded for CPU engines when installed."""

from __future__ import annotations

import pytest

from common.config import RolloutConfig
from workers.rollout import engine_env


@pytest.mark.slow
def test_the_shared_engine_keeps_vllm_default_scheduler_limits(workers):
    """Unset, vLLM's own CPU default (256 sequences an engine: P5's 64 prompts x 4 samples in one batch)
    and a prefill budget of max(8192, max_model_len) tokens."""
    import ray

    limits = ray.get(workers.rollouts[0].scheduler_limits.remote())
    assert limits == {"max_num_seqs": 256, "max_num_batched_tokens": 8192}


@pytest.mark.slow
def test_an_engine_with_fewer_sequences_than_samples_decodes_them_in_waves(ray_cluster, model_path):
    """`rollout.max_num_seqs` below prompts x n: every sample still comes back, decoded a wave at a time."""
    import ray

    from workers.rollout import RolloutWorker

    cfg = RolloutConfig(max_model_len=256, kv_cache_mb=32, max_num_seqs=4, max_num_batched_tokens=512)
    engine = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0, runtime_env={"env_vars": engine_env(RolloutConfig())})
        .remote(model_path, cfg.model_dump(), "float32", 0, "cpu")
    )
    try:
        assert ray.get(engine.scheduler_limits.remote(), timeout=600) == {
            "max_num_seqs": 4,
            "max_num_batched_tokens": 512,
        }
        outs = ray.get(engine.generate.remote([[5, 6, 7]] * 6, list(range(6)), 2, 1.0, 1.0, 8, 0, 0), timeout=600)
    finally:
        ray.kill(engine, no_restart=True)
    assert sorted(o.prompt_index for o in outs) == [i for i in range(6) for _ in range(2)]
    assert all(0 < len(o.response_ids) <= 8 and o.sample_logprob is not None for o in outs)
