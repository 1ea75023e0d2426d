"""Bringing your own model: what a real chat model's files need from the pipeline (offline, tiny models)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def llama3_style_tokenizer(model_path):
    """The tiny tokenizer re-dressed the Llama-3 way: eos_token is end-of-text while turns end with an
    end-of-turn token that only the chat template (and generation_config) knows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.eos_token = "<|endoftext|>"
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def test_sft_target_ends_with_the_templates_end_of_turn_not_eos(llama3_style_tokenizer):
    from common.config import DataConfig
    from pipeline.data import render

    tok = llama3_style_tokenizer
    out = render([{"prompt": "reverse: abc", "response": "cba"}], tok, DataConfig(), "data.train")
    assert tok.decode(out.sft_ids[0]) == "cba<|im_end|>"  # was 'cba<|endoftext|>'


def test_tiny_models_target_is_unchanged(model_path):
    from transformers import AutoTokenizer

    from common.config import DataConfig
    from pipeline.data import render

    tok = AutoTokenizer.from_pretrained(model_path)
    out = render([{"prompt": "reverse: hello", "response": "olleh"}], tok, DataConfig(), "data.train")
    assert out.sft_ids[0] == tok("olleh", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_default_max_prompt_length_is_what_the_context_leaves():
    from common.config_files import load_config

    cfg = load_config(None, ["rollout.max_model_len=512", "rollout.max_new_tokens=64"])
    assert cfg.data.max_prompt_length == 448


def test_all_prompts_too_long_names_the_setting(model_path, tmp_path):
    from transformers import AutoTokenizer

    from common.config import DataConfig
    from pipeline.data import DataError, render

    tok = AutoTokenizer.from_pretrained(model_path)
    with pytest.raises(DataError, match="longer than data.max_prompt_length=8 tokens.*long_prompts=truncate"):
        render([{"prompt": "reverse: abcdef"}], tok, DataConfig(max_prompt_length=8), "data.train")


def test_reward_module_name_suggests_the_file_form(tmp_path, monkeypatch):
    from rewards.scorers import RewardError, load_function

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.py").write_text("def fn(:\n")
    with pytest.raises(RewardError, match=r"reward.function=myreward.py:fn"):
        load_function("myreward:fn")
    with pytest.raises(RewardError, match=r"bad.py, line 1: .*fix the reward file"):
        load_function("bad.py:fn")


def test_checkpoint_keeps_the_models_generation_config_and_tokenizer_files(model_path, tmp_path):
    """A stop-token list that lives only in generation_config.json must survive a checkpoint."""
    import shutil

    from workers.trainer import TrainerWorker

    own = tmp_path / "own-model"
    shutil.copytree(model_path, own)
    gen = json.loads((own / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], 0]
    (own / "generation_config.json").write_text(json.dumps(gen))
    trainer = TrainerWorker(0, 1)
    trainer.setup(str(own), {}, {"name": "dpo"}, seed=0)
    trainer.save(str(tmp_path / "ckpt"))
    saved = tmp_path / "ckpt" / "policy"
    assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == gen["eos_token_id"]
    assert (saved / "tokenizer_config.json").read_bytes() == (own / "tokenizer_config.json").read_bytes()
