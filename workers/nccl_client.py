"""The GPU sync paths (NCCL, and CUDA IPC under colocation), both ends of vLLM's weight-transfer API as
onalign uses it: the trainer's sender over its state dict, and the client that reaches several engines,
each with its own NCCL ranks (CUDA IPC hands out none).

vLLM's engine worker takes NCCL rank `dp_index * TP + tp_rank + rank_offset`, and every separate `LLM` has
data-parallel index 0, so the group (trainer rank 0 plus num_engines x TP engine workers) needs a
different `rank_offset` per engine: engine i gets 1 + i * TP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from common.ports import free_port

StateDict = dict[str, torch.Tensor]


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
        import ray

        ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        if "world_size" not in init_info:  # no ranks to hand out (CUDA IPC): the same payload for every engine
            self._all("init_weight_transfer_engine", WeightTransferInitRequest(init_info=init_info))
            return
        import ray

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


def state_dict_source(weights: Callable[[], StateDict], dtype: torch.dtype, device: torch.device):
    """vLLM `WeightSource` over the trainer's full state dict: HF names, sent in the engine's dtype.

    It calls `weights` at every round, so one source serves every sync of a run."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StateDictSource(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(k, dtype, tuple(v.shape)) for k, v in weights().items()]

        def __iter__(self):
            return engine_tensors(weights(), dtype, device)

    return StateDictSource()


def engine_tensors(weights: StateDict, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) as the GPU sync paths hand them to vLLM's producers: each fp32 weight cast to the
    engine's dtype on the sending device (bench/gpu_trainer_check.py checks them bit for bit)."""
    for k, v in weights.items():
        yield k, v.to(device=device, dtype=dtype, non_blocking=True)


def nccl_sender(engines: list, world_size: int, source):
    """Trainer rank 0's end of vLLM's NCCL weight-transfer group with every engine worker.

    `world_size` is 1 + num_engines x TP; engine i's workers take ranks 1 + i*TP .. (i+1)*TP
    (`EngineRanksClient`). The store is served here, on rank 0's node."""
    import ray
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    info = NCCLTrainerInitInfo(
        master_address=ray.util.get_node_ip_address(), master_port=free_port(), world_size=world_size, rank=0
    )
    return WeightTransferTrainerFactory.trainer_init(info, client=EngineRanksClient(engines), source=source)


def ipc_sender(engines: list, rank: int, source):
    """Every trainer rank's end of vLLM's CUDA IPC weight transfer to the engines on the trainer ranks' GPUs
    (`placement: colocate`; packed: one bounded staging buffer; rank 0 ships the gathered handles)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

    info = IPCTrainerInitInfo(rank=rank, packed=True)
    return WeightTransferTrainerFactory.trainer_init(info, client=EngineRanksClient(engines), source=source)
