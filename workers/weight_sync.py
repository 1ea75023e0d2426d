"""Weight sync from the trainers into every live vLLM engine, through vLLM's weight-transfer API.

- `nccl` (GPU): trainer rank 0 opens vLLM's NCCL weight-transfer group with every engine worker once per
  run (`init_nccl_sync`), then each sync is one packed, bucketed broadcast driven by vLLM's
  `NCCLTrainerWeightTransferEngine` while the engines run `update_weights` (`send_weights`). The group is
  trainer rank 0 plus `num_engines x TP` engine workers: engine i's workers are ranks 1 + i*TP .. (i+1)*TP
  (`workers.nccl_client.EngineRanksClient` gives each engine its own rank offset).
- `cpu` (`workers.cpu_transfer`, registered into vLLM's `WeightTransferEngineFactory`): rank 0's full
  HF-named state dict goes through Ray's object store as numpy buffers (one copy in, read zero-copy by
  every engine on the node) and is loaded bucket by bucket with the same start/update/finish lifecycle.
"""

from __future__ import annotations

import ray

from common.config import SyncConfig
from workers.actor_group import TrainerGroup


def resolve_backend(cfg: SyncConfig, engines_have_gpus: bool, trainers_have_gpus: bool | None = None) -> str:
    """`auto` is NCCL only when both ends have GPUs (trainer rank 0 is an NCCL rank too); otherwise the CPU
    object-store path. `trainers_have_gpus=None` (an older call) assumes the trainers match the engines."""
    if cfg.backend == "auto":
        trainers = engines_have_gpus if trainers_have_gpus is None else trainers_have_gpus
        return "nccl" if engines_have_gpus and trainers else "cpu"
    return cfg.backend


def init_sync(trainers: TrainerGroup, engines: list, backend: str, engine_workers: int, dtype: str) -> list:
    """Once per run: the NCCL rendezvous between trainer rank 0 and every engine worker (GPU only).

    `engine_workers` is num_engines x TP: the group has 1 + engine_workers ranks."""
    if backend != "nccl":
        return []
    return [trainers.call_rank0("init_nccl_sync", engines, 1 + engine_workers, dtype)]


def sync_weights(trainers: TrainerGroup, engines: list, cfg: SyncConfig, backend: str = "cpu") -> list[ray.ObjectRef]:
    """Start the sync; returns refs that resolve when every engine holds the new weights."""
    if backend == "nccl":
        return [trainers.call_rank0("send_weights")]
    weights_ref = trainers.call_rank0("weights_for_sync")
    return [e.load_weights.remote(weights_ref, cfg.bucket_mb) for e in engines]
