"""Weight sync from the trainers into every live vLLM engine, through vLLM's weight-transfer API.

- `nccl` (GPU): trainer rank 0 opens vLLM's NCCL weight-transfer group with every engine worker once per
  run (`init_nccl_sync`), then each sync is one packed, bucketed broadcast driven by vLLM's
  `NCCLTrainerWeightTransferEngine` while the engines run `update_weights` (`send_weights`).
- `cpu` (`workers.cpu_transfer`, registered into vLLM's `WeightTransferEngineFactory`): rank 0's full
  HF-named state dict goes through Ray's object store as numpy buffers (one copy in, read zero-copy by
  every engine on the node) and is loaded bucket by bucket with the same start/update/finish lifecycle.
"""

from __future__ import annotations

import ray

from pipeline.config import SyncConfig
from workers.actor_group import TrainerGroup


def resolve_backend(cfg: SyncConfig, engines_have_gpus: bool) -> str:
    if cfg.backend == "auto":
        return "nccl" if engines_have_gpus else "cpu"
    return cfg.backend


def init_sync(trainers: TrainerGroup, engines: list, backend: str, engine_workers: int, dtype: str) -> list:
    """Once per run: the NCCL rendezvous between trainer rank 0 and every engine worker (GPU only)."""
    if backend != "nccl":
        return []
    return [trainers.call_rank0("init_nccl_sync", engines, 1 + engine_workers, dtype)]


def sync_weights(trainers: TrainerGroup, engines: list, cfg: SyncConfig, backend: str = "cpu") -> list[ray.ObjectRef]:
    """Start the sync; returns refs that resolve when every engine holds the new weights."""
    if backend == "nccl":
        return [trainers.call_rank0("send_weights")]
    weights_ref = trainers.call_rank0("weights_for_sync")
    return [e.load_weights.remote(weights_ref, cfg.bucket_mb) for e in engines]
