"""The one error family onalign raises for what a user can act on: a bad config, data, run directory,
reward or plan, or a run that stopped. The CLI prints such an error as one line (exit 2); anything else is
a bug and keeps its traceback. Importable from every layer (it imports nothing of the project)."""

from __future__ import annotations


class OnalignError(Exception):
    """Base of every user-facing onalign error: its message says what happened and how to go on."""


class DataError(OnalignError, ValueError):
    """Bad or missing data: the message names the file, row and column, and the fix."""


class RewardError(OnalignError, RuntimeError):
    """A reward that failed or returned unusable scores: the message names the reward and the sample."""


def is_user_error(error: BaseException) -> bool:
    """A mistake the message fully explains (an onalign error, or a file that does not exist)."""
    return isinstance(error, (OnalignError, FileNotFoundError))
