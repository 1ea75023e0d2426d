"""A real 3-iteration OPTune run (wdpo, rho = 0.5): selection accounting, then the report built from it."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def optune_run(workers, tiny_cfg, tmp_path_factory):
    from pipeline.driver import run_with_workers
    from pipeline.preflight import prepare

    out = tmp_path_factory.mktemp("optune")
    cfg = tiny_cfg(out, "iterations=3", config="configs/cpu-wdpo.yaml")
    rows = run_with_workers(prepare(cfg), workers)
    return rows, Path(out), cfg


def test_selection_accounting(optune_run):
    rows, _, cfg = optune_run
    n = cfg.data.num_train_prompts
    assert rows[1]["prompts_regenerated"] == n and rows[1]["prompts_reused"] == 0  # iteration 1: everything
    for r in rows[2:]:
        assert r["prompts_regenerated"] == math.ceil(0.5 * n)
        assert r["prompts_regenerated"] + r["prompts_reused"] == n
        assert 0.3 < r["generation_saved_fraction"] < 0.7
        mean_len = r["generated_tokens"] / (r["prompts_regenerated"] * cfg.rollout.n_samples)
        assert r["generated_tokens_if_all"] == pytest.approx(mean_len * n * cfg.rollout.n_samples, rel=1e-3)
        # reused prompts keep their pairs: the batch covers (almost) every prompt, not only the regenerated half
        assert r["pairs"] > r["prompts_regenerated"] * 0.8
    assert rows[1]["generation_saved_fraction"] == pytest.approx(0.0, abs=1e-9)


def test_report_files(optune_run):
    rows, out, _ = optune_run
    from pipeline.report import PLOTS

    for name in PLOTS:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    html = (out / "report.html").read_text()
    refs = re.findall(r"(?:src|href)='([^']+)'", html)
    assert refs and all((out / ref).is_file() for ref in refs)
    md = (out / "report.md").read_text()
    short = [line for line in md.splitlines() if line.startswith("| ") and re.match(r"\| \d+ \|", line)]
    assert len(short) == len(rows)  # the short table: one line per iteration
    with (out / "metrics.csv").open(newline="") as f:
        full = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in full] == [r["iteration"] for r in rows]
    for got, row in zip(full, rows, strict=True):
        if row.get("eval_reward_mean") is not None:
            assert float(got["eval_reward_mean"]) == pytest.approx(row["eval_reward_mean"])
    assert "reward_mean" in full[0] and "generation_saved_fraction" in full[0]
    assert "initial vs latest" in md and (out / "tensorboard").is_dir()
    assert any((out / "tensorboard").iterdir())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any(s.get("pair_weights") for s in samples)


def test_onalign_report_rebuilds_elsewhere_and_compares(optune_run, tmp_path):
    from pipeline.cli import main

    _, out, _ = optune_run
    copy = tmp_path / "copied"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("plots", "report.*", "checkpoints"))
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text().replace(str(copy), "X") == (out / "report.md").read_text().replace(
        str(out), "X"
    )
    for name in (out / "plots").iterdir():
        assert (copy / "plots" / name.name).is_file()
    second = tmp_path / "second"
    shutil.copytree(out, second, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["report", str(out), str(second), "--out", str(tmp_path / "cmp")]) == 0
    cmp_md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert cmp_md.count("wdpo") >= 2 and (tmp_path / "cmp" / "plots" / "comparison.png").read_bytes()[:8] == PNG_MAGIC
