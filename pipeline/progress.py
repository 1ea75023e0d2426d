"""Live progress of work that runs inside actors.

Workers count finished units (responses generated, responses scored, optimizer steps) with a
`Ticker`, which sends its counts to a `ProgressBoard` actor at most a few times a second; the driver
polls the board while it waits for the actors and draws the counts as rich progress bars. Without a
terminal (CI, `ray job submit` logs, `--quiet`) there is no board and workers count nothing.
"""

from __future__ import annotations

import time

import ray


class ProgressBoard:
    """Counters by key (the driver wraps it with `ray.remote(num_cpus=0)`)."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}

    def add(self, key: str, n: int) -> None:
        self.done[key] = self.done.get(key, 0) + n

    def read(self, keys: list[str]) -> dict[str, int]:
        return {k: self.done.get(k, 0) for k in keys}


class Ticker:
    """Worker side: counts units for one key; sends them at most every `every_s` and on `flush` (or when
    its `with` block ends). `Ticker()` (no board) counts nothing."""

    def __init__(self, board=None, key: str = "", every_s: float = 0.2) -> None:
        self.board, self.key, self.every_s = board, key, every_s
        self.pending = 0
        self.last = time.monotonic()

    def __call__(self, n: int = 1) -> None:
        if self.board is None:
            return
        self.pending += n
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.board is not None and self.pending:
            self.board.add.remote(self.key, self.pending)
            self.pending = 0
        self.last = time.monotonic()

    def __enter__(self) -> Ticker:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def new_board():
    """A board actor on the driver's node (no CPU reserved: it only adds integers)."""
    return ray.remote(num_cpus=0)(ProgressBoard).remote()
