"""Resource planning: what a config asks of the cluster, whether it fits, and the placement groups.

Each vLLM engine's tensor-parallel group must sit on one node (a STRICT_PACK placement group of TP
GPU bundles); trainer ranks and the reward actor can go anywhere. `onalign run --dry-run` prints the
plan against the connected cluster (or this machine) and refuses one that cannot fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import RunConfig


class PlanError(RuntimeError):
    pass


@dataclass
class Demand:
    name: str
    cpu: float
    gpu: float
    same_node: bool = True  # all of it on one node (an engine's TP group, one trainer rank)


def demands(cfg: RunConfig) -> list[Demand]:
    r, t, w = cfg.rollout, cfg.train, cfg.reward
    out = [
        Demand(f"rollout engine {i} (TP {r.tensor_parallel_size})", r.num_cpus, r.num_gpus * r.tensor_parallel_size)
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


def engine_placement(tp: int, gpus_per_worker: float, cpus: float):
    """A STRICT_PACK placement group holding one engine's TP workers on one node (GPU clusters)."""
    from ray.util.placement_group import placement_group

    return placement_group([{"GPU": gpus_per_worker, "CPU": cpus}] * tp, strategy="STRICT_PACK")
