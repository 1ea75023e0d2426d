"""A quiet console by default: the actors' own output goes to OUTPUT_DIR/logs/<actor>.log (set per run, so
actors shared by several runs follow each one), `verbose` streams it as Ray does, and a failure is one
line plus the log that holds its details. The last test counts the actors' lines on the console of a
real 1-iteration `onalign run`: there are none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.console import ActorLogs

ROOT = Path(__file__).resolve().parents[2]


def test_a_user_mistake_needs_no_log_and_a_bug_gets_the_driver_log(tmp_path):
    from common.config import ConfigError

    logs = ActorLogs(tmp_path)
    with pytest.raises(ConfigError) as mistake, logs.explaining():
        raise ConfigError("unknown config key 'iteratons'")
    assert not hasattr(mistake.value, "onalign_log") and not (tmp_path / "logs").exists()
    with pytest.raises(KeyError) as bug, logs.explaining():
        {}["missing"]
    assert bug.value.onalign_log == str(tmp_path / "logs" / "driver.log")
    assert "KeyError: 'missing'" in (tmp_path / "logs" / "driver.log").read_text()
    with pytest.raises(KeyError) as streamed, ActorLogs(tmp_path / "v", stream=True).explaining():
        {}["missing"]
    assert not hasattr(streamed.value, "onalign_log")  # --verbose: the traceback goes to the console as before


def test_the_cli_prints_one_line_and_the_log(monkeypatch, capsys, tmp_path):
    import pipeline.driver
    from pipeline.cli import main

    def failing_run(cfg):
        e = RuntimeError("vLLM engine core died\n  a long traceback follows ...")
        e.onalign_log = str(tmp_path / "logs" / "rollout-0.log")
        raise e

    monkeypatch.setattr(pipeline.driver, "run", failing_run)
    assert main(["run", "configs/demo-cpu.yaml", f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "onalign: error: RuntimeError: vLLM engine core died",
        f"onalign: details in {tmp_path / 'logs' / 'rollout-0.log'}",
    ]


@pytest.mark.parametrize(("flags", "streams"), [([], False), (["--verbose"], True), (["verbose=true"], True)])
def test_ray_streams_the_actors_output_only_when_verbose(monkeypatch, flags, streams):
    import logging

    import ray

    import pipeline.cli
    import pipeline.driver

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(pipeline.driver, "run", lambda cfg: (pipeline.driver.init_ray(cfg), [])[1])
    assert pipeline.cli.main(["run", "configs/demo-cpu.yaml", *flags]) == 0
    assert seen["log_to_driver"] is streams
    assert seen["logging_level"] == (logging.INFO if streams else logging.WARNING)  # no "Started a local Ray"


def test_verbose_may_change_on_resume(tmp_path):
    """Where the actors' output goes changes nothing the run computes: `--resume --verbose` is allowed."""
    from common.config_files import load_config
    from pipeline.checkpoint import compare_configs

    saved = load_config("configs/demo-cpu.yaml", [f"output_dir={tmp_path}"]).model_dump(mode="json")
    refused, allowed = compare_configs(
        saved, load_config("configs/demo-cpu.yaml", [f"output_dir={tmp_path}", "verbose=true"])
    )
    assert refused == {} and allowed == {"verbose": (False, True)}


def test_building_the_built_in_model_prints_only_its_path(tmp_path):
    """A first build (a fresh cache, few steps) prints no torch warning, DeepSpeed notice or save bar."""
    cmd = [sys.executable, "-m", "pipeline.cli", "build-model", "model.sft_steps=3"]
    env = {**os.environ, "ONALIGN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().startswith(str(tmp_path / "cache")) and len(res.stdout.splitlines()) == 1
    assert res.stderr.strip() == "", res.stderr[-4000:]


def test_loading_a_data_file_prints_no_progress_bar(tmp_path):
    rows = [{"prompt": f"reverse: {w}", "response": w[::-1]} for w in ["abc", "defg", "hij", "klmn"] * 8]
    rows = [{**r, "prompt": f"{r['prompt']} #{i}"} for i, r in enumerate(rows)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/demo-cpu.yaml", f"data.train={data}"]
    cmd += [f"output_dir={tmp_path / 'out'}", "--dry-run"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Generating train split" not in res.stderr and res.stderr.strip() == "", res.stderr[-4000:]
