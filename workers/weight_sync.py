"""Weight sync from the trainers into every live vLLM engine, through vLLM's weight-transfer API.

- `nccl` (GPU): trainer rank 0 opens vLLM's NCCL weight-transfer group with every engine worker once per
  run (`init_nccl_sync`), then each sync is one packed, bucketed broadcast driven by vLLM's
  `NCCLTrainerWeightTransferEngine` while the engines run `update_weights` (`send_weights`). The group is
  trainer rank 0 plus `num_engines x TP` engine workers: engine i's workers are ranks 1 + i*TP .. (i+1)*TP
  (`EngineRanksClient` gives each engine its own rank offset).
- `cpu` (`workers.cpu_transfer`, registered into vLLM's `WeightTransferEngineFactory`): rank 0's full
  HF-named state dict goes through Ray's object store as numpy buffers (one copy in, read zero-copy by
  every engine on the node) and is loaded bucket by bucket with the same start/update/finish lifecycle.
"""

from __future__ import annotations

from typing import Any

import ray

from pipeline.config import SyncConfig
from workers.actor_group import TrainerGroup


def resolve_backend(cfg: SyncConfig, engines_have_gpus: bool, trainers_have_gpus: bool | None = None) -> str:
    """`auto` is NCCL only when both ends have GPUs (trainer rank 0 is an NCCL rank too); otherwise the CPU
    object-store path. `trainers_have_gpus=None` (an older call) assumes the trainers match the engines."""
    if cfg.backend == "auto":
        trainers = engines_have_gpus if trainers_have_gpus is None else trainers_have_gpus
        return "nccl" if engines_have_gpus and trainers else "cpu"
    return cfg.backend


def engine_rank_offsets(num_engines: int, world_size: int) -> list[int]:
    """NCCL rank of each engine's first worker in the sync group (rank 0 is the trainer).

    vLLM's engine worker takes rank `dp_index * TP + tp_rank + rank_offset`, and every separate `LLM` has
    data-parallel index 0, so the offset alone must keep the engines apart: engine i gets 1 + i * TP."""
    workers = world_size - 1
    if num_engines < 1 or workers < num_engines or workers % num_engines:
        raise ValueError(
            f"an NCCL sync group of {world_size} ranks cannot hold trainer rank 0 plus {num_engines} engines "
            "with the same number of workers each"
        )
    tp = workers // num_engines
    return [1 + i * tp for i in range(num_engines)]


class EngineRanksClient:
    """vLLM `VLLMWeightSyncClient` over several engine actors (`RolloutWorker` handles), like vLLM's
    `RayVLLMWeightSyncClient`, except that each engine gets its own NCCL `rank_offset` in
    `init_weight_transfer_engine` (vLLM's trainer engine sends every engine the same payload with
    `rank_offset=1`, which gives the workers of two engines the same ranks and hangs the rendezvous)."""

    def __init__(self, engines: list) -> None:
        self.handles = list(engines)

    def _all(self, method: str, *args: Any) -> None:
        ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        offsets = engine_rank_offsets(len(self.handles), init_info["world_size"])
        ray.get(
            [
                h.init_weight_transfer_engine.remote(
                    WeightTransferInitRequest(init_info={**init_info, "rank_offset": o})
                )
                for h, o in zip(self.handles, offsets, strict=True)
            ]
        )

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self._all("update_weights", WeightTransferUpdateRequest(update_info=update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")
        if weight_version is not None:
            self._all("update_weight_version", weight_version)


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
