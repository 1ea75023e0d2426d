"""One error family: every user-facing error is an OnalignError, and the CLI tells them apart by type."""

from __future__ import annotations

import pytest

from common.config import ConfigError
from common.errors import OnalignError, causes, is_user_error, one_line
from pipeline.checkpoint import ResumeError
from pipeline.data import DataError
from pipeline.loop import PipelineError
from pipeline.placement import PlanError
from pipeline.rundir import RunDirError
from rewards.scorers import RewardError


@pytest.mark.parametrize(
    "cls", [ConfigError, DataError, RunDirError, PipelineError, ResumeError, RewardError, PlanError]
)
def test_every_user_error_is_an_onalign_error(cls):
    assert issubclass(cls, OnalignError) and is_user_error(cls("x"))


@pytest.mark.parametrize("bug", [KeyError("x"), TypeError("x"), AttributeError("x"), AssertionError("x")])
def test_a_bug_is_not_a_user_error(bug):
    """The CLI prints a user error as one line (exit 2) and lets a bug keep its traceback."""
    assert not is_user_error(bug)


def test_a_missing_file_is_a_user_error():
    """Its message names the path, which is all the user needs."""
    assert is_user_error(FileNotFoundError(2, "No such file or directory", "data/train.jsonl"))


def test_one_line_is_the_type_and_the_messages_first_line():
    error = RuntimeError("vLLM engine core died\n  Traceback (most recent call last):\n  ...")
    assert one_line(error) == "RuntimeError: vLLM engine core died"
    assert one_line(ValueError()) == "ValueError"
    assert one_line(ValueError("a   b\tc")) == "ValueError: a b c"
    assert one_line(ValueError("x" * 500), limit=10) == "ValueError: " + "x" * 10


def test_one_line_can_name_the_innermost_cause():
    """`datasets` wraps a parser's error in one that says nothing: the innermost cause says what is wrong."""
    try:
        try:
            raise ValueError("JSON parse error: Missing a closing quotation mark in string. in row 2")
        except ValueError as parse:
            raise RuntimeError("An error occurred while generating the dataset") from parse
    except RuntimeError as wrapped:
        assert [type(e) for e in causes(wrapped)] == [RuntimeError, ValueError]
        assert one_line(wrapped, innermost=True).startswith("ValueError: JSON parse error")
        assert one_line(wrapped) == "RuntimeError: An error occurred while generating the dataset"


def test_one_line_whole_keeps_a_multi_line_explanation():
    """A cast error says why only on its last line: `whole` keeps it (the first line alone says nothing)."""
    error = ValueError("Couldn't cast\na: int64\nto\na: string\nbecause column names don't match")
    assert one_line(error) == "ValueError: Couldn't cast"
    assert one_line(error, whole=True).endswith("because column names don't match")
