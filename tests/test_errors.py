"""One error family: every user-facing error is an OnalignError, and the CLI tells them apart by type."""

from __future__ import annotations

import pytest

from common.config import ConfigError
from common.errors import OnalignError, is_user_error
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


def test_a_bug_is_not_a_user_error():
    assert not is_user_error(KeyError("x")) and is_user_error(FileNotFoundError("x"))
