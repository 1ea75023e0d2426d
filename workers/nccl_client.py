"""vLLM's weight-sync client for several engines, each with its own NCCL ranks (the GPU sync paths: NCCL,
and CUDA IPC, which hands out no ranks).

vLLM's engine worker takes NCCL rank `dp_index * TP + tp_rank + rank_offset`, and every separate `LLM` has
data-parallel index 0, so the group (trainer rank 0 plus num_engines x TP engine workers) needs a
different `rank_offset` per engine: engine i gets 1 + i * TP.
"""

from __future__ import annotations

from typing import Any

import ray


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

        if "world_size" not in init_info:  # no ranks to hand out (CUDA IPC): the same payload for every engine
            self._all("init_weight_transfer_engine", WeightTransferInitRequest(init_info=init_info))
            return
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
        self._all("finish_weight_update", weight_version)

    def update_weight_version(self, weight_version: str) -> None:
        """Label the weights every engine holds now, without an update."""
        self._all("update_weight_version", weight_version)
