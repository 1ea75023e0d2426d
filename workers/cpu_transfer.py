"""The project's CPU weight-transfer backend, registered into vLLM's own weight-transfer factory.

CPU tests thereby drive the same engine-side lifecycle the cluster uses with the `nccl` backend
(`init_weight_transfer_engine` -> `start_weight_update` -> `update_weights` per bucket ->
`finish_weight_update`), only the transport differs: the HF-named tensors of a bucket arrive through
Ray's object store into the engine actor (in-process engine core, so no copy on the way in) instead of
an NCCL broadcast. Checkpoint-format (HF) names are loaded with vLLM's layerwise reload, as the IPC
backend does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

BACKEND = "onalign_cpu"


@dataclass
class CPUTransferInitInfo:
    pass


@dataclass
class CPUTransferUpdateInfo:
    names: list[str] = field(default_factory=list)
    tensors: list[Any] = field(default_factory=list)


def register() -> None:
    """Register the backend once per process (engine side)."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND in WeightTransferEngineFactory._registry:
        return

    class CPUObjectStoreWeightTransferEngine(WeightTransferEngine[CPUTransferInitInfo, CPUTransferUpdateInfo]):
        init_info_cls = CPUTransferInitInfo
        update_info_cls = CPUTransferUpdateInfo

        def init_transfer_engine(self, init_info: CPUTransferInitInfo) -> None:
            """No rendezvous: the object store is already shared with the trainers."""

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            self.receive_weights(self.parse_update_info(update_info))  # CPU: nothing to synchronise

        def receive_weights(self, update_info: CPUTransferUpdateInfo) -> None:
            if len(update_info.names) != len(update_info.tensors):
                raise ValueError("weight update: names and tensors differ in length")
            self.model.load_weights(list(zip(update_info.names, update_info.tensors, strict=True)))

        def shutdown(self) -> None:
            pass

    WeightTransferEngineFactory.register_engine(BACKEND, CPUObjectStoreWeightTransferEngine)


def buckets(named: dict, bucket_bytes: int) -> list[tuple[list[str], list]]:
    """Split a state dict into buckets of at most `bucket_bytes` (a tensor larger than that goes alone)."""
    out: list[tuple[list[str], list]] = []
    names: list[str] = []
    tensors: list = []
    size = 0
    for name, t in named.items():
        nbytes = t.numel() * t.element_size()
        if names and size + nbytes > bucket_bytes:
            out.append((names, tensors))
            names, tensors, size = [], [], 0
        names.append(name)
        tensors.append(t)
        size += nbytes
    if names:
        out.append((names, tensors))
    return out


def to_wire(named: dict) -> dict[str, tuple[Any, str]]:
    """CPU tensors as numpy views (no copy) for Ray: the object store takes numpy buffers with a single
    copy and hands them to readers on the node without another, which pickled torch tensors do not get.
    bf16 has no numpy dtype and travels as its int16 bits."""
    import torch

    out = {}
    for name, t in named.items():
        t = t.detach().contiguous()
        out[name] = (t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy(), str(t.dtype))
    return out


def from_wire(wire: dict[str, tuple[Any, str]]) -> dict:
    """Tensors viewing `to_wire`'s arrays (read-only views into the object store; vLLM copies from them)."""
    import torch

    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (array, dtype) in wire.items():
            t = torch.from_numpy(array)
            out[name] = t.view(torch.bfloat16) if dtype == "torch.bfloat16" else t
    return out
