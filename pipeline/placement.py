"""Resource planning: what a config asks of the cluster, whether it fits, and the placement groups.

Each vLLM engine's tensor-parallel group must sit on one node (a STRICT_PACK placement group of TP
GPU bundles); trainer ranks and the reward actor can go anywhere. `onalign run --dry-run` prints the
plan against the connected cluster (or this machine) and refuses one that cannot fit, or that could
never run: two ranks of one NCCL communicator (DeepSpeed's ranks; the NCCL weight sync's trainer rank 0
and engine workers; an engine's TP workers) must not share a GPU, so their GPU shares are whole GPUs; and the
CPU weight sync reaches only engines whose weights live in the engine actor's own process (TP 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import RunConfig
from common.errors import OnalignError


class PlanError(OnalignError, RuntimeError):
    pass


@dataclass
class Demand:
    name: str
    cpu: float
    gpu: float
    same_node: bool = True  # all of it on one node (an engine's TP group, one trainer rank)


def _whole(share: float) -> bool:
    return share >= 1 and float(share).is_integer()


def check(cfg: RunConfig) -> None:
    """Refuse GPU settings that can never run, whatever the cluster (raises PlanError naming each one)."""
    from workers.weight_sync import resolve_backend

    r, t = cfg.rollout, cfg.train
    problems = []
    tp = r.tensor_parallel_size
    if tp > 1 and r.num_gpus > 0 and r.num_gpus != 1:
        problems.append(
            f"rollout.tensor_parallel_size={tp} with rollout.num_gpus={r.num_gpus:g}: each tensor-parallel worker "
            "of an engine takes exactly one whole GPU (vLLM's Ray executor asks for one per worker, and two TP ranks "
            "cannot share a device); set rollout.num_gpus=1"
        )
    if t.num_workers > 1 and t.num_gpus > 0 and not _whole(t.num_gpus):
        problems.append(
            f"train.num_gpus={t.num_gpus:g} with train.num_workers={t.num_workers}: Ray may put two of DeepSpeed's "
            "NCCL ranks on one GPU, which NCCL refuses; give each rank a whole GPU (train.num_gpus=1)"
        )
    backend = resolve_backend(cfg.sync, r.num_gpus > 0, t.num_gpus > 0)
    if backend != "nccl" and tp > 1:
        problems.append(
            f"the CPU weight sync (sync.backend={cfg.sync.backend}) cannot feed engines with "
            f"rollout.tensor_parallel_size={tp}: its backend runs in the engine actor's process, while the weights of "
            "a tensor-parallel engine sit in vLLM's Ray workers; use GPU trainers with sync.backend=nccl, or "
            "rollout.tensor_parallel_size=1"
        )
    if backend == "nccl" and not (r.num_gpus > 0 and t.num_gpus > 0):
        problems.append(
            f"sync.backend=nccl needs GPUs on both sides (rollout.num_gpus={r.num_gpus:g}, "
            f"train.num_gpus={t.num_gpus:g}): trainer rank 0 broadcasts from its GPU; use sync.backend=cpu"
        )
    elif backend == "nccl":
        for key, share in (("rollout.num_gpus", r.num_gpus), ("train.num_gpus", t.num_gpus)):
            if not _whole(share):
                problems.append(
                    f"{key}={share:g} with the NCCL weight sync (sync.backend={cfg.sync.backend}): trainer rank 0 "
                    "and every engine worker are ranks of one NCCL group, and a fractional GPU lets two of them "
                    "share one GPU, which NCCL refuses; use whole GPUs, or sync.backend=cpu"
                )
    if problems:
        raise PlanError("the plan cannot run: " + "; ".join(problems))


def engine_cpus(cfg: RunConfig) -> float:
    """CPUs one engine reserves: its TP placement group has one bundle of rollout.num_cpus per worker."""
    r = cfg.rollout
    return r.num_cpus * r.tensor_parallel_size if r.num_gpus > 0 and r.tensor_parallel_size > 1 else r.num_cpus


def demands(cfg: RunConfig) -> list[Demand]:
    check(cfg)
    r, t, w = cfg.rollout, cfg.train, cfg.reward
    out = [
        Demand(
            f"rollout engine {i} (TP {r.tensor_parallel_size})", engine_cpus(cfg), r.num_gpus * r.tensor_parallel_size
        )
        for i in range(r.num_engines)
    ]
    out += [Demand(f"trainer rank {i}", t.num_cpus, t.num_gpus) for i in range(t.num_workers)]
    out.append(Demand("reward actor", w.num_cpus, w.num_gpus))
    return out


def fit(cfg: RunConfig, nodes: list[dict[str, float]]) -> list[tuple[str, int]]:
    """First-fit-decreasing placement of every demand onto nodes; raises PlanError naming what does not fit."""
    free = [{"CPU": float(n.get("CPU", 0)), "GPU": float(n.get("GPU", 0))} for n in nodes]
    placed = []
    for d in sorted(demands(cfg), key=lambda d: (-d.gpu, -d.cpu)):
        for i, node in enumerate(free):
            if node["GPU"] + 1e-9 >= d.gpu and node["CPU"] + 1e-9 >= d.cpu:
                node["GPU"] -= d.gpu
                node["CPU"] -= d.cpu
                placed.append((d.name, i))
                break
        else:
            total_gpu = sum(float(n.get("GPU", 0)) for n in nodes)
            raise PlanError(
                f"the plan does not fit the cluster: no node has {d.gpu:g} GPU and {d.cpu:g} CPU left for {d.name} "
                f"(cluster: {len(nodes)} node(s), {total_gpu:g} GPUs in all). Lower rollout.num_engines, "
                "rollout.tensor_parallel_size or train.num_workers, or add nodes"
            )
    return placed


def cluster_nodes() -> list[dict[str, float]]:
    """Alive nodes' resources of the connected Ray cluster."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def dry_run(cfg: RunConfig, nodes: list[dict[str, float]] | None = None) -> str:
    ds = demands(cfg)
    lines = ["resource plan:"] + [f"  {d.name:32s} CPU {d.cpu:g}  GPU {d.gpu:g}" for d in ds]
    lines.append(f"  {'total':32s} CPU {sum(d.cpu for d in ds):g}  GPU {sum(d.gpu for d in ds):g}")
    if nodes is not None:
        placed = fit(cfg, nodes)
        lines.append(f"fits the cluster ({len(nodes)} node(s)):")
        lines += [f"  {name:32s} -> node {i}" for name, i in placed]
    return "\n".join(lines)


_ENGINE_GROUPS: list = []  # the TP placement groups this process created, until `remove_engine_placements`


def engine_placement(tp: int, gpus_per_worker: float, cpus: float):
    """A STRICT_PACK placement group holding one engine's TP workers on one node (GPU clusters): one bundle
    of `cpus` CPUs and `gpus_per_worker` GPUs per worker. Kept until `remove_engine_placements`."""
    from ray.util.placement_group import placement_group

    pg = placement_group([{"GPU": gpus_per_worker, "CPU": cpus}] * tp, strategy="STRICT_PACK")
    _ENGINE_GROUPS.append(pg)
    return pg


def remove_engine_placements() -> int:
    """Give back every TP placement group made by `engine_placement` (at shutdown, after the engines are
    killed: a placement group outlives its actors and keeps its GPUs reserved). Returns how many."""
    from ray.util.placement_group import remove_placement_group

    removed = 0
    while _ENGINE_GROUPS:
        pg = _ENGINE_GROUPS.pop()
        try:
            remove_placement_group(pg)
            removed += 1
        except Exception:  # already removed, or Ray is gone: nothing left to give back
            pass
    return removed
