"""Weight sync from the trainers into every live vLLM engine.

CPU backend (`workers.cpu_transfer`, registered into vLLM's weight-transfer factory): rank 0's full
HF-named state dict goes through Ray's object store (read zero-copy by every engine on the node) and is
loaded bucket by bucket with vLLM's start/update/finish weight-update lifecycle.
"""

from __future__ import annotations

import ray

from pipeline.config import SyncConfig
from workers.actor_group import TrainerGroup


def resolve_backend(cfg: SyncConfig, engines_have_gpus: bool) -> str:
    if cfg.backend == "auto":
        return "nccl" if engines_have_gpus else "cpu"
    return cfg.backend


def sync_weights(trainers: TrainerGroup, engines: list, cfg: SyncConfig) -> list[ray.ObjectRef]:
    """Start the sync; returns refs that resolve when every engine holds the new weights."""
    weights_ref = trainers.call_rank0("get_weights")
    return [e.load_weights.remote(weights_ref, cfg.bucket_mb) for e in engines]
