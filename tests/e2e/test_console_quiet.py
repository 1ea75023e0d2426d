"""A quiet console by default: the actors' own output goes to OUTPUT_DIR/logs/<actor>.log (set per run, so
actors shared by several runs follow each one), `verbose` streams it as Ray does, and a failure is one
line plus the log that holds its details. The last test counts the actors' lines on the console of a
real 1-iteration `onalign run`: there are none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import one_line
from pipeline.console import ActorLogs

ROOT = Path(__file__).resolve().parents[2]


def echo_class():
    """Defined in a function, so that Ray ships the class by value (workers cannot import this test module)."""

    class Echo:
        """An actor that prints the way vLLM and DeepSpeed do: Python prints at start-up and in its methods,
        and C-level writes straight to file descriptors 1 and 2."""

        def __init__(self) -> None:
            print("echo: starting up", flush=True)

        def say(self, text: str) -> int:
            print(f"echo: {text}", flush=True)
            os.write(2, f"echo (fd 2): {text}\n".encode())
            return os.getpid()

        def fail(self) -> None:
            print("echo: about to fail", flush=True)
            raise ValueError("boom: the engine ran out of KV cache")

        def die(self) -> None:
            print("echo: about to die", flush=True)
            os._exit(1)

        def stdout_file(self) -> str:
            return os.path.realpath("/proc/self/fd/1")

    return Echo


def wait_for(path: Path, text: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.1)


@pytest.fixture
def echo(ray_cluster):
    import ray

    actor = ray.remote(num_cpus=0)(echo_class()).remote()
    yield actor
    ray.kill(actor, no_restart=True)


@pytest.mark.slow
def test_actor_output_goes_to_its_log_per_run(echo, tmp_path):
    import ray

    ray.get(echo.say.remote("before any run"))
    first = ActorLogs(tmp_path / "run1")
    first.attach({"echo": echo}, timeout_s=60)
    ray.get(echo.say.remote("during run 1"))
    log1 = first.path("echo")
    assert log1 == tmp_path / "run1" / "logs" / "echo.log"
    text = wait_for(log1, "echo (fd 2): during run 1")
    # the start-up output (printed before the run) is copied in, then the run's own, Python and fd 2 alike
    assert "echo: starting up" in text and "echo: before any run" in text
    assert "echo: during run 1" in text and "echo (fd 2): during run 1" in text

    # a second run on the same actor (as the tests' shared actors do) gets its own log
    second = ActorLogs(tmp_path / "run2")
    second.attach({"echo": echo}, timeout_s=60)
    ray.get(echo.say.remote("during run 2"))
    text2 = wait_for(second.path("echo"), "echo (fd 2): during run 2")
    assert "echo: during run 2" in text2 and "echo: starting up" in text2
    assert "during run 2" not in log1.read_text()


@pytest.mark.slow
def test_verbose_points_the_output_back_at_ray(echo, tmp_path):
    import ray

    ActorLogs(tmp_path / "quiet-run").attach({"echo": echo}, timeout_s=60)
    assert ray.get(echo.stdout_file.remote()) == str(tmp_path / "quiet-run" / "logs" / "echo.log")
    verbose = ActorLogs(tmp_path / "verbose-run", stream=True)
    verbose.attach({"echo": echo}, timeout_s=60)
    ray_file = ray.get(echo.stdout_file.remote())
    assert re.search(r"/logs/worker-[0-9a-f-]+\.out$", ray_file), ray_file  # Ray's own, which it streams
    ray.get(echo.say.remote("streamed"))
    assert not (tmp_path / "verbose-run" / "logs").exists()


@pytest.mark.slow
def test_a_log_that_cannot_be_written_leaves_the_output_with_ray(echo, tmp_path):
    import ray

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    logs = ActorLogs(blocker)  # its logs/ cannot be made under a file (as on a node without the run dir)
    logs.attach({"echo": echo}, timeout_s=60)
    assert re.search(r"/logs/worker-[0-9a-f-]+\.out$", ray.get(echo.stdout_file.remote()))
    assert logs.by_actor == {} and ray.get(echo.say.remote("still running"))


@pytest.mark.slow
def test_an_actor_task_error_names_the_actors_log(echo, tmp_path):
    import ray

    logs = ActorLogs(tmp_path)
    logs.attach({"rollout-0": echo}, timeout_s=60)
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        with logs.explaining():
            ray.get(echo.fail.remote())
    log = tmp_path / "logs" / "rollout-0.log"
    assert info.value.onalign_log == str(log)
    assert one_line(info.value) == "Echo.fail failed: ValueError: boom: the engine ran out of KV cache"
    text = wait_for(log, "ValueError")
    assert "echo: about to fail" in text and "Traceback" in text and "ValueError: boom" in text


@pytest.mark.slow
def test_a_dead_actor_behind_a_pipeline_error_names_the_actors_log(echo, tmp_path):
    import ray

    from pipeline.loop import PipelineError

    logs = ActorLogs(tmp_path)
    logs.attach({"trainer-1": echo}, timeout_s=60)
    with pytest.raises(PipelineError) as info:
        with logs.explaining():
            try:
                ray.get(echo.die.remote())
            except ray.exceptions.RayActorError:
                raise PipelineError("an actor died during training; rerun with --resume") from None
    assert info.value.onalign_log == str(tmp_path / "logs" / "trainer-1.log")
    assert "echo: about to die" in (tmp_path / "logs" / "trainer-1.log").read_text()


ACTOR_LINE = re.compile(r"\((?:RolloutWorker|TrainerWorker|RewardWorker|raylet|pid=)|pid=\d+")


@pytest.mark.slow
def test_a_real_run_prints_no_line_from_an_actor(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/demo-cpu.yaml", "iterations=1"]
    cmd += ["data.num_train_prompts=48", "data.num_eval_prompts=16", "train.epochs=1", f"output_dir={out}"]
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-4000:]
    actor_lines = [line for line in console.splitlines() if ACTOR_LINE.search(line)]
    assert actor_lines == [], "\n".join(actor_lines[:40])
    # stdout: the run header, one line per iteration and the closing line, nothing else
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert all(line.startswith("[onalign] ") for line in lines), res.stdout
    assert res.stderr.strip() == "", res.stderr[-4000:]  # no library line either (Ray's token-auth notice)
    assert len(lines) == 4 and "done: 1 iterations" in lines[-1]
    logs = out / "logs"
    names = ["actors.json", "reward.log", "rollout-0.log", "trainer-0.log", "trainer-1.log"]
    assert sorted(p.name for p in logs.iterdir()) == names  # actors.json: where each ran
    rollout = (logs / "rollout-0.log").read_text()
    assert "pid" in rollout.splitlines()[0]
    assert "Failed to load weights" not in rollout  # fixed at the source (rotary cache, tied head), not hidden
