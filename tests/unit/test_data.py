"""User data through `datasets`: every local format and shape, column mapping, filtering, clear errors."""

from __future__ import annotations

import json

import pytest

from common.config import DataConfig
from pipeline.data import DataError, load_prompt_sets

PROMPTS = [f"reverse: {w}" for w in ["abc", "defg", "hijkl", "mnop", "qrs", "tuvw", "xyz", "bcd", "cdef", "efg"]]
ANSWERS = [p.split()[-1][::-1] for p in PROMPTS]


@pytest.fixture(scope="module")
def tok(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def write(tmp_path, fmt: str, shape: str):
    import datasets

    if shape == "prompt":
        rows = [{"prompt": p, "response": a} for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    else:
        rows = [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(PROMPTS, ANSWERS, strict=True)
        ]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        if shape != "prompt":
            pytest.skip("chat messages do not fit CSV")
        ds.to_csv(str(path), index=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "disk":
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("shape", ["prompt", "messages"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "disk"])
def test_every_format_and_shape_gives_the_same_rendered_prompts(tmp_path, tok, fmt, shape):
    path = write(tmp_path, fmt, shape)
    cfg = DataConfig(train=str(path), num_train_prompts=100, num_eval_prompts=2)
    train, ev = load_prompt_sets(cfg, tok, seed=3)
    again, _ = load_prompt_sets(cfg, tok, seed=3)
    assert train.texts == again.texts  # same seed, same order
    assert len(train) == 8 and len(ev) == 2
    assert sorted(train.texts + ev.texts) == sorted(PROMPTS)
    for text, ref, ids in zip(train.texts, train.references, train.prompt_ids, strict=True):
        assert ref == text.split()[-1][::-1]  # the ground truth travels with its prompt
        expect = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        assert ids == list(expect["input_ids"])
    other, _ = load_prompt_sets(cfg, tok, seed=4)
    assert other.texts != train.texts


def test_column_mapping(tmp_path, tok):
    path = tmp_path / "mapped.jsonl"
    path.write_text(
        "".join(json.dumps({"question": p, "gold": a}) + "\n" for p, a in zip(PROMPTS, ANSWERS, strict=True))
    )
    cfg = DataConfig(train=str(path), prompt_column="question", response_column="gold", num_eval_prompts=2)
    train, _ = load_prompt_sets(cfg, tok, seed=0)
    assert all(r == t.split()[-1][::-1] for t, r in zip(train.texts, train.references, strict=True))


def test_filtering_counts_empty_duplicate_and_long(tmp_path, tok):
    rows = [{"prompt": p} for p in PROMPTS] + [
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": PROMPTS[0]},
        {"prompt": "reverse: " + "x" * 200},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=str(path), num_eval_prompts=1, max_prompt_length=40)
    train, ev = load_prompt_sets(cfg, tok, seed=0)
    total = {k: train.counts[k] + ev.counts[k] for k in train.counts}
    assert total["empty_prompts"] == 2 and total["duplicate_prompts"] == 1 and total["long_prompts_skipped"] == 1
    trunc = DataConfig(train=str(path), num_eval_prompts=1, max_prompt_length=40, long_prompts="truncate")
    t2, e2 = load_prompt_sets(trunc, tok, seed=0)
    assert t2.counts["long_prompts_truncated"] + e2.counts["long_prompts_truncated"] == 1
    assert max(len(p) for p in t2.prompt_ids + e2.prompt_ids) <= 40


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing_col.jsonl", '{"text": "a"}\n', "no prompt column 'prompt'"),
        (
            "not_string.jsonl",
            '{"prompt": "a b"}\n{"prompt": "c d"}\n{"prompt": 5}\n',
            "row 3, column 'prompt': expected a string",  # 1-based, as editors count lines
        ),
        ("bad_json.jsonl", '{"prompt": "a"\n', "could not be read"),
        ("empty.jsonl", "", "the file is empty"),
        ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', "line 1 is not valid UTF-8"),
        ("bad_chat.jsonl", '{"messages": "hello"}\n{"messages": "again"}\n', "expected a list of {role, content}"),
        (
            "no_user.jsonl",
            '{"messages": [{"role": "assistant", "content": "x"}]}\n' * 2,
            "the conversation has no user turn",
        ),
        ("data.txt", "hello\n", "unsupported file type"),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path, tok, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        load_prompt_sets(DataConfig(train=str(path), num_eval_prompts=1), tok, seed=0)
    assert message in str(e.value) and name in str(e.value)


def test_missing_file_and_all_filtered(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_sets(DataConfig(train=str(tmp_path / "nope.jsonl")), tok, seed=0)
    path = tmp_path / "blank.jsonl"
    path.write_text('{"prompt": ""}\n{"prompt": " "}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompt_sets(DataConfig(train=str(path), num_eval_prompts=1), tok, seed=0)


def test_row_level_type_error_names_row_and_column(tmp_path, tok):
    import datasets

    path = tmp_path / "typed.parquet"
    datasets.Dataset.from_list([{"prompt": "ok", "response": "a"}, {"prompt": "ok2", "response": None}]).to_parquet(
        str(path)
    )
    bad = tmp_path / "ints.parquet"
    datasets.Dataset.from_list([{"prompt": 1}, {"prompt": 2}, {"prompt": 3}]).to_parquet(str(bad))
    with pytest.raises(DataError) as e:
        load_prompt_sets(DataConfig(train=str(bad), num_eval_prompts=1), tok, seed=0)
    assert "ints.parquet" in str(e.value) and "column 'prompt'" in str(e.value) and "row" in str(e.value)
