"""On a GPU host, every actor computes where the resource plan puts it.

A GPU host is simulated by telling torch that CUDA is there (tests/gpu_host.py): Ray 2.60 leaves
CUDA_VISIBLE_DEVICES alone for an actor given no GPU, so an actor that asks `torch.cuda.is_available()`
instead of the plan puts the CPU demo's two DeepSpeed ranks on one GPU ("Duplicate GPU detected")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common.config import RewardConfig, RolloutConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda_everywhere(monkeypatch):
    """This process believes a CUDA device is visible, whatever CUDA_VISIBLE_DEVICES says."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "DS_ACCELERATOR"):  # restored after the trainer sets them
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)


def test_actors_given_no_gpu_see_none():
    """Their start-up environment hides every GPU; actors given GPUs keep what Ray assigns them."""
    from workers.actor_group import trainer_env
    from workers.rollout import engine_env

    assert trainer_env(TrainConfig())["CUDA_VISIBLE_DEVICES"] == ""
    assert engine_env(RolloutConfig())["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in trainer_env(TrainConfig(num_gpus=1))
    assert "CUDA_VISIBLE_DEVICES" not in engine_env(RolloutConfig(num_gpus=1))
    # an engine with TP > 1 runs in a placement group with num_gpus=0 itself: its Ray TP workers need the GPUs
    assert "CUDA_VISIBLE_DEVICES" not in engine_env(RolloutConfig(num_gpus=1, tensor_parallel_size=2))


def test_reward_actor_given_no_gpu_sees_none():
    from rewards.actor import reward_actor_options

    assert reward_actor_options(RewardConfig())["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    opts = reward_actor_options(RewardConfig(num_gpus=1))
    assert opts["num_gpus"] == 1 and "CUDA_VISIBLE_DEVICES" not in opts["runtime_env"]["env_vars"]


def test_trainer_device_follows_the_plan(cuda_everywhere):
    from workers.trainer import TrainerWorker

    worker = TrainerWorker(0, 1, 60, num_gpus=0)
    assert worker.device == torch.device("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_engine_settings_follow_the_plan(cuda_everywhere):
    """A CPU engine's settings (its KV cache in bytes, whole-prompt prefill, the CPU weight-transfer backend's
    eager init) even where torch sees a GPU."""
    from workers.rollout import engine_settings

    cpu = engine_settings(RolloutConfig(), "cpu")
    assert cpu.on_gpu is False and cpu.kwargs["enable_chunked_prefill"] is False
    assert "gpu_memory_utilization" not in cpu.kwargs and cpu.kwargs["kv_cache_memory_bytes"] == 256 * 2**20
    gpu = engine_settings(RolloutConfig(num_gpus=1), "nccl")
    assert gpu.on_gpu is True and gpu.kwargs["gpu_memory_utilization"] == 0.5
    assert gpu.kwargs["weight_transfer_config"] == {"backend": "nccl"}


def test_reward_model_device_follows_the_plan(cuda_everywhere):
    from pipeline.tiny_reward_model import tiny_reward_model_path
    from rewards.model import ModelScorer

    scorer = ModelScorer(RewardConfig(kind="model", model_path=str(tiny_reward_model_path())))
    assert scorer.device == torch.device("cpu") and next(scorer.model.parameters()).dtype == torch.float32


def test_a_gpu_plan_without_cuda_is_one_clear_error():
    """An actor the plan gives a GPU that sees none (a CPU build of torch, a driver problem) says so."""
    from common.devices import plan_device
    from common.errors import OnalignError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(OnalignError, match="given 1 GPU by the plan.*sees no CUDA device"):
        plan_device(1, "trainer rank 0")


def test_colocated_gpu_engines_have_sleep_mode_and_the_ipc_backend():
    from workers.rollout import engine_settings

    gpu = engine_settings(RolloutConfig(num_gpus=0.5), "ipc", colocated=True)
    assert gpu.kwargs["enable_sleep_mode"] is True and gpu.kwargs["weight_transfer_config"] == {"backend": "ipc"}
    cpu = engine_settings(RolloutConfig(), "cpu", colocated=True)
    assert "enable_sleep_mode" not in cpu.kwargs  # vLLM refuses sleep mode on CPU; its sleep is a no-op there
