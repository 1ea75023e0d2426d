"""Checkpoints, exact resume, actor faults and bad inputs: one clear message each, nothing lost."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from same_metrics import assert_same_metrics

from pipeline.checkpoint import ResumeError
from pipeline.driver import run_with_workers
from pipeline.loop import PipelineError
from pipeline.preflight import prepare
from pipeline.rundir import RunDirError

COMPARED = [
    "eval_reward_mean",
    "reward_mean",
    "loss",
    "pair_accuracy",
    "pairs",
    "generated_tokens",
    "win_rate_vs_initial",
]


@pytest.fixture(scope="module")
def uninterrupted(workers, tiny_cfg, tmp_path_factory) -> list[dict]:
    """The default tiny run of 3 iterations, never stopped: what every fault test's resumed run must equal."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("uninterrupted"), "iterations=3")
    return run_with_workers(prepare(cfg), workers)


def same_rows(rows: list[dict], full: list[dict]) -> None:
    """A resumed (or disturbed) run's rows equal the uninterrupted run's on every `COMPARED` metric."""
    assert_same_metrics(rows, full, COMPARED)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_dry_run_prints_plan_and_refuses_what_cannot_fit(ray_cluster, capsys, tmp_path):
    from pipeline.cli import main

    out_dir = f"output_dir={tmp_path / 'run'}"  # not runs/demo: a finished demo there is (rightly) refused
    assert main(["run", "configs/demo-cpu.yaml", out_dir, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rollout engine 0" in out and "fits the cluster" in out
    assert main(["run", "configs/demo-cpu.yaml", out_dir, "train.num_workers=4", "--dry-run"]) == 2  # 3 CPUs on 2
    assert "does not fit the cluster" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "fn,message",
    [
        ("boom", "raised RuntimeError: reward server unreachable"),
        # the same stop for a reward's other failures: their messages are checked before any actor starts
        # (test_a_reward_that_always_fails_is_refused_before_any_actor)
        pytest.param("nan", "returned nan for sample 3", marks=pytest.mark.full),
        pytest.param("inf", "returned inf for sample 0", marks=pytest.mark.full),
        pytest.param("short", "returned 1 scores for", marks=pytest.mark.full),
    ],
)
def test_bad_reward_stops_clearly_and_keeps_completed_iterations(
    run_tiny, workers, tiny_cfg, tmp_path, faulty, fn, message
):
    mode = Path(faulty).with_suffix(".mode")
    mode.unlink(missing_ok=True)
    run_tiny("iterations=1", f"reward.function={faulty}:switch", out=tmp_path)
    before = lines(tmp_path / "metrics.jsonl")
    prep = prepare(tiny_cfg(tmp_path, "iterations=2", "resume=true", f"reward.function={faulty}:switch"))
    mode.write_text(fn)  # the reward starts failing in iteration 2, after the start-up check called it
    with pytest.raises(PipelineError) as e:
        run_with_workers(prep, workers)
    mode.unlink()
    assert message in str(e.value)
    assert lines(tmp_path / "metrics.jsonl") == before  # completed iterations intact
    assert (tmp_path / "checkpoints" / "iter_1" / "state.json").is_file()


@pytest.mark.slow
def test_all_tied_rewards_skip_training_and_end_with_the_reason(run_tiny, tmp_path, faulty):
    with pytest.raises(PipelineError, match="no iteration trained: every prompt's samples tied in reward"):
        run_tiny("iterations=2", f"reward.function={faulty}:tied")
    rows = [json.loads(x) for x in lines(tmp_path / "metrics.jsonl")]
    assert len(rows) == 3  # the iterations still ran and were recorded
    for r in rows[1:]:
        assert r["pairs"] == 0 and r["pairs_dropped_ties"] == 48 and r["training_skipped"] is True
        assert r["train_steps"] == 0


@pytest.mark.slow
def test_existing_run_needs_resume_and_incompatible_checkpoint_is_refused(run_tiny, tmp_path, tiny_cfg):
    run_tiny("iterations=1", out=tmp_path)
    with pytest.raises(RunDirError, match="already holds a run"):
        prepare(tiny_cfg(tmp_path, "iterations=2"))
    with pytest.raises(ResumeError, match="different run .*train_prompts: checkpoint 48 vs config 40"):
        run_tiny("iterations=2", "resume=true", "data.num_train_prompts=40", out=tmp_path)
    assert len(lines(tmp_path / "metrics.jsonl")) == 2


@pytest.mark.slow
# fp32 resume equals the uninterrupted run in every fault test below; bf16 is the case only this test covers
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.full), "bf16"])
def test_resume_after_driver_stop_matches_uninterrupted(run_tiny, tmp_path, monkeypatch, precision):
    """Stop the driver after iteration 2 of 4 (fault injected after its checkpoint), resume, compare. Under
    `train.bf16` the checkpoint must hold the fp32 masters: resumed from their bf16 rounding, the run drifts."""
    extra = ["train.bf16=true"] if precision == "bf16" else []
    run_tiny = functools.partial(run_tiny, *extra)
    full, _ = run_tiny("iterations=4", out=tmp_path / "full")
    from pipeline.loop import Loop

    original = Loop.save_checkpoint

    def save_then_die(loop, it):
        original(loop, it)
        if it == 2:
            raise KeyboardInterrupt("driver killed after iteration 2")

    monkeypatch.setattr(Loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_tiny("iterations=4", out=tmp_path / "cut")
    monkeypatch.setattr(Loop, "save_checkpoint", original)
    assert [json.loads(x)["iteration"] for x in lines(tmp_path / "cut" / "metrics.jsonl")] == [0, 1, 2]
    resumed, _ = run_tiny("iterations=4", "resume=true", out=tmp_path / "cut")
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3, 4]
    same_rows(resumed, full)


@pytest.mark.slow
def test_interrupted_checkpoint_write_keeps_previous(run_tiny, tmp_path, monkeypatch):
    import pipeline.rundir as rundir_mod

    run_tiny("iterations=1", out=tmp_path)
    real_commit = rundir_mod.RunDir.commit_checkpoint

    def torn(self, tmp, iteration, state, keep):
        (tmp / "state.json").write_text('{"format": 1, "iter')  # half-written, never renamed
        raise OSError("disk full")

    monkeypatch.setattr(rundir_mod.RunDir, "commit_checkpoint", torn)
    with pytest.raises(OSError, match="disk full"):
        run_tiny("iterations=2", "resume=true", out=tmp_path)
    monkeypatch.setattr(rundir_mod.RunDir, "commit_checkpoint", real_commit)
    assert rundir_mod.RunDir(tmp_path).complete_checkpoints() == [1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "iter_1" / "policy")  # still loads
    rows, _ = run_tiny("iterations=2", "resume=true", out=tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1, 2]


@pytest.mark.slow
def test_killed_trainer_gives_clear_stop_then_resume_works(workers, tiny_cfg, tmp_path, monkeypatch):
    """A real ray.kill of one DeepSpeed rank mid-iteration; a fresh trainer group then resumes."""
    import ray

    from pipeline.loop import Workers
    from workers.actor_group import TrainerGroup

    def fresh_group():
        return TrainerGroup(
            2, 0, 0, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout_s=300
        )  # forming the group waits on rank start-up: slow on a loaded 2-core machine

    group = fresh_group()
    original_call = TrainerGroup.call

    def call_and_kill(self, method, *args, **kwargs):
        if method == "train" and args[1] == 2:  # iteration 2, after generation and scoring
            ray.kill(self.actors[1], no_restart=True)
        return original_call(self, method, *args, **kwargs)

    monkeypatch.setattr(TrainerGroup, "call", call_and_kill)
    cfg = tiny_cfg(tmp_path, "iterations=3", "call_timeout_s=120")
    with pytest.raises(PipelineError) as e:
        run_with_workers(prepare(cfg), Workers(workers.rollouts, group))
    assert "trainer-1 died during training" in str(e.value) and "--resume" in str(e.value)
    monkeypatch.setattr(TrainerGroup, "call", original_call)
    group.kill()
    assert [json.loads(x)["iteration"] for x in lines(tmp_path / "metrics.jsonl")] == [0, 1]
    group2 = fresh_group()
    try:
        rows = run_with_workers(
            prepare(tiny_cfg(tmp_path, "iterations=3", "resume=true")), Workers(workers.rollouts, group2)
        )
    finally:
        group2.kill()
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert os.path.isdir(tmp_path / "checkpoints" / "iter_3")


@pytest.mark.slow
def test_a_skipped_weight_sync_stops_the_next_iteration_and_resume_continues(run_tiny, tmp_path, monkeypatch):
    """Fault injected: the sync after iteration 1 never reaches the engine. The engine samples iteration 2 from
    the initial weights; the trainers' log-probs of those samples differ from the engine's, so the run stops
    there with one line, iteration 1 saved; the resumed run syncs and goes on. Without the check the same
    fault trains on a stale engine's samples to the end without a word."""
    import pipeline.loop as loop_mod

    real = loop_mod.sync_weights
    calls: list[int] = []

    def skip_second(*args, **kwargs):
        calls.append(1)
        return [] if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "sync_weights", skip_second)
    with pytest.raises(
        PipelineError,
        match=r"^iteration 2: the engine sampled from another policy than the trainers hold.*sync after iteration 1 "
        r"did not reach the engine.*Iterations up to 1 are saved in .*rerun with --resume$",
    ) as stop:
        run_tiny("iterations=3", out=tmp_path / "run")
    print(stop.value)
    rows = [json.loads(x) for x in lines(tmp_path / "run" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["sync_logp_max_abs_diff"] < 1e-3

    monkeypatch.setattr(loop_mod, "sync_weights", real)
    resumed, _ = run_tiny("iterations=3", "resume=true", out=tmp_path / "run")
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3]
    assert all(r["sync_logp_max_abs_diff"] < 1e-3 for r in resumed[1:])
    assert "Weight sync checked in 3 of 3 iterations" in (tmp_path / "run" / "report.md").read_text()

    calls.clear()
    monkeypatch.setattr(loop_mod, "sync_weights", skip_second)
    unchecked, _ = run_tiny("iterations=2", "sync.check=false", out=tmp_path / "unchecked")
    assert [r["iteration"] for r in unchecked] == [0, 1, 2]
    assert "sync_logp_max_abs_diff" not in unchecked[2]


def test_a_run_refused_by_the_cluster_plan_leaves_no_output_dir(ray_cluster, tmp_path, capsys):
    """A run that does not fit the cluster is refused after Ray starts but before anything is written: no
    config.yaml, and the output_dir it would have made (with its missing parents) is gone again."""
    import signal

    from pipeline.cli import main

    out = tmp_path / "new" / "run"
    previous = signal.getsignal(signal.SIGTERM)  # `main` installs the CLI's handler for `run`
    try:
        assert main(["run", "configs/demo-cpu.yaml", f"output_dir={out}", "train.num_workers=4"]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "does not fit the cluster" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_remote_reward_server_that_dies_mid_iteration_and_comes_back(run_tiny, tmp_path):
    """The server dies while iteration 2's responses are scored (its 8th request: 1 check, 1 initial eval, 3
    scoring + 1 eval requests in iteration 1). Back within the retries, the run goes on as if nothing happened;
    back only later, the run stops with one line, iteration 1 saved, and the resumed run equals the
    uninterrupted one."""
    from reward_server import DyingRewardServer

    def remote(server, retries: int) -> list[str]:
        return ["reward.kind=remote", f"reward.url={server.url}", "reward.batch_size=64", f"reward.retries={retries}"]

    steady = DyingRewardServer()
    try:
        full, _ = run_tiny("iterations=3", *remote(steady, 3), out=tmp_path / "full")
    finally:
        steady.close()

    brief = DyingRewardServer(die_at=8, back_after_s=1.0)
    try:
        rows, _ = run_tiny("iterations=3", *remote(brief, 3), out=tmp_path / "brief")
    finally:
        brief.close()
    assert brief.requests > 8  # it died, and answered again after
    same_rows(rows, full)

    gone = DyingRewardServer(die_at=8)
    try:
        with pytest.raises(
            PipelineError,
            match=r"^reward scoring failed: remote reward .* failed after 2 tries .*Iterations up to 1 are saved in "
            r".*: fix what it names, then rerun with --resume$",
        ):
            run_tiny("iterations=3", *remote(gone, 1), out=tmp_path / "gone")
        assert [json.loads(x)["iteration"] for x in lines(tmp_path / "gone" / "metrics.jsonl")] == [0, 1]
        gone.revive()
        rows, _ = run_tiny("iterations=3", "resume=true", *remote(gone, 1), out=tmp_path / "gone")
    finally:
        gone.close()
    same_rows(rows, full)


@pytest.mark.slow
def test_sigterm_while_a_checkpoint_is_written_keeps_the_previous_one(
    run_tiny, workers, uninterrupted, tmp_path, monkeypatch, capsys
):
    """`ray job stop` sends the driver SIGTERM; here it comes while iteration 2's checkpoint is being written
    (the trainer saving into checkpoints/.iter_2.tmp). The run stops, iteration 1's checkpoint is intact; the
    resume names the partial checkpoint, ignores it and equals the uninterrupted run."""
    import signal
    import threading

    from pipeline.cli import _stop_on_sigterm
    from pipeline.rundir import RunDir

    full = uninterrupted
    begin = RunDir.begin_checkpoint

    def begin_then_sigterm(self, iteration):
        tmp = begin(self, iteration)
        if iteration == 2:
            threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return tmp

    previous = signal.getsignal(signal.SIGTERM)
    _stop_on_sigterm()
    monkeypatch.setattr(RunDir, "begin_checkpoint", begin_then_sigterm)
    try:
        with pytest.raises(SystemExit):
            run_tiny("iterations=3", out=tmp_path / "cut")
            time.sleep(5)  # the signal lands within the checkpoint's write, or in this wait at the latest
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.setattr(RunDir, "begin_checkpoint", begin)
    import ray

    ray.get([t.memory_mb.remote() for t in workers.trainers.actors])  # the trainers' save of iteration 2 is over
    cut = RunDir(tmp_path / "cut")
    assert cut.complete_checkpoints() == [1]
    assert [p.name for p in cut.partial_checkpoints()] == [".iter_2.tmp"]
    capsys.readouterr()
    resumed, _ = run_tiny("iterations=3", "resume=true", out=tmp_path / "cut")
    assert f"ignoring {tmp_path / 'cut' / 'checkpoints' / '.iter_2.tmp'}" in capsys.readouterr().out
    assert cut.partial_checkpoints() == []
    same_rows(resumed, full)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs (one tiny-model checkpoint fits, two do not); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a small filesystem on this machine ({res.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_filesystem_during_a_checkpoint_stops_clearly_and_resume_continues(
    run_tiny, uninterrupted, tmp_path, small_filesystem
):
    """checkpoints/ on a real 2 MiB filesystem: iteration 2's checkpoint (written by trainer rank 0) finds it
    full. One line names the path, the space left and what a checkpoint takes; iteration 1's checkpoint and
    the completed rows stay; with room made, the resumed run equals the uninterrupted one."""
    from transformers import AutoModelForCausalLM

    from pipeline.rundir import RunDir

    full = uninterrupted
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(small_filesystem)
    with pytest.raises(
        PipelineError,
        match=r"^no space left on the device: checkpoint write \(.*/checkpoints/\.iter_2\.tmp/"
        r"policy: [0-9.]+ MiB free "
        r"there; each checkpoint takes [0-9.]+ MiB and keep_checkpoints=2 are kept\)\. Iterations up to 1 are "
        r"saved in .*: free space there .*rerun with --resume$",
    ):
        run_tiny("iterations=3", out=out)
    rd = RunDir(out)
    assert rd.complete_checkpoints() == [1] and rd.partial_checkpoints() == []
    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "iter_1" / "policy")
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_filesystem)], check=True)
    resumed, _ = run_tiny("iterations=3", "resume=true", out=out)
    same_rows(resumed, full)


@pytest.mark.slow
def test_a_full_filesystem_during_a_metrics_write_stops_clearly_and_resume_continues(
    run_tiny, uninterrupted, tmp_path, monkeypatch
):
    """Fault injected: iteration 2's metrics row is cut short by a full disk (half the line written, then
    ENOSPC). One line naming metrics.jsonl; rows 0 and 1 intact; the resumed run equals the uninterrupted one."""
    import errno

    from pipeline.rundir import RunDir

    full = uninterrupted
    append = RunDir.append_metrics

    def disk_fills(self, row):
        if row["iteration"] == 2:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row)[:40])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
        append(self, row)

    monkeypatch.setattr(RunDir, "append_metrics", disk_fills)
    with pytest.raises(
        PipelineError, match=r"^no space left on the device: writing the run's records \(.*metrics\.jsonl"
    ):
        run_tiny("iterations=3", out=tmp_path / "run")
    monkeypatch.setattr(RunDir, "append_metrics", append)
    assert [r["iteration"] for r in RunDir(tmp_path / "run").read_metrics()] == [0, 1]
    resumed, _ = run_tiny("iterations=3", "resume=true", out=tmp_path / "run")
    same_rows(resumed, full)
