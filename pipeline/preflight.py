"""Every check a run makes before any actor starts (config, output_dir and its records, resume, reward,
model, tokenizer, data), then the run's files: nothing in output_dir is written until all of them passed,
and `--dry-run` makes the same checks writing nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from common.config import RunConfig
from common.methods import get_method
from pipeline.checkpoint import ResumeError, check_fingerprint, check_resume_config, fingerprint_of, plan_resume
from pipeline.console import Console
from pipeline.data import DataError, PromptSet, load_prompt_sets
from pipeline.model_source import load_tokenizer, local_model_dir, model_dir, resolve_model, resolve_reward_model
from pipeline.rundir import RunDir, RunDirError


@dataclass
class Prepared:
    cfg: RunConfig
    model_path: str
    train: PromptSet
    eval: PromptSet
    rundir: RunDir


def check_run(cfg: RunConfig) -> Prepared:
    """`--dry-run`: every check `prepare` makes (config, output_dir and resume, reward, model config and
    tokenizer, data), writing nothing: output_dir is not even created."""
    return _check_all(cfg, create=False)[0]


def prepare(cfg: RunConfig, then_check: Callable[[Prepared], None] | None = None) -> Prepared:
    """Every check that needs no actor, then `then_check` (a run's cluster checks), then the run's files.
    Nothing in output_dir is written until all of them passed; a refused run leaves no directory it made."""
    with removed_if_refused(cfg):
        prep, changes = _check_all(cfg, create=True)
        if then_check is not None:
            then_check(prep)
    write_run_files(prep, changes)
    return prep


@contextmanager
def removed_if_refused(cfg: RunConfig) -> Iterator[None]:
    """Remove output_dir (and the parents made for it) again when the block fails while they are still empty:
    a refused run leaves nothing behind."""
    root = RunDir(cfg.output_dir).root.absolute()
    made = [p for p in [root, *root.parents] if not p.exists()]
    try:
        yield
    except BaseException:
        for p in made:  # deepest first; a directory something was written into stays
            try:
                p.rmdir()
            except OSError:
                break
        raise


def write_run_files(prep: Prepared, changes: dict) -> None:
    """Every check passed: the run's config.yaml (and, on resume, the settings changed), and a fresh run's
    stale records dropped."""
    cfg, rundir = prep.cfg, prep.rundir
    if not rundir.resume_from:  # a new run (or one started over): the replaced run's records go
        rundir.config_changes_path.unlink(missing_ok=True)
        if not cfg.resume:
            rundir.truncate_to(-1)  # stale samples of a run that never recorded a metrics row
    for partial in rundir.partial_checkpoints():  # named when the resume was planned
        shutil.rmtree(partial, ignore_errors=True)
    (rundir.root / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    if changes:
        rundir.append_config_change({"iteration": rundir.resume_from + 1, "changes": changes})


def _check_all(cfg: RunConfig, create: bool) -> tuple[Prepared, dict]:
    """The checks of `prepare`, in order of cost; `create`: make output_dir (and prove it writable) first.
    Returns what was prepared and the settings changed on resume."""
    from common.versions import check_versions
    from pipeline.placement import check as check_plan

    check_versions()  # the stack this code is tested with, before anything else
    check_plan(cfg)  # GPU settings that can never run, whatever the cluster
    rundir = _prepare_rundir(cfg, create)
    changes = _plan_resume(cfg, rundir)
    if cfg.reward.kind == "function":
        from rewards.scorers import load_function

        load_function(cfg.reward.function)  # a typo in module:function fails here, before the data loads
    if cfg.reward.kind == "model":
        rm = resolve_reward_model(cfg)  # builds the tiny RM once, before any actor
        load_tokenizer(model_dir(rm, "reward.model_path"), "reward.model_path", cfg.reward.trust_remote_code)
    model_path = resolve_model(cfg)
    if create:  # a run (not --dry-run): a Hub model is fetched now, and every later step reads the directory
        model_path = local_model_dir(model_path, "model.path", Console(cfg.quiet).log)
    tokenizer = load_tokenizer(model_path, "model.path", cfg.model.trust_remote_code)
    train, eval_set = load_prompt_sets(cfg.data, tokenizer, cfg.seed)
    check_trainable(cfg, train, eval_set)
    check_reward(cfg, train)
    if rundir.resume_from:
        state = rundir.load_state(rundir.resume_from)
        check_fingerprint(
            state, fingerprint_of(cfg, len(train), len(eval_set)), rundir.checkpoint_path(rundir.resume_from)
        )
    return Prepared(cfg, model_path, train, eval_set, rundir), changes


# How many dataset rows the reward is tried on before any actor starts.
REWARD_PROBE_ROWS = 4


def check_reward(cfg: RunConfig, train: PromptSet) -> None:
    """Call the reward once, on the first few train prompts with their reference answers (empty where the data
    has none), through the same validation the reward actor applies: a reward that raises, returns NaN, the
    wrong count or no numbers, or a remote server that cannot be reached or answers garbage, stops the run in
    seconds, not after the actors' start-up. A reward model (`reward.kind: model`) is checked by its actor:
    loading it here would double its start-up."""
    if cfg.reward.kind == "model":
        return
    from rewards.scorers import make_scorer, score

    name, fn = make_scorer(cfg.reward)
    k = min(REWARD_PROBE_ROWS, len(train))
    refs = train.references[:k]
    score(name, fn, train.texts[:k], [r or "" for r in refs], refs)


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
    train_prompts = {tuple(ids): text for ids, text in zip(train.prompt_ids, train.texts, strict=True)}
    shared = [
        text for ids, text in zip(eval_set.prompt_ids, eval_set.texts, strict=True) if tuple(ids) in train_prompts
    ]
    if cfg.data.eval is None and shared:
        raise DataError(
            f"data: {len(shared)} eval prompt(s) are also train prompts (e.g. {shared[0][:60]!r}); the data "
            "has too few distinct prompts to hold some out; add distinct prompts or give data.eval"
        )


def _prepare_rundir(cfg: RunConfig, create: bool = True) -> RunDir:
    """Create output_dir (never for a resume of a directory that does not exist), prove it writable, and
    read its records: a damaged metrics or samples file stops a fresh run as well as a resume. Without
    `create` (--dry-run) nothing is created or written: only whether it could be."""
    rundir = RunDir(cfg.output_dir)
    if cfg.resume is True and rundir.url is None and not rundir.root.exists():
        raise ResumeError(
            f"output_dir '{rundir.root}' does not exist, so there is no run to resume; check the path, or drop "
            "--resume to start a new run there"
        )
    if create:
        rundir.prepare()
    else:
        _check_writable(rundir)
    rundir.read_samples()
    metrics = rundir.read_metrics()  # a damaged line stops a resume here, before anything starts or is written
    if not cfg.resume and (metrics or rundir.complete_checkpoints()):
        raise RunDirError(
            f"output_dir '{rundir.where}' already holds a run (metrics.jsonl, checkpoints/); rerun with --resume to "
            "continue it, or choose a new output_dir"
        )
    return rundir


def _check_writable(rundir: RunDir) -> None:
    """Whether output_dir could be created and written, creating nothing in it (a remote one is read into its
    local staging copy, as a run would, so its records can be checked)."""
    if rundir.url is not None:
        try:
            rundir.pull()
        except Exception as e:
            raise RunDirError(f"output_dir '{rundir.url}' cannot be read ({type(e).__name__}: {e})") from None
        return
    p = rundir.root.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent  # the directory output_dir would be created in
    problem = None if p.is_dir() else "Not a directory"
    if problem is None and not os.access(p, os.W_OK | os.X_OK):
        problem = "Permission denied"
    if problem:
        raise RunDirError(
            f"output_dir '{rundir.root}' is not writable ({problem}: {p}); choose another with output_dir=PATH"
        )


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
