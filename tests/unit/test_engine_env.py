"""The rollout actor's start-up environment: tcmalloc preloaded for CPU engines when installed."""

from __future__ import annotations

import os

import pytest

from common.config import RolloutConfig
from workers.heap import TCMALLOC_PATHS
from workers.rollout import ENGINE_ENV, engine_env


def test_cpu_engine_preloads_tcmalloc_when_installed():
    env = engine_env(RolloutConfig())
    installed = [p for p in TCMALLOC_PATHS if os.path.isfile(p)]
    if installed:
        assert env["LD_PRELOAD"].split(":")[0] == installed[0]
    else:
        assert "LD_PRELOAD" not in env or env["LD_PRELOAD"] == os.environ.get("LD_PRELOAD")
    assert {k: env[k] for k in ENGINE_ENV} == ENGINE_ENV


def test_no_preload_when_switched_off_or_on_gpu():
    for cfg in (RolloutConfig(cpu_preload_tcmalloc=False), RolloutConfig(num_gpus=1)):
        assert "LD_PRELOAD" not in engine_env(cfg)


def test_cpu_trainers_preload_tcmalloc_when_installed_and_not_on_gpu():
    """The trainer ranks get the same preload (bench/memory_profile.py: SmolLM2's training call 94.9 s with
    glibc's heap, 75.9 s with tcmalloc), unless switched off or on GPUs."""
    from common.config import TrainConfig
    from workers.actor_group import trainer_env

    env = trainer_env(TrainConfig())
    installed = [p for p in TCMALLOC_PATHS if os.path.isfile(p)]
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"
    if installed:
        assert env["LD_PRELOAD"].split(":")[0] == installed[0]
    for cfg in (TrainConfig(cpu_preload_tcmalloc=False), TrainConfig(num_gpus=1)):
        assert "LD_PRELOAD" not in trainer_env(cfg)
    assert "DS_ACCELERATOR" not in trainer_env(TrainConfig(num_gpus=1))


def test_response_text_leaves_out_the_token_that_stopped_it():
    """vLLM's own text leaves out the EOS or stop token that ended a completion, special or not (a stop id
    from generation_config may be an ordinary token); a completion cut at max_tokens keeps every token."""
    from types import SimpleNamespace

    from workers.rollout import response_text_ids

    assert response_text_ids(SimpleNamespace(token_ids=[5, 6, 2], finish_reason="stop")) == [5, 6]
    assert response_text_ids(SimpleNamespace(token_ids=[5, 6, 7], finish_reason="length")) == [5, 6, 7]
    assert response_text_ids(SimpleNamespace(token_ids=[], finish_reason="stop")) == []


def test_scheduler_limits_are_validated_where_the_engine_would_fail():
    """CPU engines prefill whole prompts (chunked prefill off), so a step must fit the longest one."""
    from pydantic import ValidationError

    assert RolloutConfig(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=512).max_num_seqs == 64
    with pytest.raises(ValidationError, match="max_num_batched_tokens.*at least rollout.max_model_len"):
        RolloutConfig(max_num_batched_tokens=256, max_model_len=512)
    assert RolloutConfig(max_num_batched_tokens=256, max_model_len=512, num_gpus=1).max_num_batched_tokens == 256
    # vLLM schedules at least one token of each sequence a step, on every platform
    with pytest.raises(ValidationError, match="max_num_batched_tokens.*at least rollout.max_num_seqs"):
        RolloutConfig(max_num_seqs=1024, max_num_batched_tokens=512, max_model_len=512, num_gpus=1)


def test_cpu_prefill_budget_covers_every_sequence():
    """Unset on CPU, the step budget is max(8192, max_model_len), raised to max_num_seqs when that is larger."""
    from workers.rollout import cpu_batched_tokens

    assert cpu_batched_tokens(RolloutConfig()) == 8192
    assert cpu_batched_tokens(RolloutConfig(max_model_len=10000)) == 10000
    assert cpu_batched_tokens(RolloutConfig(max_num_seqs=16384)) == 16384
    assert cpu_batched_tokens(RolloutConfig(max_num_batched_tokens=600, max_model_len=512)) == 600
