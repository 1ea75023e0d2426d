"""The driver: validate everything, start (or join) Ray, start the actors, run the loop, clean up.

All checks that need no actor (config, output dir, model path, data) run before Ray starts, so a
user mistake costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray

from common.config import BUILTIN_MODEL, BUILTIN_REWARD_MODEL, BUILTIN_SMOLLM2, RunConfig
from common.methods import get_method
from pipeline.cache import hub_offline
from pipeline.checkpoint import ResumeError, check_fingerprint, check_resume_config, fingerprint_of, plan_resume
from pipeline.console import ActorLogs, Console, record_placement
from pipeline.data import DataError, PromptSet, load_prompt_sets
from pipeline.loop import Loop, Workers, named_actors
from pipeline.rundir import RunDir, RunDirError
from workers.actor_group import TrainerGroup, trainer_env
from workers.rollout import RolloutWorker, engine_env
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
    return _model_dir(m.path, "model.path")


def resolve_reward_model(cfg: RunConfig) -> str:
    """`reward.model_path`, with `builtin:tiny-rm` built (once, cached) and replaced by its directory."""
    if cfg.reward.model_path == BUILTIN_REWARD_MODEL:
        from pipeline.tiny_reward_model import tiny_reward_model_path

        return str(tiny_reward_model_path())
    return cfg.reward.model_path or ""


def local_reward_model(cfg: RunConfig) -> str:
    """`resolve_reward_model` as a local directory (a Hub name downloaded on the driver, as the policy is)."""
    return local_model_dir(resolve_reward_model(cfg), "reward.model_path", Console(cfg.quiet).log)


def _model_dir(path: str, key: str) -> str:
    """`path` when it is an HF model directory, or a Hub name whose model is in the local HF cache (or, when
    the Hub may be asked, on the Hub). A path that is neither fails at once, naming `key`: it is never sent
    to the Hub to be retried for a minute."""
    p = Path(path)
    if p.exists():
        _check_model_files(p, key)
        return str(p)
    if p.is_absolute() or path.startswith((".", "~")):
        raise FileNotFoundError(f"{key} '{p}' does not exist; set {key} to an HF model directory")
    _check_hub_model(path, key)
    return path  # a hub name: resolved by transformers/vLLM on the cluster (from its cache, or the Hub)


def _check_model_files(p: Path, key: str) -> None:
    if not p.is_dir():
        raise FileNotFoundError(f"{key} '{p}' is a file, not a directory; point it at an HF model directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key} '{p}' has no config.json; point it at an HF model directory")
    if not any(p.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{key} '{p}' has no .safetensors weights; onalign loads safetensors only "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )


def _cached_snapshot(name: str) -> str | None:
    """The local HF cache's copy of hub model `name` (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not a hub name)
        return None


def _check_hub_model(name: str, key: str) -> None:
    """A name that is no local path: found in the local HF cache, else asked of the Hub once (never when
    HF_HUB_OFFLINE is set); any miss is one line naming `key`."""
    from huggingface_hub.utils import validate_repo_id

    where = f"{key} '{name}' is not a directory (relative to {Path.cwd()})"
    try:
        validate_repo_id(name)
    except ValueError:
        raise FileNotFoundError(
            f"{where} and not a Hugging Face Hub model name; set {key} to an HF model directory"
        ) from None
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        _check_model_files(Path(snapshot), key)
        return
    fix = f"fix {key}, or download the model first (`hf download {name}`)"
    if hub_offline():
        raise FileNotFoundError(
            f"{where}, and no Hub model '{name}' is in the local Hugging Face cache (HF_HUB_OFFLINE is set, so the "
            f"Hub is not asked); {fix}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{where}, not in the local Hugging Face cache, and the Hub has no model '{name}' (a private or gated "
            f"one needs `hf auth login`); fix {key}"
        ) from None
    except Exception as e:  # no network, DNS, proxy, TLS: one try, no minute of retries
        raise FileNotFoundError(
            f"{where}, not in the local Hugging Face cache, and the Hub cannot be reached ({type(e).__name__}); "
            f"{fix}, or set HF_HUB_OFFLINE=1 to use the cache only"
        ) from None


# What a Hub model's download takes: config, tokenizer and safetensors weights (never pickles).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def local_model_dir(path: str, key: str, log=None) -> str:
    """A directory the actors load `path` from without the network: `path` itself, or a Hub model's snapshot
    in the local HF cache, downloaded here (once, on the driver) when it is not cached. The engines run with
    HF_HUB_OFFLINE=1 and start before any trainer could download anything, so a Hub name handed to them finds
    nothing on a fresh cache. On several nodes the cache must be one every node reads (HF_HOME on a shared
    filesystem); `start_workers` checks that each node sees the directory."""
    if Path(path).is_dir():
        return path
    snapshot = _cached_snapshot(path)
    if snapshot is not None:
        return snapshot
    from huggingface_hub import snapshot_download

    if log is not None:
        log(f"{key}: downloading '{path}' from the Hugging Face Hub into the local cache (once)")
    return str(snapshot_download(path, allow_patterns=HUB_MODEL_FILES))


def _local_files(path: str) -> str:
    """Where the model's files can be read without the network: the directory, or the cached snapshot."""
    return path if Path(path).is_dir() else (_cached_snapshot(path) or path)


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    """The model's config and tokenizer, checked: one line naming `key` when either cannot be loaded or the
    tokenizer has no chat template (every prompt is rendered through it)."""
    from transformers import AutoConfig, AutoTokenizer

    from common.config import ConfigError

    files = _local_files(path)
    try:
        AutoConfig.from_pretrained(files, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{key} '{path}': its config.json cannot be loaded ({_first_line(e)})") from None
    need = "the model directory needs its tokenizer files (tokenizer.json or the vocabulary, and tokenizer_config.json)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(files, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{key} '{path}': its tokenizer cannot be loaded ({_first_line(e)}); {need}") from None
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer when the files are missing
        raise ConfigError(f"{key} '{path}' has no tokenizer (an empty vocabulary was loaded); {need}")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{key} '{path}' has no chat template, and every prompt is rendered through it: add one to the model "
            "directory (a 'chat_template' entry in tokenizer_config.json, or a chat_template.jinja file), or use "
            "the model's instruct/chat variant"
        )
    return tokenizer


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


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
        load_tokenizer(_model_dir(rm, "reward.model_path"), "reward.model_path", cfg.reward.trust_remote_code)
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


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (or the job's cluster), else start a local one."""
    if ray.is_initialized():
        return
    import logging

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}}
    # By default the actors' own output (vLLM, DeepSpeed) stays out of the console and the job logs: each
    # run points it at OUTPUT_DIR/logs/ (`ActorLogs`); before that it is in Ray's log files. --verbose streams it.
    console = {"log_to_driver": cfg.verbose, "logging_level": logging.INFO if cfg.verbose else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's runtime env (working dir, env vars) applies: do not replace it.
        ray.init(address=os.environ["RAY_ADDRESS"], **console)
    else:
        # Ray 2.60 turns token authentication on for a new local cluster and says so at every start: keep it
        # on, without the line
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: "Token authentication is enabled for this Ray cluster" not in record.getMessage()
        )
        ray.init(
            address="local",  # a new local cluster: never one that `ray start` left running on this machine
            num_cpus=cfg.ray_num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=1 << 30,
            runtime_env=env,
            **console,
        )


def engine_options(cfg: RunConfig, index: int, colocated=None) -> dict:
    """Ray options of engine `index`: its own resources; inside its TP placement group (TP > 1 on GPUs); or,
    colocated, beside trainer rank `index` in bundle `index` of the run's placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    r = cfg.rollout
    opts: dict = {
        "runtime_env": {"env_vars": engine_env(r)},
        "num_cpus": r.num_cpus,
        "num_gpus": r.num_gpus,
        "resources": dict(r.resources),
    }
    if colocated is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(colocated, placement_group_bundle_index=index)
    elif r.num_gpus > 0 and r.tensor_parallel_size > 1:
        # vLLM's Ray executor places the TP workers inside this group, all on one node.
        from pipeline.placement import engine_placement

        pg = engine_placement(r.tensor_parallel_size, r.num_gpus, r.num_cpus, r.resources)
        ray.get(pg.ready(), timeout=cfg.call_timeout_s)
        opts.update(
            num_cpus=0,
            num_gpus=0,
            resources={},
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True),
        )
    return opts


def check_nodes_see(paths: dict[str, str], writable: bool = False, needs: dict[str, float] | None = None) -> None:
    """Refuse, naming the node, a directory (by config key) that a node of the cluster cannot read (or, with
    `writable`, write): the driver resolved or made it, actors on other nodes use it. `needs`: only the nodes
    whose resources could hold an actor asking that much (where such an actor may land)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.placement import PlanError

    @ray.remote(num_cpus=0)
    def usable(dirs: list[str], write: bool) -> list[bool]:
        return [os.path.isdir(d) and (not write or os.access(d, os.W_OK | os.X_OK)) for d in dirs]

    need = {k: v for k, v in (needs or {}).items() if v > 0}
    nodes = [
        n
        for n in ray.nodes()
        if n.get("Alive") and all(n["Resources"].get(k, 0.0) + 1e-9 >= v for k, v in need.items())
    ]
    refs = [
        usable.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            list(paths.values()), writable
        )
        for n in nodes
    ]
    for node, seen in zip(nodes, ray.get(refs), strict=True):
        for (key, path), ok in zip(paths.items(), seen, strict=True):
            if not ok:
                where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]})"
                if writable:
                    raise PlanError(
                        f"{key}: '{path}' is not writable from {where}, where trainer rank 0 may run and write the "
                        "checkpoints: use a directory every node mounts (a shared filesystem), or an fsspec URL "
                        "with a shared staging path (README, the cluster section)"
                    )
                raise PlanError(
                    f"{key}: '{path}' is not visible on {where}, where actors may run: put the model (or "
                    "HF_HOME, for a Hub model) on a shared filesystem every node mounts, or copy it to the same "
                    "path on each node"
                )


def check_output_dir_reachable(cfg: RunConfig, rundir: RunDir) -> None:
    """Trainer rank 0 writes the checkpoints into output_dir (a URL's local staging copy) from its own node,
    the driver everything else from its node: refuse, before any actor starts, a directory that a node that
    may run trainer rank 0 cannot write."""
    t = cfg.train
    check_nodes_see(
        {"output_dir": str(rundir.root)}, writable=True, needs={"CPU": t.num_cpus, "GPU": t.num_gpus, **t.resources}
    )


def start_workers(cfg: RunConfig, model_path: str) -> Workers:
    """The heavy actors: vLLM engines and the DeepSpeed ranks."""
    r, t = cfg.rollout, cfg.train
    from pipeline.placement import cluster_nodes, fit

    fit(cfg, cluster_nodes())  # refuse a plan that cannot fit instead of waiting forever for resources
    check_nodes_see({"model.path": model_path})
    colocated = None
    if cfg.placement == "colocate":  # bundle i: trainer rank i and engine i (one GPU)
        from pipeline.placement import colocated_placement

        colocated = colocated_placement(cfg)
        ray.get(colocated.ready(), timeout=cfg.call_timeout_s)
    engines = [
        ray.remote(RolloutWorker)
        .options(**engine_options(cfg, i, colocated))
        .remote(model_path, r, cfg.model.dtype, cfg.seed, resolve_backend(cfg), cfg.placement == "colocate")
        for i in range(r.num_engines)
    ]
    trainers = TrainerGroup(
        t.num_workers,
        t.num_cpus,
        t.num_gpus,
        trainer_env(t),
        cfg.call_timeout_s,
        placement=colocated,
        resources=t.resources,
    )
    ray.get([e.ready.remote() for e in engines], timeout=cfg.call_timeout_s)
    return Workers(engines, trainers)


def make_reward_actor(cfg: RunConfig):
    from rewards.actor import RewardWorker, reward_actor_options

    reward = cfg.reward
    if reward.kind == "model":
        reward = reward.model_copy(update={"model_path": local_reward_model(cfg)})
        check_nodes_see({"reward.model_path": reward.model_path})
    return ray.remote(RewardWorker).options(**reward_actor_options(reward)).remote(reward)


def run_with_workers(prep: Prepared, workers: Workers, console: Console | None = None, reward=None) -> list[dict]:
    """One run on already-started heavy actors (the tests share one set across runs); `reward`: the run's
    reward actor when it was started already (it is killed at the end either way)."""
    from pipeline.sinks import Reporter

    cfg = prep.cfg
    reporter = Reporter(prep.rundir, cfg, console or Console(cfg.quiet))
    reward = reward or make_reward_actor(cfg)
    logs = ActorLogs(prep.rundir.root, stream=cfg.verbose)
    try:
        with logs.explaining():
            named = named_actors(workers, reward)
            logs.attach(named, cfg.call_timeout_s)
            placement = record_placement(named, prep.rundir.root, cfg.call_timeout_s)
            loop = Loop(cfg, workers, prep.model_path, prep.train, prep.eval, prep.rundir, reward, reporter, placement)
            return loop.run()
    finally:
        ray.kill(reward, no_restart=True)
        reporter.close()


def run(cfg: RunConfig) -> list[dict]:
    from pipeline.placement import cluster_nodes, fit

    console = Console(cfg.quiet)

    def on_the_cluster(prep: Prepared) -> None:
        console.log(
            f"model {prep.model_path}; {len(prep.train)} train / {len(prep.eval)} eval prompts; output "
            f"{prep.rundir.root}" + ("" if cfg.verbose else f" (actors' output in {prep.rundir.root / 'logs'}/)")
        )
        init_ray(cfg)
        check_output_dir_reachable(cfg, prep.rundir)
        fit(cfg, cluster_nodes())  # a plan the cluster cannot hold is refused before the run writes a file

    prep = prepare(cfg, on_the_cluster)
    reward = make_reward_actor(cfg)  # its process starts while the engines and trainers do
    try:
        with (
            ActorLogs(prep.rundir.root, stream=cfg.verbose).explaining(),
            console.status("starting vLLM engines and DeepSpeed trainers"),
        ):
            workers = start_workers(cfg, prep.model_path)
    except BaseException:
        ray.kill(reward, no_restart=True)
        raise
    try:
        return run_with_workers(prep, workers, console, reward)
    finally:
        workers.shutdown()
