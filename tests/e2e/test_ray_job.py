"""The user's real path: `ray start --head`, `ray job submit --working-dir .`, `ray job stop`, reports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.ports import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    dash = free_port("127.0.0.1")
    temp = tmp_path_factory.mktemp("rayhead")
    start = [
        str(bindir / "ray"),
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--port",
        str(free_port("127.0.0.1")),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--disable-usage-stats",
        "--temp-dir",
        str(temp),
        "--include-dashboard",
        "true",
    ]
    # The test session's own cluster already holds Ray's default agent ports on this machine.
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
    ):
        start += [flag, str(free_port("127.0.0.1"))]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
    yield env
    stop_head(str(temp))


def stop_head(temp_dir: str) -> None:
    """Stop only this head (`ray stop` would also kill the test session's own cluster)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


def ray_job(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def submit(env, out: Path, iterations: int) -> str:
    res = ray_job(
        env,
        "submit",
        "--no-wait",
        "--working-dir",
        ".",
        "--",
        "onalign",
        "run",
        "configs/demo-cpu.yaml",
        f"iterations={iterations}",
        f"output_dir={out}",
        "data.num_train_prompts=48",
        "data.num_eval_prompts=16",
        "train.epochs=1",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", res.stdout + res.stderr).group(0)


def status(env, job_id: str) -> str:
    """The job's state word, lower case: pending, running, succeeded, failed or stopped."""
    res = ray_job(env, "status", job_id)
    text = res.stdout + res.stderr
    found = re.search(r"Status for job '[^']+': (\w+)", text) or re.search(r"Job '[^']+' (?:was )?(\w+)", text)
    return found.group(1).lower() if found else text


def test_stop_mid_run_keeps_the_completed_checkpoints(head, tmp_path):
    """`ray job stop` of a job on a `ray start --head` cluster (a job submitted and run to success, with its
    report and a quiet log, is tests/e2e/test_multinode.py's)."""
    out2 = tmp_path / "job2"
    job2 = submit(head, out2, 50)
    from pipeline.rundir import RunDir

    deadline = time.time() + 600
    # any complete checkpoint: an iteration of this run takes about a second, and keep_checkpoints=2 prunes
    # iter_1 soon after (waiting for iter_1 itself could miss it and wait out the deadline)
    while not RunDir(out2).complete_checkpoints() and time.time() < deadline:
        time.sleep(0.2)
    assert ray_job(head, "stop", job2, timeout=180).returncode == 0
    assert status(head, job2) == "stopped"
    rd = RunDir(out2)
    done = rd.complete_checkpoints()
    assert done, "a completed iteration must leave a checkpoint"
    iterations = [r["iteration"] for r in rd.read_metrics()]
    assert iterations == list(range(len(iterations))) and max(iterations) >= done[-1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(rd.checkpoint_path(done[-1]) / "policy")
    assert not any(p.name.startswith("iter_") and not (p / "state.json").exists() for p in rd.checkpoints.iterdir())
    shutil.rmtree(out2, ignore_errors=True)
