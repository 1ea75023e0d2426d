"""Weight sync from the trainers into every live vLLM engine, through vLLM's weight-transfer API.

- `nccl` (GPU): trainer rank 0 opens vLLM's NCCL weight-transfer group with every engine worker once per
  run (`init_nccl_sync`), then each sync is one packed, bucketed broadcast driven by vLLM's
  `NCCLTrainerWeightTransferEngine` while the engines run `update_weights` (`send_weights`). The group is
  trainer rank 0 plus `num_engines x TP` engine workers: engine i's workers are ranks 1 + i*TP .. (i+1)*TP
  (`workers.nccl_client.EngineRanksClient` gives each engine its own rank offset).
- `ipc` (GPU, `placement: colocate`): every trainer rank hands vLLM's CUDA IPC backend handles to the weights
  on its own GPU; rank 0 ships them to the engines, each of which maps those of its GPU (no copy between
  devices). Packed: one bounded staging buffer per rank.
- `cpu` (`workers.cpu_transfer`, registered into vLLM's `WeightTransferEngineFactory`): rank 0's full
  HF-named state dict goes through Ray's object store as numpy buffers (one copy in, read zero-copy by
  every engine on the node) and is loaded bucket by bucket with the same start/update/finish lifecycle.
"""

from __future__ import annotations

import ray

from common.config import SyncConfig
from workers.actor_group import TrainerGroup


def init_sync(trainers: TrainerGroup, engines: list, backend: str, engine_workers: int, dtype: str) -> list:
    """Once per run, on GPUs: the NCCL rendezvous between trainer rank 0 and every engine worker
    (`engine_workers` is num_engines x TP: the group has 1 + engine_workers ranks), or the CUDA IPC set-up on
    every trainer rank (each contributes the handles of its own GPU, rank 0 ships them)."""
    if backend == "nccl":
        return [trainers.call_rank0("init_nccl_sync", engines, 1 + engine_workers, dtype)]
    if backend == "ipc":
        return trainers.call("init_ipc_sync", engines, dtype)
    return []


def sync_weights(trainers: TrainerGroup, engines: list, cfg: SyncConfig, backend: str = "cpu") -> list[ray.ObjectRef]:
    """Start the sync; returns refs that resolve when every engine holds the new weights."""
    if backend == "nccl":
        return [trainers.call_rank0("send_weights")]
    if backend == "ipc":  # a collective over the trainer ranks (the handle all-gather)
        return trainers.call("send_weights")
    weights_ref = trainers.call_rank0("weights_for_sync")
    return [e.load_weights.remote(weights_ref, cfg.bucket_mb) for e in engines]
