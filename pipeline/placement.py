"""Resource planning: what a config asks of the cluster, and whether it fits (`onalign run --dry-run`)."""

from __future__ import annotations

from pipeline.config import RunConfig


class PlanError(RuntimeError):
    pass


def plan(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Logical resources per actor group."""
    r, t, w = cfg.rollout, cfg.train, cfg.reward
    return {
        "rollout": {
            "actors": r.num_engines,
            "CPU": r.num_cpus * r.num_engines,
            "GPU": r.num_gpus * r.tensor_parallel_size * r.num_engines,
        },
        "trainer": {"actors": t.num_workers, "CPU": t.num_cpus * t.num_workers, "GPU": t.num_gpus * t.num_workers},
        "reward": {"actors": 1, "CPU": w.num_cpus, "GPU": w.num_gpus},
    }


def dry_run(cfg: RunConfig, available: dict[str, float] | None = None) -> str:
    p = plan(cfg)
    need = {k: sum(g[k] for g in p.values()) for k in ("CPU", "GPU")}
    lines = ["resource plan:"] + [
        f"  {name:8s} {g['actors']:g} actor(s): CPU {g['CPU']:g}, GPU {g['GPU']:g}" for name, g in p.items()
    ]
    lines.append(f"  total    CPU {need['CPU']:g}, GPU {need['GPU']:g}")
    if available is not None:
        short = [
            f"{k}: need {need[k]:g}, cluster has {available.get(k, 0):g}"
            for k in need
            if need[k] > available.get(k, 0) + 1e-9
        ]
        if short:
            raise PlanError("the plan does not fit the cluster (" + "; ".join(short) + ")")
        lines.append("fits the cluster: " + ", ".join(f"{k} {available.get(k, 0):g}" for k in need))
    return "\n".join(lines)
