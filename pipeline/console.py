"""Console output: a per-iteration table (rich on a terminal, plain lines in logs) and stage progress."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

COLUMNS = [
    ("iteration", "it", "{}"),
    ("eval_reward_mean", "eval_reward", "{:.3f}"),
    ("win_rate_vs_initial", "win_rate", "{:.2f}"),
    ("reward_mean", "rollout_reward", "{:.3f}"),
    ("pairs", "pairs", "{}"),
    ("loss", "loss", "{:.4f}"),
    ("pair_accuracy", "pair_acc", "{:.2f}"),
    ("generated_tokens", "gen_tokens", "{}"),
    ("generation_saved_fraction", "gen_saved", "{:.0%}"),
    ("time_total_s", "time_s", "{:.1f}"),
]


def fmt(value, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


class Console:
    def __init__(self, quiet: bool = False, rich_console=None) -> None:
        """Rich output on a terminal (or on `rich_console`, e.g. one writing to a file); plain lines otherwise."""
        self.rich = rich_console is not None or (sys.stdout.isatty() and not quiet)
        self.quiet = quiet
        if self.rich:
            from rich.console import Console as RichConsole

            self.console = rich_console or RichConsole()

    def log(self, msg: str) -> None:
        if self.rich:
            self.console.log(msg)
        else:
            print(f"[onalign] {msg}", flush=True)

    def status(self, msg: str):
        """A spinner naming a stage that has no countable steps (terminal only)."""
        return self.console.status(msg) if self.rich else contextlib.nullcontext()

    @contextlib.contextmanager
    def progress(self) -> Iterator:
        """One iteration's stage bars (rich `Progress`, cleared when the iteration's row is printed);
        yields None without a terminal: logs get the per-iteration line only."""
        if not self.rich:
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=self.console, transient=True) as bars:
            yield bars

    def iteration_done(self, row: dict) -> None:
        cells = [fmt(row.get(k), p) for k, _, p in COLUMNS]
        if self.rich:
            from rich.table import Table

            table = Table(show_header=row.get("iteration") == 0, box=None, pad_edge=False)
            for _, title, _ in COLUMNS:
                table.add_column(title, justify="right", min_width=len(title))
            table.add_row(*cells)
            self.console.print(table)
        else:
            print("[onalign] " + "  ".join(f"{t}={c}" for (_, t, _), c in zip(COLUMNS, cells, strict=True)), flush=True)
