"""Where an actor computes: the resource plan decides, never `torch.cuda.is_available()`.

Ray (2.60) leaves CUDA_VISIBLE_DEVICES as it is for an actor given no GPU, so on a GPU host such an actor
sees every GPU of its node: asking torch would put the CPU demo's two DeepSpeed ranks on cuda:0 (NCCL:
"Duplicate GPU detected"), CPU trainers beside GPU engines on an engine's GPU, and a CPU reward model on
cuda:0. So an actor given no GPU starts with CUDA_VISIBLE_DEVICES="" (`hidden_gpus_env`) and computes on the
CPU (`plan_device`); an actor given GPUs sees the ones Ray assigned it and computes on the first.
"""

from __future__ import annotations

import os

import torch

from common.errors import OnalignError


class DeviceError(OnalignError, RuntimeError):
    """An actor the plan gives a GPU that sees none."""


def hidden_gpus_env(num_gpus: float) -> dict[str, str]:
    """Start-up environment of an actor given `num_gpus` GPUs: none visible when it has none (libraries that
    look for a GPU themselves, DeepSpeed's accelerator and vLLM's platform among them, then find none)."""
    return {} if num_gpus > 0 else {"CUDA_VISIBLE_DEVICES": ""}


def plan_device(num_gpus: float, who: str) -> torch.device:
    """The device of an actor (`who`, for the message) that the plan gives `num_gpus` GPUs."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"{who} is given {num_gpus:g} GPU by the plan but sees no CUDA device (CUDA_VISIBLE_DEVICES={visible!r}, "
            f"torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); install the CUDA build of "
            "torch on that node, or set its num_gpus=0 to run it on the CPU"
        )
    return torch.device("cuda", torch.cuda.current_device())
