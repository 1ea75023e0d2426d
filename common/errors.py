"""The one error family onalign raises for what a user can act on: a bad config, data, run directory,
reward or plan, or a run that stopped. The CLI prints such an error as one line (exit 2); anything else is
a bug and keeps its traceback. Importable from every layer (it imports nothing of the project)."""

from __future__ import annotations

import re
from collections.abc import Iterator


class OnalignError(Exception):
    """Base of every user-facing onalign error: its message says what happened and how to go on."""


class DataError(OnalignError, ValueError):
    """Bad or missing data: the message names the file, row and column, and the fix."""


class RewardError(OnalignError, RuntimeError):
    """A reward that failed or returned unusable scores: the message names the reward and the sample."""


def is_user_error(error: BaseException) -> bool:
    """A mistake the message fully explains (an onalign error, or a file that does not exist)."""
    return isinstance(error, (OnalignError, FileNotFoundError))


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what caused it (`raise ... from`, else the error being handled), down to the first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(error: BaseException, innermost: bool = False, whole: bool = False, limit: int = 300) -> str:
    """An exception as one line, `Type: message`: the message's first line (what follows is usually a
    traceback), or with `whole` all of it (a library's multi-line explanation: a parser's schemas, a loader's
    hints), whitespace collapsed, at most `limit` characters.

    `innermost`: the first cause's instead (libraries such as `datasets` wrap the parser's error in one that
    says nothing). A Ray actor task's error (`RayTaskError`, matched by name: no import of Ray here) is the
    task and its cause's first line, `Actor.method failed: Type: message`: the rest is the actor's traceback."""
    if innermost:
        error = list(causes(error))[-1]
    cause = error.__dict__.get("cause")
    if type(error).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        task = re.search(r"ray::([\w.]+)\(", ANSI.sub("", str(error)))
        where = task.group(1) if task else "an actor task"
        return f"{where} failed: {_typed(cause, whole, limit)}"
    return _typed(error, whole, limit)


def _typed(error: BaseException, whole: bool, limit: int) -> str:
    message = str(error).strip()
    text = " ".join((message if whole else (message.splitlines() or [""])[0]).split())[:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
