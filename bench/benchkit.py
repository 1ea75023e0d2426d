"""Shared bench plumbing: one Ray cluster and one set of heavy actors for many runs of one script."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common.config_files import load_config  # noqa: E402


def machine() -> str:
    return f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()})"


@contextmanager
def shared_workers(base_overrides: list[str], base_config: str = "configs/demo-cpu.yaml"):
    """Start Ray + vLLM engine + trainer ranks once (for `base_config`'s model); yield a
    `run(out, overrides, config=base_config) -> (rows, seconds)` function."""
    import ray

    from pipeline.driver import init_ray, run_with_workers, start_workers
    from pipeline.preflight import prepare

    cfg0 = load_config(ROOT / base_config, [*base_overrides, "output_dir=/tmp/onalign-bench/_"])
    init_ray(cfg0)
    from pipeline.model_source import resolve_model

    workers = start_workers(cfg0, resolve_model(cfg0))

    def run(out: str, overrides: list[str], config: str = base_config):
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(ROOT / config, [*base_overrides, *overrides, f"output_dir={out}", "quiet=true"])
        t = time.perf_counter()
        rows = run_with_workers(prepare(cfg), workers)
        return rows, time.perf_counter() - t

    try:
        yield run
    finally:
        workers.shutdown()
        ray.shutdown()


def start_engine(path: str, kv_cache_mb: int = 256, max_model_len: int = 512):
    """One vLLM rollout actor on `path` (one CPU, the pipeline's engine environment), ready to generate."""
    import ray

    from common.config import RolloutConfig
    from workers.rollout import RolloutWorker, engine_env

    cfg = RolloutConfig(kv_cache_mb=kv_cache_mb, max_model_len=max_model_len)
    engine = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": engine_env(cfg)}).remote(path, cfg)
    ray.get(engine.ready.remote())
    return engine


def best_of(fn, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls (after one warm-up): the usual way to time a short operation."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cumulative(stats, *names: str, suffix: bool = False) -> float:
    """Summed cumulative seconds (a `pstats.Stats`) of the outermost profiled functions called one of `names`
    (or whose name ends with one, `suffix`): a name's own recursive or nested calls are counted once, through
    its cumulative time."""
    match = (lambda fn, name: fn.endswith(name)) if suffix else (lambda fn, name: fn == name)
    return sum(max((row[3] for key, row in stats.stats.items() if match(key[2], name)), default=0.0) for name in names)


def run_json(argv: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run `python *argv` in its own process (its own allocator, preloads and threads); its last line of
    output is a JSON object, returned. Raises with the end of its stderr if it fails."""
    import json
    import subprocess

    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_section(title: str, body: str) -> None:
    """Replace (or append) one `## title` section of BENCHMARKS.md."""
    path = ROOT / "BENCHMARKS.md"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nEvery figure below was printed by the command written beside it.\n"
    )
    start = text.find(f"\n## {title}\n")
    section = f"\n## {title}\n\n{body.strip()}\n"
    if start == -1:
        text = text.rstrip("\n") + "\n" + section
    else:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[nxt:] if nxt != -1 else "")
    path.write_text(text)


def cell(values: list[float]) -> str:
    """mean ± half the range over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def eval_table(names: list[str], evals: dict, secs: dict, iterations: int) -> list[str]:
    """Markdown rows: per method, the eval reward per iteration (mean ± half the range over seeds), the
    mean (min) gain and the mean wall seconds per run. `evals[name]` is [seed][iteration]."""
    head = "| method | " + " | ".join(f"iter {i}" for i in range(iterations + 1)) + " | final - start | wall s/run |"
    lines = [head, "|---|" + "---|" * (iterations + 3)]
    for name in names:
        runs = evals[name]  # [seed][iteration]
        per_iter = [[run[i] for run in runs] for i in range(iterations + 1)]
        gains = [run[-1] - run[0] for run in runs]
        lines.append(
            f"| {name} | "
            + " | ".join(cell(v) for v in per_iter)
            + f" | {statistics.fmean(gains):+.3f} (min {min(gains):+.3f}) | {statistics.fmean(secs[name]):.0f} |"
        )
    return lines
