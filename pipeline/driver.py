"""The driver: check everything (`pipeline.preflight`), start (or join) Ray, start the actors, run the loop,
clean up.

All checks that need no actor (config, output dir, model path, data) run before Ray starts, so a
user mistake costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import os

import ray

from common.config import RunConfig
from pipeline.console import ActorLogs, Console, record_placement
from pipeline.loop import Loop, Workers, named_actors
from pipeline.model_source import local_reward_model
from pipeline.preflight import Prepared, prepare
from pipeline.rundir import RunDir
from workers.actor_group import TrainerGroup, trainer_env
from workers.rollout import RolloutWorker, engine_env


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
        .remote(model_path, r, cfg.model.dtype, cfg.seed, cfg.sync_backend(), cfg.placement == "colocate")
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
