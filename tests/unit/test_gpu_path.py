"""The GPU path's plumbing, checked on CPU: NCCL ranks of several engines, the DeepSpeed
rendezvous address, fp32 master weights under bf16, placement-group clean-up and the sync backend choice.

No GPU is needed: the NCCL endpoints are stubbed where they would open, everything else is the real code
(vLLM's trainer-side NCCL engine, DeepSpeed ZeRO 2/3 with gloo, Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def test_sync_source_sends_the_engine_dtype_from_fp32_masters():
    from workers.nccl_client import state_dict_source

    weights = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    source = state_dict_source(lambda: weights, torch.bfloat16, torch.device("cpu"))
    assert [(m.name, m.dtype, m.shape) for m in source.metadata()] == [
        ("a", torch.bfloat16, (3, 2)),
        ("b", torch.bfloat16, (4,)),
    ]
    for name, t in source:
        assert t.dtype == torch.bfloat16 and torch.equal(t, weights[name].bfloat16())
    assert all(v.dtype == torch.float32 for v in weights.values())  # the masters stay fp32


# ---------------------------------------------------------------- 6. sync backend choice
def test_auto_sync_backend_needs_gpus_on_both_sides():
    from common.config import RunConfig

    def backend(engine_gpus: float, trainer_gpus: float, sync: str = "auto") -> str:
        cfg = RunConfig.model_validate(
            {"rollout": {"num_gpus": engine_gpus}, "train": {"num_gpus": trainer_gpus}, "sync": {"backend": sync}}
        )
        return cfg.sync_backend()

    assert backend(1, 1) == "nccl"
    assert backend(1, 0) == "cpu"  # NCCL needs CUDA on rank 0 too
    assert backend(0, 1) == "cpu"
    assert backend(0, 0) == "cpu"
    assert backend(1, 1, "cpu") == "cpu"


def test_tied_output_projection_is_sent_once_under_the_embedding_name():
    """Gemma2's vLLM model has no lm_head module when the embeddings are tied: sending it fails the sync."""
    from workers.weights import sync_state_dict

    emb = torch.randn(5, 3)
    weights = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": torch.ones(3)}
    tied = sync_state_dict(weights, SimpleNamespace(tie_word_embeddings=True))
    assert list(tied) == ["model.embed_tokens.weight", "model.norm.weight"]
    untied = sync_state_dict(weights, SimpleNamespace(tie_word_embeddings=False))
    assert list(untied) == list(weights)
