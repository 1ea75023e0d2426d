"""What a user watching a terminal sees (progress bars fed by the actors, the per-iteration table), and
the W&B run an offline `wandb=true` run leaves behind, from one real 1-iteration tiny run."""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def wandb_records(run_file: Path) -> list:
    """The protobuf `Record`s of a W&B transaction log (LevelDB log format: 32 KiB blocks of
    crc32 | length | type records after a 7-byte `:W&B` header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def wandb_history(run_file: Path, timeout_s: float = 60.0) -> list[dict]:
    """The logged rows, once W&B's background process has written the run's `exit` record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


@pytest.fixture(scope="module")
def terminal_run(workers, tiny_cfg, tmp_path_factory):
    pytest.importorskip("wandb")
    from rich.console import Console as RichConsole

    from pipeline.console import Console
    from pipeline.driver import run_with_workers
    from pipeline.preflight import prepare

    out = tmp_path_factory.mktemp("terminal")
    screen = io.StringIO()
    console = Console(rich_console=RichConsole(file=screen, force_terminal=True, width=160))
    cfg = tiny_cfg(out, "iterations=1", "wandb=true")
    rows = run_with_workers(prepare(cfg), workers, console)
    return rows, screen.getvalue(), Path(out), cfg


def test_progress_bars_count_what_the_actors_did(terminal_run):
    rows, screen, _, cfg = terminal_run
    row = rows[1]
    n_gen = row["prompts_regenerated"] * cfg.rollout.n_samples
    steps, n_eval = row["train_steps"], cfg.data.num_eval_prompts
    assert steps > 0
    # each bar's last frame shows the count the actors reported, not one the driver filled in
    for label, total in [
        ("iteration 1: generating responses", n_gen),
        ("iteration 1: scoring responses", n_gen),
        (f"iteration 1: training {cfg.algorithm.name} (optimizer steps)", steps),
        ("evaluating (held-out prompts)", n_eval),
    ]:
        assert label in screen
        frames = [line for line in screen.splitlines() if label in line]
        assert f"{total}/{total}" in frames[-1], frames[-1]
    assert "syncing weights into vLLM" in screen
    assert "eval_reward" in screen and "win_rate" in screen  # the per-iteration table


def test_wandb_offline_run_logs_every_iteration(terminal_run):
    rows, _, out, _ = terminal_run
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history = wandb_history(run_files[0])
    assert [h["_step"] for h in history] == [0, 1]
    for h, row in zip(history, rows, strict=True):
        assert h["eval_reward_mean"] == pytest.approx(row["eval_reward_mean"])
    assert history[1]["loss"] == pytest.approx(rows[1]["loss"])
    assert (out / "wandb_id").read_text().strip() in run_files[0].name
