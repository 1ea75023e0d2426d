"""Shared fixtures: one local Ray cluster, one tiny model, one set of heavy actors (vLLM engine +
2 DeepSpeed ranks) for the whole session; each end-to-end test starts its own run on them."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from common.config_files import load_config  # noqa: E402

TEST_OVERRIDES = [
    "data.num_train_prompts=48",
    "data.num_eval_prompts=16",
    "train.micro_batch_size=8",
    "train.epochs=1",
    "quiet=true",
    "tensorboard=true",
]


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def make_cfg(tmp_path, *overrides: str, config: str | None = "configs/demo-cpu.yaml"):
    return load_config(config, [*TEST_OVERRIDES, f"output_dir={tmp_path}", *overrides])


@pytest.fixture(scope="session")
def tiny_cfg():
    """`tiny_cfg(out_dir, *overrides, config=...)`: a validated test-sized config."""
    return make_cfg


def gpu_settings(out: str, num_gpus: int) -> list[str]:
    """The run's settings on a machine with `num_gpus` GPUs: whole GPUs, one engine, 1-2 trainer ranks."""
    return [
        f"output_dir={out}",
        "iterations=2",
        "model.tiny_hidden_size=1024",
        "model.tiny_layers=24",
        "model.sft_steps=0",
        "model.dtype=bfloat16",
        "rollout.num_gpus=1",
        f"train.num_workers={max(1, min(2, num_gpus - 1))}",
        "train.num_gpus=1",
        "train.bf16=true",
        "train.zero_stage=3",
        "sync.backend=nccl",
        "data.num_train_prompts=64",
        "data.num_eval_prompts=16",
        "rollout.gpu_memory_utilization=0.5",
        "quiet=true",
    ]


@pytest.fixture(scope="session")
def gpu_overrides():
    """`gpu_overrides(out, num_gpus)`: the GPU tests' settings (`gpu_settings`)."""
    return gpu_settings


@pytest.fixture(scope="session")
def model_path() -> str:
    from pipeline.tiny_model import tiny_model_path

    return str(tiny_model_path())


# `ONALIGN_TEST_GPU_HOST=1 make test`: the whole suite on a simulated GPU host (tests/gpu_host.py): the test
# process and every Ray worker believe a CUDA device is visible; every actor must still compute where the plan
# puts it.
SIMULATED_GPU_HOST = os.environ.get("ONALIGN_TEST_GPU_HOST") == "1"


@pytest.fixture(scope="session", autouse=True)
def simulated_gpu_host():
    if SIMULATED_GPU_HOST:  # after collection, so the `gpu` tests stay skipped
        from gpu_host import pretend_gpu_host

        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
        pretend_gpu_host()
    yield


@pytest.fixture(scope="session")
def rm_path() -> str:
    """The built-in tiny reward model (`builtin:tiny-rm`), built once and cached."""
    from pipeline.tiny_reward_model import tiny_reward_model_path

    return str(tiny_reward_model_path())


# A reward module whose functions fail in each way a reward can; `switch` follows the .mode file beside it.
FAULTY = """
import math
import pathlib

from rewards.functions import reverse_reward

def switch(prompts, responses, references):
    # The function named in the .mode file beside this one (a resume must keep reward.function unchanged).
    mode = pathlib.Path(__file__).with_suffix(".mode")
    name = mode.read_text().strip() if mode.exists() else "reverse_reward"
    return globals()[name](prompts, responses, references)
def boom(prompts, responses, references):
    raise RuntimeError("reward server unreachable")
def nan(prompts, responses, references):
    return [float("nan") if i == 3 else 0.5 for i in range(len(responses))]
def inf(prompts, responses, references):
    return [math.inf] * len(responses)
def short(prompts, responses, references):
    return [0.0]
def tied(prompts, responses, references):
    return [1.0] * len(responses)
"""


@pytest.fixture(scope="session")
def faulty(tmp_path_factory) -> str:
    """A reward module whose functions fail in each way a reward can (`reward.function=FILE:NAME`)."""
    path = tmp_path_factory.mktemp("rewards") / "faulty.py"
    path.write_text(FAULTY)
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    env_vars = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if SIMULATED_GPU_HOST:
        from gpu_host import ray_runtime_env

        runtime_env = ray_runtime_env(env_vars)
    else:
        runtime_env = {"env_vars": env_vars}
    # address="local": a new cluster of its own, never another one running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1 << 30, runtime_env=runtime_env)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def workers(ray_cluster, model_path, tmp_path_factory):
    from pipeline.driver import start_workers

    cfg = make_cfg(tmp_path_factory.mktemp("workers"))
    w = start_workers(cfg, model_path)
    yield w
    w.shutdown()


@pytest.fixture
def run_tiny(workers, tmp_path):
    """Run the tiny demo config with overrides on the shared actors; returns (rows, run_dir)."""
    from pipeline.driver import run_with_workers
    from pipeline.preflight import prepare

    def _run(*overrides: str, out=None):
        cfg = make_cfg(out or tmp_path, *overrides)
        rows = run_with_workers(prepare(cfg), workers)
        return rows, cfg.output_dir

    return _run
