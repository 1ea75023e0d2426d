"""Progress counters that workers advance and the driver reads (pipeline/progress.py draws them).

A `Ticker` lives in an actor and counts finished units for one key, sending them to a `ProgressBoard`
actor at most a few times a second. `Ticker()` without a board counts nothing (no terminal to draw on).
"""

from __future__ import annotations

import time


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
