"""TRL's dataset formats (standard and conversational), saved DatasetDicts, and parse errors that name the line."""

from __future__ import annotations

import json

import pytest

from common.config import DataConfig
from pipeline.data import DataError, load_prompt_sets

WORDS = [f"w{i:02d}x" for i in range(30)]


@pytest.fixture(scope="module")
def tok(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(w: str) -> list[dict]:
    """A multi-turn prompt: every conversation shares its first turns and its assistant turn."""
    return [
        {"role": "system", "content": "You reverse words."},
        {"role": "user", "content": "Ready?"},
        {"role": "assistant", "content": "Yes, give me a word."},
        {"role": "user", "content": f"reverse: {w}"},
    ]


def all_rows(cfg, tok):
    train, ev = load_prompt_sets(cfg, tok, seed=0)
    return train, ev, list(zip(train.texts + ev.texts, train.references + ev.references, strict=True))


def test_conversational_prompt_is_the_conversation_so_far(tmp_path, tok):
    rows = [{"prompt": conversation(w), "completion": [{"role": "assistant", "content": w[::-1]}]} for w in WORDS]
    cfg = DataConfig(train=str(jsonl(tmp_path / "conv.jsonl", rows)), num_eval_prompts=5)
    train, ev, pairs = all_rows(cfg, tok)
    assert len(train) + len(ev) == 30  # 30 distinct conversations stay 30 prompts
    assert sorted(pairs) == sorted((f"reverse: {w}", w[::-1]) for w in WORDS)
    for text, ids in zip(train.texts, train.prompt_ids, strict=True):
        expect = tok.apply_chat_template(conversation(text.split()[-1]), add_generation_prompt=True)
        assert ids == list(expect["input_ids"])  # every earlier turn is in the rendered prompt


def test_prompt_ending_in_a_user_turn_with_chosen_and_rejected(tmp_path, tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"reverse: {w}"}],
            "chosen": [{"role": "assistant", "content": w[::-1]}],
            "rejected": [{"role": "assistant", "content": w}],
        }
        for w in WORDS
    ]
    cfg = DataConfig(train=str(jsonl(tmp_path / "pref.jsonl", rows)), num_eval_prompts=5)
    _, _, pairs = all_rows(cfg, tok)
    assert sorted(pairs) == sorted((f"reverse: {w}", w[::-1]) for w in WORDS)


def test_standard_prompt_completion_and_implicit_prompt_preferences(tmp_path, tok):
    std = [{"prompt": f"reverse: {w}", "completion": w[::-1]} for w in WORDS]
    _, _, pairs = all_rows(DataConfig(train=str(jsonl(tmp_path / "std.jsonl", std)), num_eval_prompts=5), tok)
    assert sorted(pairs) == sorted((f"reverse: {w}", w[::-1]) for w in WORDS)
    implicit = [
        {
            "chosen": [{"role": "user", "content": f"reverse: {w}"}, {"role": "assistant", "content": w[::-1]}],
            "rejected": [{"role": "user", "content": f"reverse: {w}"}, {"role": "assistant", "content": w}],
        }
        for w in WORDS
    ]
    cfg = DataConfig(train=str(jsonl(tmp_path / "implicit.jsonl", implicit)), num_eval_prompts=5)
    _, _, pairs = all_rows(cfg, tok)
    assert sorted(pairs) == sorted((f"reverse: {w}", w[::-1]) for w in WORDS)


def test_conversational_prompt_errors_name_row_and_column(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 3
    with pytest.raises(DataError, match=r"ends\.jsonl: row \d, column 'prompt': a conversational prompt must end"):
        load_prompt_sets(DataConfig(train=str(jsonl(tmp_path / "ends.jsonl", rows)), num_eval_prompts=1), tok, 0)
    two = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "completion": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
        }
        for i in range(3)
    ]
    with pytest.raises(DataError, match="column 'completion': an answer of 2 assistant turns"):
        load_prompt_sets(DataConfig(train=str(jsonl(tmp_path / "two.jsonl", two)), num_eval_prompts=1), tok, 0)


def test_saved_dataset_dict_directory_uses_data_split(tmp_path, tok):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": f"reverse: {w}"} for w in WORDS[:20]]),
            "test": datasets.Dataset.from_list([{"prompt": f"reverse: {w}"} for w in WORDS[20:]]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    train, ev = load_prompt_sets(DataConfig(train=str(tmp_path / "dd"), num_eval_prompts=2), tok, seed=0)
    assert sorted(train.texts + ev.texts) == sorted(f"reverse: {w}" for w in WORDS[:20])
    test, _ = load_prompt_sets(DataConfig(train=str(tmp_path / "dd"), split="test", num_eval_prompts=2), tok, 0)
    assert set(test.texts) <= {f"reverse: {w}" for w in WORDS[20:]}
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], but no split 'validation'; set data.split"):
        load_prompt_sets(DataConfig(train=str(tmp_path / "dd"), split="validation"), tok, seed=0)


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "bad.jsonl",
            '{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n',
            r"bad\.jsonl: could not be read: line 2 is not valid JSON",
        ),
        (
            "list.jsonl",
            '{"prompt": "a"}\n{"prompt": "b"}\n["c"]\n',
            r"list\.jsonl: could not be read: line 3 is a JSON list",
        ),
        (
            "doc.json",
            '[\n {"prompt": "a"},\n {"prompt": "b"\n]\n',
            r"doc\.json: could not be read: line 4, column 1 is not valid JSON",
        ),
        (
            "fields.csv",
            "prompt,response\na,b\nc,d,e\nf,g\n",
            r"fields\.csv: could not be read: line 3 has 3 fields, the header has 2",
        ),
        (
            "quote.csv",
            'prompt,response\na,b\n"c,d\ne,f\n',
            r"quote\.csv: could not be read: the record starting at line 3",
        ),
    ],
)
def test_parse_errors_name_the_file_and_line(tmp_path, tok, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_prompt_sets(DataConfig(train=str(path), num_eval_prompts=1), tok, seed=0)
    assert "An error occurred" not in str(e.value)
