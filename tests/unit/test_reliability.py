"""Checkpoints, exact resume, actor faults and bad inputs: one clear message each, nothing lost."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.loop import PipelineError
from pipeline.preflight import prepare
from pipeline.rundir import RunDirError


def test_missing_model_path(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path '/nonexistent/model' does not exist"):
        prepare(tiny_cfg(tmp_path, "model.path=/nonexistent/model"))


def test_model_without_safetensors(tiny_cfg, tmp_path):
    d = tmp_path / "pickle_model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        prepare(tiny_cfg(tmp_path / "out", f"model.path={d}"))


def test_unwritable_output_dir(tiny_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="is not writable"):
        prepare(tiny_cfg(blocker / "run"))


def test_reward_function_that_does_not_exist(tiny_cfg, tmp_path):
    from rewards.scorers import RewardError

    with pytest.raises(RewardError, match="has no function 'nope'"):
        prepare(tiny_cfg(tmp_path, "reward.function=rewards.functions:nope"))
    with pytest.raises(RewardError, match="cannot import module"):
        prepare(tiny_cfg(tmp_path, "reward.function=no_such_module:f"))


def test_cli_prints_one_line_without_traceback(tmp_path):
    onalign = Path(sys.executable).parent / "onalign"
    res = subprocess.run(
        [str(onalign), "run", "configs/demo-cpu.yaml", "algoritm.name=dpo", f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "did you mean 'algorithm'" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "fn,message",
    [
        ("boom", "raised RuntimeError: reward server unreachable"),
        ("nan", "returned nan for sample 3"),
        ("short", "returned 1 scores for 4 responses"),
        ("inf", "returned inf"),
    ],
)
def test_a_reward_that_always_fails_is_refused_before_any_actor(tiny_cfg, tmp_path, faulty, fn, message):
    """README says the reward is checked before any actor starts, but only its import was; a reward
    that fails on every call was found after 45-63 s of start-up. Now it is called once on a few dataset rows
    (their reference answers) in the checks a run and --dry-run make, and nothing is written."""

    from common.errors import RewardError
    from pipeline.preflight import check_run

    t = time.monotonic()
    with pytest.raises(RewardError, match=message):
        check_run(tiny_cfg(tmp_path / "out", f"reward.function={faulty}:{fn}"))
    assert time.monotonic() - t < 30 and not (tmp_path / "out").exists()


def test_a_remote_reward_answering_malformed_json_gets_a_fitting_hint(tiny_cfg, tmp_path):
    """The server is up and answers, but not JSON: 'check that the server is up' did not fit that failure."""
    from reward_server import start_reward_server

    from common.errors import RewardError
    from pipeline.preflight import check_run

    url, server = start_reward_server(lambda body: b"<html>502 Bad Gateway</html>")
    try:
        with pytest.raises(RewardError, match='answered, but not with JSON .*"scores"'):
            check_run(tiny_cfg(tmp_path / "out", "reward.kind=remote", f"reward.url={url}", "reward.retries=0"))
    finally:
        server.shutdown()


def test_a_full_disk_in_the_trainers_checkpoint_write_is_an_os_error(model_path, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... (os error 28)"): the trainer's save turns it into
    the OSError it stands for (so the driver names the path and the space), as it does for a quota (122)."""
    import errno

    import transformers.modeling_utils
    from safetensors import SafetensorError

    from workers.trainer import TrainerWorker
    from workers.weights import as_os_error

    trainer = TrainerWorker(0, 1)
    trainer.setup(model_path, {}, {"name": "dpo"}, seed=0)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(OSError) as e:
        trainer.save(str(tmp_path / "ckpt"))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "ckpt" / "policy")
    quota = as_os_error(SafetensorError("I/O error: Disk quota exceeded (os error 122)"), "p")
    assert isinstance(quota, OSError) and quota.errno == errno.EDQUOT
    other = ValueError("bad")
    assert as_os_error(other, "p") is other


def test_the_sync_check_stops_on_a_nan_gap_and_tells_a_model_mismatch_from_a_lost_sync(tiny_cfg, tmp_path):
    """A NaN gap (NaN or infinite log-probs on a side) stops the run as a gap above the tolerance does; a gap in
    the first iteration a process runs (both sides had just loaded the same weights) is a model the two compute
    differently, not a lost sync."""
    from types import SimpleNamespace

    from pipeline.loop import Loop
    from pipeline.rundir import RunDir

    loop = SimpleNamespace(cfg=tiny_cfg(tmp_path), rundir=RunDir(tmp_path), first=1)
    loop.stopped = lambda problem, fix: Loop.stopped(loop, problem, fix)
    Loop.check_sync(loop, 2, 1e-6)
    Loop.check_sync(loop, 2, None)  # no sample of this iteration trained
    with pytest.raises(PipelineError, match=r"differ from the trainers' by up to nan per token"):
        Loop.check_sync(loop, 2, float("nan"))
    with pytest.raises(PipelineError, match=r"right after both loaded the same weights: vLLM and transformers"):
        Loop.check_sync(loop, 1, 0.5)
    loop.first = 3  # resumed after iteration 2
    with pytest.raises(PipelineError, match=r"right after both loaded the same weights"):
        Loop.check_sync(loop, 3, 0.5)
    with pytest.raises(PipelineError, match=r"the weight sync after iteration 3 did not reach the engine"):
        Loop.check_sync(loop, 4, 0.5)
    Loop.check_sync(SimpleNamespace(**{**vars(loop), "cfg": tiny_cfg(tmp_path, "sync.check=false")}), 4, 0.5)
