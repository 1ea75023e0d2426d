"""Weight sync from the trainers into every live vLLM engine.

CPU backend: rank 0's full HF-named state dict goes through Ray's object store (one `ray.put`, read
zero-copy by every engine on the node) into each engine's `reload_weights`.
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
    return [e.load_weights.remote(weights_ref) for e in engines]
