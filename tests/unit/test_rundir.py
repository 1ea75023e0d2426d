"""The run directory never loses or mislabels a run, without Ray or vLLM.

metrics.jsonl: only a torn final line may be dropped. Resume: every setting that changes results is
compared before anything is written; no checkpoint means stop (unless resume=auto); a corrupt
checkpoint is named and the previous one used. `onalign report`: one clear line for every bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.checkpoint import ResumeError, fingerprint_of
from pipeline.cli import main
from pipeline.loop import Loop
from pipeline.preflight import prepare
from pipeline.rundir import RunDir, RunDirError


def fingerprint(loop) -> dict:
    return fingerprint_of(loop.cfg, len(loop.train_set), len(loop.eval_set))


def restore(loop) -> int:
    """The loop's restore step on a fake loop (no actors)."""
    return Loop.restore(loop)


N_TRAIN, N_EVAL = 48, 16  # what tests/conftest.py's TEST_OVERRIDES give on builtin:reverse


def rows_text(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ---------------------------------------------------------------- a fake finished run, no actors


class FakeTrainers:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def call(self, method, *args):
        self.calls.append((method, *args))
        return None


class FakeReward:
    def __init__(self) -> None:
        self.loaded = None
        outer = self

        class _Load:
            @staticmethod
            def remote(state):
                outer.loaded = state
                return state

        self.load_state_dict = _Load()


def fake_loop(cfg, rundir: RunDir):
    from pipeline.console import Console

    loop = SimpleNamespace(
        cfg=cfg,
        rundir=rundir,
        workers=SimpleNamespace(trainers=FakeTrainers()),
        reward=FakeReward(),
        get=lambda refs, what, progress=None: refs,
        train_set=[None] * N_TRAIN,
        eval_set=[None] * N_EVAL,
        initial_eval=[],
        reporter=SimpleNamespace(console=Console(quiet=True)),
    )
    loop.fingerprint = lambda: fingerprint(loop)
    return loop


def write_checkpoint(rd: RunDir, cfg, iteration: int) -> Path:
    import torch
    from safetensors.torch import save_file

    tmp = rd.begin_checkpoint(iteration)
    (tmp / "policy").mkdir()
    save_file({"w": torch.full((32, 32), float(iteration))}, str(tmp / "policy" / "model.safetensors"))
    (tmp / "policy" / "config.json").write_text("{}")
    state = {
        "fingerprint": fingerprint(fake_loop(cfg, rd)),
        "initial_eval_rewards": [0.25] * N_EVAL,
        "reward_state": {"iteration": iteration},
        "rng": "derived from (seed, iteration)",
    }
    return rd.commit_checkpoint(tmp, iteration, state, keep=10)


@pytest.fixture
def finished_run(tmp_path, tiny_cfg):
    """`finished_run(*overrides, iterations=2, checkpoints=(1, 2))`: a run directory as a finished run
    leaves it (config.yaml, metrics and samples rows 0..iterations, checkpoints), made without actors."""

    def make(*overrides: str, iterations: int = 2, checkpoints=(1, 2)):
        out = tmp_path / "run"
        cfg = tiny_cfg(out, f"iterations={iterations}", *overrides)
        rd = RunDir(out)
        rd.prepare()
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        for i in range(iterations + 1):
            rd.append_metrics({"iteration": i, "eval_reward_mean": 0.5 + i / 10})
            if i:
                rd.append_samples({"iteration": i, "rollout_rewards": [0.1, 0.2]})
        for it in checkpoints:
            write_checkpoint(rd, cfg, it)
        return out

    return make


def its(path: Path) -> list[int]:
    return [json.loads(x)["iteration"] for x in path.read_text().splitlines()]


# ---------------------------------------------------------------- 1. metrics.jsonl


def test_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text(rows_text({"iteration": 0}, "{not json", {"iteration": 1}, {"iteration": 2}))
    with pytest.raises(RunDirError, match=r"metrics\.jsonl.* line 2 "):
        rd.read_metrics()


def test_bad_final_line_with_newline_is_an_error_but_a_torn_one_is_dropped(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text(rows_text({"iteration": 0}, {"iteration": 1}) + '{"iteration": 2, "eval')
    assert [r["iteration"] for r in rd.read_metrics()] == [0, 1]  # torn by a crash mid-write
    rd.metrics_path.write_text(rows_text({"iteration": 0}, "garbage"))  # a whole line: not a crash
    with pytest.raises(RunDirError, match="line 2"):
        rd.read_metrics()


def test_append_after_a_torn_line_starts_a_clean_line(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text(rows_text({"iteration": 0}) + '{"iteration": 1, "ev')
    rd.append_metrics({"iteration": 1})
    assert [r["iteration"] for r in rd.read_metrics()] == [0, 1]


def test_append_after_a_complete_row_without_newline_keeps_it(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text(rows_text({"iteration": 0}) + '{"iteration": 1}')
    rd.append_metrics({"iteration": 2})
    assert [r["iteration"] for r in rd.read_metrics()] == [0, 1, 2]


def test_truncate_never_loses_rows_after_a_bad_line(tmp_path):
    rd = RunDir(tmp_path)
    text = rows_text({"iteration": 0}, {"iteration": 1}, "{oops", {"iteration": 2}, {"iteration": 3})
    rd.metrics_path.write_text(text)
    with pytest.raises(RunDirError, match=r"metrics\.jsonl.*line 3"):
        rd.truncate_to(2)
    assert rd.metrics_path.read_text() == text


@pytest.mark.parametrize(
    "row,message",
    [
        ("[1, 2]", "not a JSON object"),
        ('{"eval_reward_mean": 0.5}', "no integer 'iteration'"),
        ('{"iteration": "one"}', "no integer 'iteration'"),
    ],
)
def test_rows_must_be_objects_with_an_iteration(tmp_path, row, message):
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text(rows_text({"iteration": 0}, row, {"iteration": 2}))
    with pytest.raises(RunDirError, match=rf"metrics\.jsonl.*line 2.*{message}"):
        rd.read_metrics()


def test_fresh_run_is_refused_from_a_dir_whose_metrics_are_corrupt(finished_run, tiny_cfg):
    out = finished_run(iterations=1, checkpoints=(1,))
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text("\x00\x00garbage\n" + text)
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(RunDirError, match=r"metrics\.jsonl.*line 1"):
        prepare(tiny_cfg(out, "iterations=1"))
    assert (out / "config.yaml").read_text() == config_before


# ---------------------------------------------------------------- 2. what resume compares


def test_refused_resume_leaves_config_yaml_untouched(finished_run, tiny_cfg):
    out = finished_run()
    before = (out / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"algorithm\.name: checkpoint 'dpo' vs config 'ipo'"):
        prepare(tiny_cfg(out, "iterations=3", "resume=true", "algorithm.name=ipo"))
    assert (out / "config.yaml").read_text() == before
    assert not (out / "config_changes.jsonl").exists()


def test_resume_refuses_every_result_changing_setting_in_one_message(finished_run, tiny_cfg):
    out = finished_run()
    with pytest.raises(ResumeError) as e:
        prepare(
            tiny_cfg(out, "iterations=3", "resume=true", "algorithm.beta=0.2", "train.lr=0.001", "rollout.n_samples=8")
        )
    msg = str(e.value)
    for key in ("algorithm.beta: checkpoint 0.1 vs config 0.2", "train.lr", "rollout.n_samples: checkpoint 4 vs"):
        assert key in msg
    assert "iterations" not in msg.split("may change on resume")[0]  # allowed keys are not listed as differences
    assert str(out) in msg and "new output_dir" in msg


def test_resume_accepts_allowed_changes_and_records_when(finished_run, tiny_cfg):
    out = finished_run()
    prep = prepare(tiny_cfg(out, "iterations=4", "resume=true", "call_timeout_s=60", "keep_checkpoints=3"))
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["iterations"] == 4 and saved["call_timeout_s"] == 60
    changes = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [
        {
            "iteration": 3,
            "changes": {"iterations": [2, 4], "call_timeout_s": [900.0, 60.0], "keep_checkpoints": [2, 3]},
        }
    ]
    assert restore(fake_loop(prep.cfg, prep.rundir)) == 3
    assert main(["report", str(out)]) == 0
    assert "from iteration 3: iterations 2 -> 4" in (out / "report.md").read_text()


# ---------------------------------------------------------------- 3. resume with nothing to resume


def test_resume_of_a_missing_dir_stops_and_creates_nothing(tmp_path, tiny_cfg):
    out = tmp_path / "typo"
    with pytest.raises(ResumeError, match=rf"output_dir '{out}' does not exist"):
        prepare(tiny_cfg(out, "resume=true"))
    assert not out.exists()


def test_resume_without_checkpoint_stops_and_keeps_metrics(finished_run, tiny_cfg):
    out = finished_run(checkpoints=())
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ResumeError, match=rf"no complete checkpoint in output_dir '{out}'.*resume=auto"):
        prepare(tiny_cfg(out, "iterations=3", "resume=true"))
    assert (out / "metrics.jsonl").read_text() == before
    # restore() itself (no prepare before it) refuses too instead of wiping the rows
    loop = fake_loop(tiny_cfg(out, "iterations=3", "resume=true"), RunDir(out))
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        restore(loop)
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_auto_says_whether_it_continued_or_started_fresh(finished_run, tiny_cfg, capsys):
    out = finished_run(checkpoints=())
    prep = prepare(tiny_cfg(out, "iterations=3", "resume=auto"))
    assert "resume=auto: no complete checkpoint" in capsys.readouterr().out
    assert restore(fake_loop(prep.cfg, prep.rundir)) == 1  # started over: no rows kept
    assert not (out / "metrics.jsonl").read_text()
    write_checkpoint(RunDir(out), tiny_cfg(out, "iterations=2"), 1)
    (out / "metrics.jsonl").write_text(rows_text({"iteration": 0}, {"iteration": 1}))
    prepare(tiny_cfg(out, "iterations=3", "resume=auto"))
    assert "resuming after iteration 1" in capsys.readouterr().out


def test_resume_when_only_iteration_0_ran_starts_over_with_a_note(finished_run, tiny_cfg, capsys):
    """A crash inside iteration 1 leaves only row 0: nothing is lost by starting again, so say so and go on."""
    out = finished_run(iterations=0, checkpoints=())
    prep = prepare(tiny_cfg(out, "iterations=2", "resume=true"))
    assert "no iteration completed" in capsys.readouterr().out
    assert restore(fake_loop(prep.cfg, prep.rundir)) == 1


# ---------------------------------------------------------------- 4. corrupt checkpoints


def truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_truncated_safetensors_falls_back_to_previous_checkpoint(finished_run, tiny_cfg, capsys):
    out = finished_run()
    bad = out / "checkpoints" / "iter_2" / "policy" / "model.safetensors"
    truncate(bad, bad.stat().st_size - 100)
    prep = prepare(tiny_cfg(out, "iterations=3", "resume=true"))
    msg = capsys.readouterr().out
    assert str(bad) in msg and "iter_1" in msg
    loop = fake_loop(prep.cfg, prep.rundir)
    assert restore(loop) == 2
    assert loop.workers.trainers.calls == [("load_checkpoint", str(out / "checkpoints" / "iter_1"))]
    assert loop.reward.loaded == {"iteration": 1}
    assert its(out / "metrics.jsonl") == [0, 1]


@pytest.mark.parametrize(
    "damage,named",
    [
        (lambda c: (c / "state.json").write_text('{"format": 1, "iter'), "state.json"),
        (lambda c: (c / "state.json").write_text("[]"), "state.json"),
        (lambda c: truncate(c / "policy" / "model.safetensors", 5), "model.safetensors"),
        (lambda c: (c / "policy" / "model.safetensors").unlink(), "policy"),
        (lambda c: (c / "policy" / "config.json").write_text("{"), "config.json"),
    ],
)
def test_only_checkpoint_corrupt_is_one_clear_error(finished_run, tiny_cfg, damage, named):
    out = finished_run(checkpoints=(1,), iterations=1)
    damage(out / "checkpoints" / "iter_1")
    with pytest.raises(ResumeError, match=rf"checkpoints/iter_1/.*{named}"):
        prepare(tiny_cfg(out, "iterations=2", "resume=true"))
    # restore() called on its own (no prepare) validates the same way
    with pytest.raises(ResumeError, match=named):
        restore(fake_loop(tiny_cfg(out, "iterations=2", "resume=true"), RunDir(out)))


def test_cli_corrupt_checkpoint_is_one_line_exit_2(finished_run, capsys, monkeypatch):
    monkeypatch.setattr("pipeline.driver.init_ray", lambda cfg: pytest.fail("started Ray: not caught in prepare"))
    out = finished_run(checkpoints=(1,), iterations=1)
    truncate(out / "checkpoints" / "iter_1" / "policy" / "model.safetensors")
    code = main(["run", str(out / "config.yaml"), "iterations=2", "--resume"])  # the run's own settings
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("onalign: error: ") and "model.safetensors" in err


# ---------------------------------------------------------------- 5. onalign report


def report_error(capsys, *args) -> str:
    code = main(["report", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("onalign: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_report_on_a_missing_dir_fails_and_creates_nothing(tmp_path, capsys):
    assert "does not exist" in report_error(capsys, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_report_on_a_file_path(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(rows_text({"iteration": 0}))
    assert "not a directory" in report_error(capsys, tmp_path / "metrics.jsonl")


@pytest.mark.parametrize(
    "metrics,named",
    [
        (rows_text({"iteration": 0}, {"eval_reward_mean": 0.5}), "line 2"),
        (rows_text({"iteration": 0}, "[1, 2, 3]"), "line 2"),
        (rows_text({"iteration": 0}, '"just a string"'), "line 2"),
        (rows_text("{bad", {"iteration": 1}), "line 1"),
    ],
)
def test_report_on_bad_rows(tmp_path, capsys, metrics, named):
    (tmp_path / "metrics.jsonl").write_text(metrics)
    err = report_error(capsys, tmp_path)
    assert "metrics.jsonl" in err and named in err


@pytest.mark.parametrize("text", ["model: [unclosed\n", "- a list\n- not a mapping\n", "algorithm: 5\n"])
def test_report_on_a_bad_config_yaml(tmp_path, capsys, text):
    (tmp_path / "metrics.jsonl").write_text(rows_text({"iteration": 0, "eval_reward_mean": 0.5}))
    (tmp_path / "config.yaml").write_text(text)
    assert "config.yaml" in report_error(capsys, tmp_path)


def test_report_comparison_with_a_missing_run(finished_run, tmp_path, capsys):
    good = finished_run()
    err = report_error(capsys, good, tmp_path / "missing", "--out", tmp_path / "cmp")
    assert "missing" in err and "does not exist" in err
    assert not (tmp_path / "cmp" / "comparison.md").exists()


def test_report_on_a_good_run_still_works(finished_run, tmp_path, capsys):
    good = finished_run()
    assert main(["report", str(good)]) == 0
    assert (good / "report.html").is_file()
    assert main(["report", str(good), str(good), "--out", str(tmp_path / "cmp")]) == 0
    assert "| 2 |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_a_resume_refused_for_a_damaged_metrics_line_is_refused_before_any_write(finished_run, tiny_cfg):
    """A damaged middle line of metrics.jsonl stops a resume in the checks (not after the actors' start-up),
    and the refused resume writes nothing: config.yaml and config_changes.jsonl as they were."""
    out = finished_run()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([rows[0], "{damaged", *rows[1:]]) + "\n")
    before = (out / "config.yaml").read_text()
    with pytest.raises(RunDirError, match=r"metrics\.jsonl line 2 is not valid JSON"):
        prepare(tiny_cfg(out, "iterations=3", "resume=true"))
    assert (out / "config.yaml").read_text() == before
    assert not (out / "config_changes.jsonl").exists()
