"""Console output: a per-iteration table (rich on a terminal, plain lines in logs) and stage progress;
and where the actors' own output goes.

By default the console shows the run header, the progress bars and the per-iteration table only: each
actor's output (vLLM, DeepSpeed, Python warnings, C-level messages) goes to its own file in
OUTPUT_DIR/logs/ (`ActorLogs`), and a failure prints one line plus the log that holds its details.
`verbose=true` (`--verbose`) streams the actors' output to the console through Ray, as Ray does by default.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from common.errors import ANSI, causes, is_user_error
from pipeline.tables import HEADLINE, headline_cells


def quiet_libraries() -> None:
    """Library chatter off the driver's console (`--verbose` keeps it): `datasets`' split-generation bars,
    transformers' "Writing model shards" bar when a built-in model is saved, and DeepSpeed's notices (the
    driver imports it through transformers' save path; only its errors matter here). Hub download bars stay:
    a large model's download is worth watching."""
    import logging

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the Hub's off: on again below
    if hub_bars:
        enable_progress_bars()
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)


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
        cells = headline_cells(row)
        if self.rich:
            from rich.table import Table

            table = Table(show_header=row.get("iteration") == 0, box=None, pad_edge=False)
            for column in HEADLINE:
                table.add_column(column.short, justify="right", min_width=len(column.short))
            table.add_row(*cells)
            self.console.print(table)
        else:
            print("[onalign] " + "  ".join(f"{c.short}={v}" for c, v in zip(HEADLINE, cells, strict=True)), flush=True)


# ---------------------------------------------------------------- the actors' output

LOGS = "logs"  # OUTPUT_DIR/logs/<actor>.log
_ray_files: list[str] | None = None  # in an actor: the Ray log files its stdout/stderr were opened on
RAY_MARKERS = (":job_id:", ":actor_name:", ":task_name:")  # Ray's own bookkeeping lines in those files


def redirect_output(_actor, path: str | None, title: str = "") -> tuple[int, bool]:
    """Runs inside an actor (through `__ray_call__`): from now on the process's stdout and stderr (file
    descriptors 1 and 2, so Python, vLLM, DeepSpeed, C++ and faulthandler alike) append to `path`, after
    what the process printed before it (its start-up: vLLM's engine, DeepSpeed's build), copied from
    Ray's own log files of the process. `path=None` points them back at Ray's files (which Ray streams to
    the driver). Returns the process id and whether the output now goes to `path` (not when `path` cannot
    be written, e.g. on a node without the run directory: the output then stays in Ray's files)."""
    global _ray_files
    sys.stdout.flush()
    sys.stderr.flush()
    if _ray_files is None:
        _ray_files = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in (1, 2)]
        _ray_files = [f for f in _ray_files if os.path.isfile(f)]
    targets = [path] if path is not None else _ray_files
    if not targets:
        return os.getpid(), False
    try:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8", errors="replace") as f:
                f.write(f"==== {title or 'actor'} (pid {os.getpid()}), {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
                for src in _ray_files:
                    lines = Path(src).read_text(encoding="utf-8", errors="replace").splitlines()
                    text = "\n".join(line for line in lines if not line.startswith(RAY_MARKERS)).strip("\n")
                    if text.strip():
                        stream = {".out": "stdout", ".err": "stderr"}.get(Path(src).suffix, Path(src).name)
                        f.write(f"---- start-up output ({stream}) ----\n{text}\n")
                f.write("---- this run ----\n")
        fds = [os.open(t, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) for t in targets]
    except OSError:
        return os.getpid(), False
    for fd, new in zip((1, 2), fds * 2 if len(fds) == 1 else fds, strict=False):
        os.dup2(new, fd)
    for new in fds:
        os.close(new)
    return os.getpid(), path is not None


def actor_node(_actor=None) -> dict:
    """Where the calling process runs (inside an actor through `__ray_call__`, or the driver): its Ray node's
    id and address and its process id."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }


def record_placement(actors: dict, run_root: str | os.PathLike, timeout_s: float) -> dict[str, dict]:
    """OUTPUT_DIR/logs/actors.json: the node (id, address) and process of the driver and of each named actor
    of this run, so a cluster run says where everything ran."""
    import json

    import ray

    names = list(actors)
    where = ray.get([actors[n].__ray_call__.remote(actor_node) for n in names], timeout=timeout_s)
    placement = {"driver": actor_node(), **dict(zip(names, where, strict=True))}
    path = Path(run_root) / LOGS / "actors.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(placement, indent=1), encoding="utf-8")
    return placement


class ActorLogs:
    """Where the actors' output goes during one run: OUTPUT_DIR/logs/<name>.log per actor (kept with the
    run; an fsspec run's staging dir is mirrored with everything else), or, with `stream`, Ray's files,
    which Ray forwards to the console. Set at each run's start, since actors may serve several runs."""

    def __init__(self, run_root: str | os.PathLike, stream: bool = False) -> None:
        self.dir = Path(run_root) / LOGS
        self.stream = stream
        self.by_actor: dict[str, Path] = {}
        self.by_pid: dict[int, Path] = {}

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def attach(self, actors: dict, timeout_s: float) -> None:
        """Point each named actor's output at its log (or back at Ray's files when streaming)."""
        import ray

        names = list(actors)
        refs = [
            actors[n].__ray_call__.remote(redirect_output, None if self.stream else str(self.path(n)), n) for n in names
        ]
        for name, (pid, redirected) in zip(names, ray.get(refs, timeout=timeout_s), strict=True):
            if redirected:
                self.by_actor[actors[name]._actor_id.hex()] = self.path(name)
                self.by_pid[pid] = self.path(name)

    def log_of(self, error: BaseException) -> Path | None:
        """The log of the actor a failure came from: its chain of causes holds a Ray error that names the
        actor (by id, or by process for a task error; the error Ray raises keeps these in its text only)."""
        for e in causes(error):
            if not type(e).__module__.startswith("ray"):
                continue
            text = ANSI.sub("", str(e))
            ids = [e.__dict__.get("actor_id"), *re.findall(r"actor_id[=:]\s*([0-9a-f]+)", text)]
            for actor_id in ids:
                if actor_id in self.by_actor:
                    return self.by_actor[actor_id]
            for pid in re.findall(r"\bpid[=:]\s*(\d+)", text):
                if int(pid) in self.by_pid:
                    return self.by_pid[int(pid)]
        return None

    def explain(self, error: BaseException) -> None:
        """Give a failure the log that holds its details (as `error.onalign_log`, which the CLI prints under
        the one-line message): the actor's own log when it came from an actor, else logs/driver.log. The
        driver's traceback (with the actor's, for a task error) is appended to that log. A plain user
        mistake (no actor involved) needs no log; nor does a run that streams the actors' output."""
        if self.stream or getattr(error, "onalign_log", None) or not _from_actor_or_bug(error):
            return
        log = self.log_of(error) or self.dir / "driver.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as f:
                f.write(f"==== the driver saw this failure, {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
                f.write("".join(traceback.format_exception(error)))
        except OSError:
            return
        error.onalign_log = str(log)

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            self.explain(e)
            raise


def _from_actor_or_bug(error: BaseException) -> bool:
    """A failure whose details are not all in its message: one that came from an actor (a Ray error in its
    chain), or one that is not a user mistake (a bug: its traceback)."""
    if any(type(e).__module__.startswith("ray") for e in causes(error)):
        return True
    return not is_user_error(error)
