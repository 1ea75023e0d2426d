"""Live progress of work that runs inside actors: the driver's side.

Workers count finished units (responses generated, responses scored, optimizer steps) with a
`common.ticker.Ticker`, which sends its counts to a `ProgressBoard` actor at most a few times a second; the
driver polls the board while it waits for the actors and draws the counts as rich progress bars. Without a
terminal (CI, `ray job submit` logs, `--quiet`) there is no board and workers count nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import ray

from common.ticker import ProgressBoard, Ticker


def new_board():
    """A board actor on the driver's node (no CPU reserved: it only adds integers)."""
    return ray.remote(num_cpus=0)(ProgressBoard).remote()


class ProgressView:
    """The driver's live bars, one per stage, following the counts that actors put on a board. Without a
    terminal (`enabled` false) it shows nothing, and `bar` hands out no ticker, so actors count nothing."""

    def __init__(self, console, enabled: bool) -> None:
        self.console = console
        self.board = new_board() if enabled else None
        self.bars = None  # the running stage group's rich Progress
        self.tasks: dict[str, tuple[int, int | None]] = {}  # ticker key -> (rich task id, total)

    @contextlib.contextmanager
    def showing(self) -> Iterator[None]:
        """Bars for the stages run inside (cleared when it ends)."""
        with self.console.progress() as bars:
            self.bars = bars
            try:
                yield
            finally:
                self.bars = None

    def bar(self, label: str, total: int | None) -> Ticker | None:
        """A new bar and the ticker that actors advance it with (None without a terminal)."""
        if self.bars is None or self.board is None:
            return None
        key = str(len(self.tasks))
        self.tasks[key] = (self.bars.add_task(label, total=total), total)
        return Ticker(self.board, key)

    @contextlib.contextmanager
    def spinner(self, label: str) -> Iterator[None]:
        """A bar with no count for a stage that reports none (weight sync), completed when it ends."""
        task = self.bars.add_task(label, total=None) if self.bars is not None else None
        yield
        if task is not None:
            self.bars.update(task, total=1, completed=1)

    def follow(self, refs, ticker: Ticker, timeout_s: float) -> None:
        """Redraw `ticker`'s bar from the board until `refs` are done (and its last counts landed)."""
        pending = list(refs) if isinstance(refs, list) else [refs]
        deadline = time.monotonic() + timeout_s
        task, total = self.tasks[ticker.key]
        settle = 10  # the actors' last counts may land just after their results: a few more reads
        while True:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
            done = ray.get(self.board.read.remote([ticker.key]))[ticker.key]
            self.bars.update(task, completed=done)
            if not pending:
                if done >= (total or 0) or settle == 0:
                    return
                settle -= 1
            if time.monotonic() > deadline:
                raise ray.exceptions.GetTimeoutError()
