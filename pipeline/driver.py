"""The driver: validate everything, start (or join) Ray, start the actors, run the loop, clean up.

All checks that need no actor (config, output dir, model path, data) run before Ray starts, so a
user mistake costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray

from pipeline.checkpoint import ResumeError, check_fingerprint, check_resume_config, fingerprint_of, plan_resume
from pipeline.config import BUILTIN_MODEL, BUILTIN_SMOLLM2, RunConfig
from pipeline.console import Console
from pipeline.data import DataError, PromptSet, load_prompt_sets
from pipeline.loop import Loop, Workers
from pipeline.methods import get_method
from pipeline.rundir import RunDir, RunDirError
from workers.actor_group import TrainerGroup
from workers.rollout import ENGINE_ENV
from workers.weight_sync import resolve_backend


@dataclass
class Prepared:
    cfg: RunConfig
    model_path: str
    train: PromptSet
    eval: PromptSet
    rundir: RunDir


def resolve_model(cfg: RunConfig) -> str:
    m = cfg.model
    if m.path == BUILTIN_MODEL:
        from pipeline.tiny_model import tiny_model_path

        return str(tiny_model_path(m.tiny_hidden_size, m.tiny_layers, m.sft_steps))
    if m.path == BUILTIN_SMOLLM2:
        from pipeline.smollm2 import smollm2_path

        return str(smollm2_path())
    p = Path(m.path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model.path '{p}' has no config.json; point it at an HF model directory")
        if not any(p.glob("*.safetensors")):
            raise FileNotFoundError(
                f"model.path '{p}' has no .safetensors weights; onalign loads safetensors only "
                "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
            )
        return str(p)
    if p.is_absolute() or m.path.startswith("."):
        raise FileNotFoundError(f"model.path '{p}' does not exist; set model.path to an HF model directory")
    return m.path  # a hub name: resolved by transformers/vLLM on the cluster


def prepare(cfg: RunConfig) -> Prepared:
    """Every check that needs no actor. Nothing in output_dir is written until all of them passed."""
    from transformers import AutoTokenizer

    rundir = _prepare_rundir(cfg)
    changes = _plan_resume(cfg, rundir)
    if cfg.reward.kind == "function":
        from rewards.scorers import load_function

        load_function(cfg.reward.function)  # a typo in module:function fails here, not in an actor
    if cfg.reward.kind == "model":
        from rewards.model import resolve_reward_model

        rm = resolve_reward_model(cfg.reward.model_path or "")  # builds the tiny RM once, before any actor
        if Path(rm).is_absolute() and not (Path(rm) / "config.json").is_file():
            raise FileNotFoundError(f"reward.model_path '{rm}' is not an HF model directory (no config.json)")
    model_path = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train, eval_set = load_prompt_sets(cfg.data, tokenizer, cfg.seed)
    check_trainable(cfg, train, eval_set)
    if rundir.resume_from:
        state = rundir.load_state(rundir.resume_from)
        check_fingerprint(
            state, fingerprint_of(cfg, len(train), len(eval_set)), rundir.checkpoint_path(rundir.resume_from)
        )
    # ---- every check passed: now the directory may be written
    if not rundir.resume_from:  # a new run (or one started over): the replaced run's records go
        rundir.config_changes_path.unlink(missing_ok=True)
        if not cfg.resume:
            rundir.truncate_to(-1)  # stale samples of a run that never recorded a metrics row
    (rundir.root / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    if changes:
        rundir.append_config_change({"iteration": rundir.resume_from + 1, "changes": changes})
    return Prepared(cfg, model_path, train, eval_set, rundir)


def check_trainable(cfg: RunConfig, train: PromptSet, eval_set: PromptSet) -> None:
    """Refuse data on which the configured method could never train, or an eval set that is the train set."""
    method = get_method(cfg.algorithm.name)
    missing = sum(1 for ids in train.sft_ids if ids is None)
    if method.needs_sft_target and missing:
        raise DataError(
            f"data.train: algorithm '{method.name}' trains on each prompt's target response, but {missing} of "
            f"{len(train)} prompts have none; give the data a '{cfg.data.response_column}' column (or set "
            "data.response_column), or choose a method that needs no target"
        )
    if len(train) < cfg.train.num_workers:
        raise DataError(
            f"data.train: {len(train)} usable prompt(s) after filtering {train.counts}, fewer than the "
            f"train.num_workers={cfg.train.num_workers} ranks that each need one; add prompts"
        )
    shared = set(train.texts) & set(eval_set.texts)
    if cfg.data.eval is None and shared:
        raise DataError(
            f"data: {len(shared)} eval prompt(s) are also train prompts (e.g. {next(iter(shared))[:60]!r}); the data "
            "has too few distinct prompts to hold some out; add distinct prompts or give data.eval"
        )


def _prepare_rundir(cfg: RunConfig) -> RunDir:
    """Create output_dir (never for a resume of a directory that does not exist), prove it writable, and
    read its records: a damaged metrics or samples file stops a fresh run as well as a resume."""
    rundir = RunDir(cfg.output_dir)
    if cfg.resume is True and rundir.url is None and not rundir.root.exists():
        raise ResumeError(
            f"output_dir '{rundir.root}' does not exist, so there is no run to resume; check the path, or drop "
            "--resume to start a new run there"
        )
    rundir.prepare()
    rundir.read_samples()
    if not cfg.resume and (rundir.read_metrics() or rundir.complete_checkpoints()):
        raise RunDirError(
            f"output_dir '{rundir.where}' already holds a run (metrics.jsonl, checkpoints/); rerun with --resume to "
            "continue it, or choose a new output_dir"
        )
    return rundir


def _plan_resume(cfg: RunConfig, rundir: RunDir) -> dict:
    """On resume: pick the checkpoint (naming and skipping damaged ones; stopping when there is none, unless
    resume=auto) and compare the settings with the run's config.yaml. Returns the allowed changes."""
    if not cfg.resume:
        return {}
    log = Console(cfg.quiet).log
    rundir.resume_from = plan_resume(rundir, cfg, log)
    if not rundir.resume_from:
        return {}
    return check_resume_config(rundir, cfg, log)


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (or the job's cluster), else start a local one."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}}
    # quiet: the actors' own output (vLLM, DeepSpeed) stays in Ray's log files, out of the console/job logs
    log_to_driver = not cfg.quiet
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's runtime env (working dir, env vars) applies: do not replace it.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
    else:
        ray.init(
            num_cpus=cfg.ray_num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=1 << 30,
            runtime_env=env,
            log_to_driver=log_to_driver,
        )


def start_workers(cfg: RunConfig, model_path: str) -> Workers:
    """The heavy actors: vLLM engines and the DeepSpeed ranks."""
    r, t = cfg.rollout, cfg.train
    from pipeline.placement import cluster_nodes, fit

    fit(cfg, cluster_nodes())  # refuse a plan that cannot fit instead of waiting forever for resources
    engines = []
    for _ in range(r.num_engines):
        opts: dict = {"runtime_env": {"env_vars": ENGINE_ENV}}
        if r.num_gpus > 0 and r.tensor_parallel_size > 1:
            # vLLM's Ray executor places the TP workers inside this group, all on one node.
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            from pipeline.placement import engine_placement

            pg = engine_placement(r.tensor_parallel_size, r.num_gpus, r.num_cpus)
            ray.get(pg.ready(), timeout=cfg.call_timeout_s)
            opts.update(
                num_cpus=0,
                num_gpus=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True),
            )
        else:
            opts.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus)
        engines.append(
            ray.remote(_rollout_cls())
            .options(**opts)
            .remote(
                model_path,
                r.model_dump(),
                cfg.model.dtype,
                cfg.seed,
                resolve_backend(cfg.sync, r.num_gpus > 0, t.num_gpus > 0),
            )
        )
    trainer_env = {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if t.num_gpus == 0:
        trainer_env["DS_ACCELERATOR"] = "cpu"
    trainers = TrainerGroup(t.num_workers, t.num_cpus, t.num_gpus, trainer_env, cfg.call_timeout_s)
    ray.get([e.ready.remote() for e in engines], timeout=cfg.call_timeout_s)
    return Workers(engines, trainers)


def _rollout_cls():
    from workers.rollout import RolloutWorker

    return RolloutWorker


def make_reward_actor(cfg: RunConfig):
    from rewards.actor import RewardWorker

    return (
        ray.remote(RewardWorker)
        .options(num_cpus=cfg.reward.num_cpus, num_gpus=cfg.reward.num_gpus)
        .remote(cfg.reward.model_dump())
    )


def run_with_workers(prep: Prepared, workers: Workers, console: Console | None = None) -> list[dict]:
    """One run on already-started heavy actors (the tests share one set across runs)."""
    from pipeline.report import Reporter

    cfg = prep.cfg
    reporter = Reporter(prep.rundir, cfg, console or Console(cfg.quiet))
    reward = make_reward_actor(cfg)
    try:
        loop = Loop(cfg, workers, prep.model_path, prep.train, prep.eval, prep.rundir, reward, reporter)
        return loop.run()
    finally:
        ray.kill(reward, no_restart=True)
        reporter.close()


def run(cfg: RunConfig) -> list[dict]:
    console = Console(cfg.quiet)
    prep = prepare(cfg)
    console.log(
        f"model {prep.model_path}; {len(prep.train)} train / {len(prep.eval)} eval prompts; output {prep.rundir.root}"
    )
    init_ray(cfg)
    with console.status("starting vLLM engines and DeepSpeed trainers"):
        workers = start_workers(cfg, prep.model_path)
    try:
        return run_with_workers(prep, workers, console)
    finally:
        workers.shutdown()
