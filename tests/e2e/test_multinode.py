"""The cluster path run as a cluster: three real Ray nodes on this machine (`ray.cluster_utils`):
a head with neither trainer nor engine resources, a node that takes the trainer ranks and one that takes the
engine (custom resources, asked for through the config's `*.resources`). Runs go through the CLI in a
process of their own (`RAY_ADDRESS` = the cluster), as a user's would; the test process never joins it.

Token authentication stays on (Ray 2.60's default for a started cluster): the nodes start with
RAY_AUTH_MODE=token and the token in ~/.ray/auth_token, and `ray job submit` passes it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from same_metrics import assert_same_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

RUN = [
    "configs/demo-cpu.yaml",
    "iterations=3",
    "data.num_train_prompts=32",
    "data.num_eval_prompts=8",
    "train.micro_batch_size=8",
    "train.epochs=1",
    "tensorboard=false",
    "call_timeout_s=300",
]
ACROSS = [
    "train.resources={onalign_trainer: 1}",
    "rollout.resources={onalign_engine: 1}",
    "reward.resources={onalign_head: 1}",  # else Ray may put it on the trainer node, and the loss takes it too
]
COMPARED = ["eval_reward_mean", "reward_mean", "loss", "pair_accuracy", "pairs", "generated_tokens"]


def auth_env() -> dict[str, str]:
    """Token authentication on, with a token in ~/.ray/auth_token (generated once if missing)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


class MultiNode:
    """tests/multinode.py's cluster, driven over its stdin (see there)."""

    def __init__(self) -> None:
        self.base_env = auth_env()
        self.proc = subprocess.Popen(
            [sys.executable, "tests/multinode.py"],
            cwd=ROOT,
            env=self.base_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()
        self.env = dict(self.base_env, RAY_ADDRESS=self.info["address"])

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the test cluster stopped (exit {self.proc.wait(timeout=30)})")
        return json.loads(line)

    def command(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        self.info = self._read()
        return self.info

    def node_id(self, name: str) -> str:
        return self.info["nodes"][name]

    def stop(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


@pytest.fixture(scope="module")
def cluster():
    c = MultiNode()
    yield c
    c.stop()


def onalign(env: dict, out: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", *RUN, f"output_dir={out}", *overrides, "--quiet"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def across_nodes(cluster, tmp_path_factory):
    """The reference run: 3 iterations, trainer ranks on one node, the engine on another."""
    out = tmp_path_factory.mktemp("across") / "run"
    proc = onalign(cluster.env, out, *ACROSS)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def test_trainers_and_engine_on_their_own_nodes(cluster, across_nodes, run_tiny, tmp_path):
    """Placement follows the config's resources; the metrics equal a single-node run's (same seed)."""
    where = json.loads((across_nodes / "logs" / "actors.json").read_text())
    assert where["trainer-0"]["node_id"] == where["trainer-1"]["node_id"] == cluster.node_id("trainer")
    assert where["rollout-0"]["node_id"] == cluster.node_id("engine")
    assert where["reward"]["node_id"] == cluster.node_id("head")
    assert len((across_nodes / "metrics.jsonl").read_text().splitlines()) == 4
    assert (across_nodes / "checkpoints" / "iter_3" / "state.json").is_file()  # written from the trainer node

    # the same run on one node: the session's own engine and trainer ranks (the config decides the metrics)
    single, _ = run_tiny(*RUN[1:], out=tmp_path / "single")  # RUN[0] is the default config
    assert_same_metrics(rows_of(across_nodes), single, COMPARED)


def test_ray_job_submit_to_the_cluster(cluster, tmp_path):
    """README's cluster commands against the three-node cluster: `ray job submit` to the head's dashboard,
    token auth on, `--working-dir .`; the job's driver runs on the head, the actors on their nodes; exit 0 and
    a readable report."""
    out = tmp_path / "job"
    env = dict(cluster.env, RAY_ADDRESS=cluster.info["dashboard"])
    run = ["onalign", "run", *RUN, "iterations=1", f"output_dir={out}", *ACROSS, "--quiet"]
    submit = ["ray", "job", "submit", "--working-dir", ".", "--", *run]
    deadline = time.time() + 300
    while True:  # the head's job agent takes a few seconds (on a loaded machine, minutes) to come up
        proc = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "done: 1 iterations" in proc.stdout
    # --quiet: one line per iteration, none of the actors' own output (it stays in Ray's log files)
    assert "pid=" not in proc.stdout and "RolloutWorker" not in proc.stdout, proc.stdout[-2000:]
    assert [r["iteration"] for r in rows_of(out)] == [0, 1] and (out / "report.html").is_file()
    where = json.loads((out / "logs" / "actors.json").read_text())
    assert where["driver"]["node_id"] == cluster.node_id("head")
    assert where["trainer-0"]["node_id"] == cluster.node_id("trainer")
    assert where["rollout-0"]["node_id"] == cluster.node_id("engine")
    unauthenticated = subprocess.run(
        ["ray", "job", "list"], cwd=ROOT, env=dict(env, RAY_AUTH_MODE="disabled"), capture_output=True, text=True
    )
    assert unauthenticated.returncode != 0  # token authentication is on


def test_a_lost_trainer_node_stops_the_run_clearly_and_resume_continues_it(cluster, across_nodes, tmp_path):
    """The trainer node dies during iteration 2 (its raylet stopped, as a lost machine): the run stops within
    a bounded time, with one line that names the lost actors and how to resume; iteration 1 stays on disk;
    once a trainer node is back, --resume finishes the run with the metrics of the uninterrupted one."""
    out = tmp_path / "lost"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", *RUN, f"output_dir={out}", *ACROSS, "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoints" / "iter_1" / "state.json").is_file() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        # An iteration of this tiny run takes half a second: hold the driver still while the node goes, so that
        # the loss lands in iteration 2 and not after the run's end.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            cluster.command("remove trainer")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        lost_at = time.time()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_after = time.time() - lost_at
    cluster.command("add trainer")
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("onalign: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "trainer-0, trainer-1 died during training: node" in errors[0] and "left the cluster" in errors[0]
    assert "Iterations up to 1 are saved" in errors[0] and "--resume" in errors[0]
    assert stopped_after < 120, f"the run took {stopped_after:.0f}s to stop after the node was lost"
    assert [r["iteration"] for r in rows_of(out)] == [0, 1]
    resumed = onalign(cluster.env, out, *ACROSS, "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert_same_metrics(rows_of(out), rows_of(across_nodes), COMPARED)


def test_ray_job_stop_mid_run_keeps_the_completed_checkpoints(cluster, tmp_path):
    """`ray job stop` (SIGTERM to the job's driver) mid-run: the job ends stopped, every completed iteration
    keeps its metrics row, the last complete checkpoint loads, and no partial checkpoint is left behind."""
    from transformers import AutoModelForCausalLM

    from pipeline.rundir import RunDir

    out = tmp_path / "stopped"
    env = dict(cluster.env, RAY_ADDRESS=cluster.info["dashboard"])
    run = ["onalign", "run", *RUN, "iterations=50", f"output_dir={out}", *ACROSS, "--quiet"]
    submitted = ray_job(env, "submit", "--no-wait", "--working-dir", ".", "--", *run)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr).group(0)
    deadline = time.time() + 600
    # any complete checkpoint: an iteration of this run takes about a second, and keep_checkpoints=2 prunes
    # iter_1 soon after (waiting for iter_1 itself could miss it and wait out the deadline)
    while not RunDir(out).complete_checkpoints() and time.time() < deadline:
        time.sleep(0.2)
    assert ray_job(env, "stop", job, timeout=180).returncode == 0
    assert job_status(env, job) == "stopped"
    rd = RunDir(out)
    done = rd.complete_checkpoints()
    assert done, "a completed iteration must leave a checkpoint"
    iterations = [r["iteration"] for r in rd.read_metrics()]
    assert iterations == list(range(len(iterations))) and max(iterations) >= done[-1]
    AutoModelForCausalLM.from_pretrained(rd.checkpoint_path(done[-1]) / "policy")
    assert not any(p.name.startswith("iter_") and not (p / "state.json").exists() for p in rd.checkpoints.iterdir())


def ray_job(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def job_status(env: dict, job_id: str) -> str:
    """The job's state word, lower case: pending, running, succeeded, failed or stopped."""
    res = ray_job(env, "status", job_id)
    text = res.stdout + res.stderr
    found = re.search(r"Status for job '[^']+': (\w+)", text) or re.search(r"Job '[^']+' (?:was )?(\w+)", text)
    return found.group(1).lower() if found else text
