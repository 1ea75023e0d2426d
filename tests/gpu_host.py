"""A simulated GPU host: every process (the driver and each Ray worker) is told that CUDA is there.

Fault injection only: torch keeps its CPU build, so anything that really asks for a CUDA tensor still fails.
What it shows is which code *decides* from `torch.cuda.is_available()` instead of from the resource plan: on
a real GPU host Ray leaves CUDA_VISIBLE_DEVICES alone for an actor given no GPU, so such code lands CPU
actors on cuda:0.

`pretend_gpu_host` runs in the driver, and in every Ray worker through `ray.init(runtime_env=
{"worker_process_setup_hook": pretend_gpu_host})` (pickled by value, so the workers need not import tests/).
"""

from __future__ import annotations

import sys


def pretend_gpu_host() -> None:
    """Make torch report one visible CUDA device in this process (unless CUDA_VISIBLE_DEVICES hides it)."""
    import os

    import torch

    def visible() -> bool:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""

    torch.cuda.is_available = visible
    torch.cuda.device_count = lambda: int(visible())


def ray_runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """A job-level runtime env that pretends a GPU host in every worker process."""
    from ray import cloudpickle  # Ray's own copy pickles the hook

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return {"worker_process_setup_hook": pretend_gpu_host, "env_vars": dict(env_vars or {})}


if __name__ == "__main__":
    # `python tests/gpu_host.py OUT_DIR [key=value ...]`: the CPU demo on a simulated GPU host, one process.
    import os

    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # what a GPU host's shell has
    pretend_gpu_host()
    import ray

    from common.config_files import load_config
    from pipeline.driver import run

    out, *overrides = sys.argv[1:]
    cfg = load_config("configs/demo-cpu.yaml", [f"output_dir={out}", *overrides])
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1 << 30,
        runtime_env=ray_runtime_env({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}),
    )
    try:
        rows = run(cfg)
    finally:
        ray.shutdown()
    print(f"iterations done: {rows[-1]['iteration']}")
