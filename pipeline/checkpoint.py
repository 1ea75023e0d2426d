"""Per-iteration checkpoints and resume.

A checkpoint is written into a temporary directory and renamed into place only when complete, so a
crash mid-write leaves the previous one loadable. It holds the policy as an HF model directory
(safetensors), APO's previous iterate, the reward actor's pools and pairs, and the initial policy's
eval rewards. Random streams are derived from (seed, iteration), so no RNG state needs saving: a
resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import OnalignError, one_line
from pipeline.rundir import CHECKPOINT_FORMAT, RunDir, RunDirError

if TYPE_CHECKING:
    from common.config import RunConfig

# Settings that may change when a run is resumed: they change how long it runs, how it reports and how
# patient it is, never what it computes. Every other setting must equal the run's saved config.yaml.
RESUMABLE = (
    "iterations",
    "call_timeout_s",
    "quiet",
    "verbose",
    "tensorboard",
    "wandb",
    "wandb_project",
    "keep_checkpoints",
    "ray_num_cpus",
    "resume",
    "output_dir",
    "reward.timeout_s",
    "reward.retries",
    # speed only: the same computation, faster or slower
    "rollout.cpu_preload_tcmalloc",
    "rollout.enforce_eager",
    "rollout.enable_prefix_caching",
    "train.reference_logps",
    "train.cpu_mmap_threshold_kib",
    "train.cpu_preload_tcmalloc",
)
NOT_RECORDED = ("resume",)  # differs on every resume: not worth a config_changes.jsonl row


class ResumeError(OnalignError, RuntimeError):
    pass


def fingerprint_of(cfg: RunConfig, train_prompts: int, eval_prompts: int) -> dict:
    """What must match between a checkpoint and the run that resumes from it."""
    return {
        "model": cfg.model.path,
        "algorithm": cfg.algorithm.name,
        "train_prompts": train_prompts,
        "eval_prompts": eval_prompts,
        "data": cfg.data.train,
        "seed": cfg.seed,
    }


def check_fingerprint(state: dict, mine: dict, path: Path) -> None:
    theirs = state.get("fingerprint") or {}
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(
            f"cannot resume from {path}: it was made by a different run ({detail}); "
            "resume with the original config or choose a new output_dir"
        )


def checkpoint_state(fingerprint: dict, initial_eval: list[float], reward_state: dict) -> dict:
    """What state.json holds beside the policy files (written last: it marks the checkpoint complete)."""
    return {"fingerprint": fingerprint, "initial_eval_rewards": initial_eval, "reward_state": reward_state}


# ---------------------------------------------------------------- checking a checkpoint on the driver


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded (truncated, bad header), or None; reads the header only."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # checks the header covers the file exactly
            for key in f.keys():
                f.get_slice(key).get_shape()
    except Exception as e:  # SafetensorError, OSError
        return f"{path} is damaged or truncated ({one_line(e, whole=True)})"
    return None


def checkpoint_problem(rundir: RunDir, iteration: int) -> str | None:
    """Why checkpoints/iter_K cannot be resumed from, naming the file; None when it is complete. Cheap:
    state.json and config files are parsed, safetensors files are checked by their headers."""
    path = rundir.checkpoint_path(iteration)
    try:
        state = rundir.load_state(iteration)
    except RunDirError as e:
        return str(e)
    if state.get("format") != CHECKPOINT_FORMAT:
        return (
            f"{path / 'state.json'} has checkpoint format {state.get('format')!r}, this version reads "
            f"{CHECKPOINT_FORMAT}"
        )
    missing = [k for k in ("fingerprint", "initial_eval_rewards", "reward_state") if k not in state]
    if missing:
        return f"{path / 'state.json'} lacks {', '.join(missing)}"
    policy = path / "policy"
    try:
        config = json.loads((policy / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return f"{policy / 'config.json'} cannot be read ({one_line(e, whole=True)})"
    weights = sorted(policy.glob("*.safetensors"))
    if not weights:
        return f"{policy} has no .safetensors weights"
    index = policy / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{index} cannot be read ({one_line(e, whole=True)})"
        absent = sorted(s for s in shards if not (policy / s).is_file())
        if absent:
            return f"{policy} lacks the weight shard(s) {', '.join(absent)} named in {index.name}"
    apo_prev = path / "apo_prev.safetensors"
    for file in weights + ([apo_prev] if apo_prev.exists() else []):
        problem = safetensors_problem(file)
        if problem:
            return problem
    return None


def plan_resume(rundir: RunDir, cfg: RunConfig, log: Callable[[str], None]) -> int:
    """The checkpoint a resume loads: the newest one that passes `checkpoint_problem` (a damaged one is
    named and skipped), or 0 to start over. Starting over is only done for resume=auto, or when no
    iteration ever completed (only the initial evaluation's row exists); otherwise ResumeError."""
    for partial in rundir.partial_checkpoints():
        log(f"ignoring {partial}: a checkpoint whose write was interrupted (it is removed when the run starts)")
    problems = []
    for it in reversed(rundir.complete_checkpoints()):
        problem = checkpoint_problem(rundir, it)
        if problem is None:
            if problems:
                log(f"checkpoint damaged: {'; '.join(problems)}. Resuming from {rundir.checkpoint_path(it)} instead")
            else:
                log(f"resuming after iteration {it} from {rundir.checkpoint_path(it)}")
            return it
        problems.append(problem)
    rows = rundir.read_metrics()
    if cfg.resume == "auto":
        damaged = f" (damaged: {'; '.join(problems)})" if problems else ""
        replaced = f"; its {len(rows)} metrics.jsonl rows are replaced" if rows else ""
        log(
            f"resume=auto: no complete checkpoint in output_dir '{rundir.where}'{damaged}: starting a new run{replaced}"
        )
        return 0
    if problems:
        raise ResumeError(
            f"cannot resume: {'; '.join(problems)}. There is no other complete checkpoint in output_dir "
            f"'{rundir.where}'; set resume=auto to start this run over (its metrics are replaced), or start a "
            "new output_dir"
        )
    if rows and all(r["iteration"] == 0 for r in rows):
        log(
            f"no iteration completed in output_dir '{rundir.where}' yet (only the initial evaluation): "
            "starting again from iteration 0"
        )
        return 0
    held = (
        f"metrics.jsonl has rows up to iteration {max(r['iteration'] for r in rows)}, but checkpoints/ holds "
        "no complete iter_K"
        if rows
        else "it holds no run"
    )
    raise ResumeError(
        f"no complete checkpoint in output_dir '{rundir.where}' to resume from ({held}); check output_dir, "
        "or set resume=auto to start this run over there (its metrics are replaced)"
    )


# ---------------------------------------------------------------- comparing configs on resume


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare_configs(saved: dict, cfg: RunConfig) -> tuple[dict, dict]:
    """(refused, allowed): the settings of `cfg` that differ from the run's saved config, key -> (old, new).
    A key the saved config predates is compared with its default (what that run used)."""
    from common.config import RunConfig
    from common.config_files import RENAMED

    old = _flat(saved)
    for (section, key), new in RENAMED.items():  # a run saved before a rename: compare under the new name
        if f"{section}.{key}" in old:
            old.setdefault(f"{section}.{new}", old.pop(f"{section}.{key}"))
    defaults = _flat(RunConfig().model_dump(mode="json"))
    refused, allowed = {}, {}
    for key, value in _flat(cfg.model_dump(mode="json")).items():
        before = old[key] if key in old else defaults.get(key)
        if before != value:
            (allowed if key in RESUMABLE else refused)[key] = (before, value)
    return refused, allowed


def check_resume_config(rundir: RunDir, cfg: RunConfig, log: Callable[[str], None]) -> dict:
    """Refuse a resume whose settings would change the run's results (one message listing each one, old vs
    new); returns the allowed changes (key -> [old, new]) to record. Writes nothing."""
    saved = rundir.read_config()
    if saved is None:
        log(
            f"{rundir.config_path} is missing: only the checkpoint's model, algorithm, data and seed can be "
            "checked against this config"
        )
        return {}
    refused, allowed = compare_configs(saved, cfg)
    if refused:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in refused.items())
        raise ResumeError(
            f"cannot resume the run in output_dir '{rundir.where}': it was made by a different run ({detail}). "
            f"These settings change results and must equal the run's {rundir.config_path.name}: resume with "
            "the original values, or start a new output_dir for the new settings. Settings that may change "
            f"on resume: {', '.join(RESUMABLE)}"
        )
    changes = {k: [a, b] for k, (a, b) in allowed.items() if k not in NOT_RECORDED}
    if changes:
        log("changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    return changes


def resume_point(rundir: RunDir, cfg: RunConfig, fingerprint: dict, log) -> tuple[int, dict | None]:
    """The checkpoint to resume from (`preflight.prepare` plans it; planned here when it did not) and its
    checked state, or (0, None) to start over (its rows and checkpoints are cleared)."""
    last = rundir.resume_from
    if last is None:
        last = plan_resume(rundir, cfg, log)
    if last == 0:
        rundir.truncate_to(-1)  # start over, keeping no rows of the replaced run
        rundir.remove_checkpoints()
        return 0, None
    state = rundir.load_state(last)
    check_fingerprint(state, fingerprint, rundir.checkpoint_path(last))
    return last, state
