"""The CPU weight sync reloads only the modules that have weights: no "RotaryEmbedding: Failed to load
weights" nor "ParallelLMHead: Failed to load weights" (a tied head) warning at every sync; the rotary
cache stays the engine's own tensor and the tied head follows the embedding. Runs vLLM's layerwise
reload on a small model (a Linear, vLLM's RotaryEmbedding, an embedding with a tied head) through the
`onalign_cpu` backend's own lifecycle methods, without starting an engine."""

from __future__ import annotations

import logging

import pytest
import torch

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@pytest.fixture
def reload_warnings():
    handler = Recorder()
    logger = logging.getLogger(RELOAD_LOGGER)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture
def engine_model():
    """A model as a vLLM engine holds it: metadata recorded for reloading, `load_weights` through each
    parameter's weight loader."""
    from torch import nn
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.model_executor.model_loader.reload import record_metadata_for_reloading
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            with set_current_vllm_config(VllmConfig()):
                self.rotary = get_rope(8, 64, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
            self.embed = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight  # tied, as vLLM's ParallelLMHead.tie_weights does

        def load_weights(self, weights) -> set[str]:
            params = dict(self.named_parameters())
            for name, tensor in weights:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            return {name for name, _ in weights}

    model = Model()
    record_metadata_for_reloading(model)
    return model


def cpu_backend(model):
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from workers import cpu_transfer

    cpu_transfer.register()
    cls = WeightTransferEngineFactory._registry[cpu_transfer.BACKEND]
    cls = cls if isinstance(cls, type) else cls()
    engine = cls.__new__(cls)  # the lifecycle methods need only the model (and its config for attention)
    engine.model, engine.model_config = model, None
    return engine


def sync(engine, named: dict) -> None:
    from workers.cpu_transfer import CPUTransferUpdateInfo

    engine.start_weight_update()
    engine.receive_weights(CPUTransferUpdateInfo(names=list(named), tensors=list(named.values())))
    engine.finish_weight_update()


def test_cpu_sync_loads_the_weights_without_a_failed_load_warning(engine_model, reload_warnings):
    engine = cpu_backend(engine_model)
    cache = engine_model.rotary.cos_sin_cache
    before = cache.clone()
    for step in range(3):  # every sync, not only the first
        new = {
            "proj.weight": torch.full((8, 8), float(step)),
            "proj.bias": torch.arange(8.0) + step,
            "embed.weight": torch.randn(16, 8),  # the tied head's weight is sent once, as the embedding's
        }
        sync(engine, new)
        assert torch.equal(engine_model.proj.weight, new["proj.weight"])
        assert torch.equal(engine_model.proj.bias, new["proj.bias"])
        assert torch.equal(engine_model.embed.weight, new["embed.weight"])
        assert engine_model.head.weight is engine_model.embed.weight  # still tied
    assert reload_warnings == []
    assert engine_model.rotary.cos_sin_cache is cache and torch.equal(cache, before)
    assert engine_model.proj.weight.device.type == "cpu"


def test_vllms_whole_model_reload_is_what_warned(engine_model, reload_warnings):
    """The cause, kept as a check that this model reproduces it: vLLM's `initialize_layerwise_reload` on
    the whole model visits the buffer-only RotaryEmbedding and the tied head, and warns for each."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    initialize_layerwise_reload(engine_model)
    weights = [("proj.weight", torch.ones(8, 8)), ("proj.bias", torch.zeros(8)), ("embed.weight", torch.ones(16, 8))]
    engine_model.load_weights(weights)
    finalize_layerwise_reload(engine_model, None)
    assert reload_warnings == ["RotaryEmbedding: Failed to load weights", "Linear: Failed to load weights"]
