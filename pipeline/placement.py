"""Resource planning: what a config asks of the cluster, whether it fits, and the placement groups.

Each vLLM engine's tensor-parallel group must sit on one node (a STRICT_PACK placement group of TP
GPU bundles); trainer ranks and the reward actor can go anywhere. `onalign run --dry-run` prints the
plan against the connected cluster (or this machine) and refuses one that cannot fit, or that could
never run: two ranks of one NCCL communicator (DeepSpeed's ranks; the NCCL weight sync's trainer rank 0
and engine workers; an engine's TP workers) must not share a GPU, so their GPU shares are whole GPUs; and the
CPU weight sync reaches only engines whose weights live in the engine actor's own process (TP 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    custom: dict[str, float] = field(default_factory=dict)  # Ray custom resources (`*.resources`)

    def needs(self) -> dict[str, float]:
        return {"CPU": self.cpu, "GPU": self.gpu, **self.custom}


def _times(resources: dict[str, float], k: float) -> dict[str, float]:
    return {key: v * k for key, v in resources.items()}


def _plus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in {*a, *b}}


def _whole(share: float) -> bool:
    return share >= 1 and float(share).is_integer()


def check(cfg: RunConfig) -> None:
    """Refuse GPU settings that can never run, whatever the cluster (raises PlanError naming each one)."""
    r, t = cfg.rollout, cfg.train
    problems = []
    tp = r.tensor_parallel_size
    if tp > 1 and r.num_gpus > 0 and r.num_gpus != 1:
        problems.append(
            f"rollout.tensor_parallel_size={tp} with rollout.num_gpus={r.num_gpus:g}: each tensor-parallel worker "
            "of an engine takes exactly one whole GPU (vLLM's Ray executor asks for one per worker, and two TP ranks "
            "cannot share a device); set rollout.num_gpus=1"
        )
    colocated = cfg.placement == "colocate"
    if colocated:
        problems += colocation_problems(cfg)
    if t.num_workers > 1 and t.num_gpus > 0 and not _whole(t.num_gpus) and not colocated:
        problems.append(
            f"train.num_gpus={t.num_gpus:g} with train.num_workers={t.num_workers}: Ray may put two of DeepSpeed's "
            "NCCL ranks on one GPU, which NCCL refuses; give each rank a whole GPU (train.num_gpus=1)"
        )
    backend = cfg.sync_backend()
    if backend == "ipc" and not colocated:
        problems.append(
            "sync.backend=ipc hands CUDA IPC handles from a trainer rank to the engine on its own GPU: it needs "
            "placement=colocate (or use sync.backend=auto)"
        )
    elif backend == "ipc" and not (r.num_gpus > 0 and t.num_gpus > 0):
        problems.append("sync.backend=ipc needs GPUs (CUDA IPC); on CPUs use sync.backend=auto or cpu")
    if backend == "cpu" and tp > 1:
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
                    "share one GPU, which NCCL refuses; use whole GPUs, sync.backend=cpu, or placement=colocate to "
                    "share one GPU between a trainer rank and an engine"
                )
    if problems:
        raise PlanError("the plan cannot run: " + "; ".join(problems))


def colocation_problems(cfg: RunConfig) -> list[str]:
    """What `placement: colocate` cannot run: trainer rank i and engine i share bundle i (one GPU, or CPUs)."""
    r, t = cfg.rollout, cfg.train
    out = []
    if r.tensor_parallel_size != 1:
        out.append(
            f"placement=colocate puts each engine beside one trainer rank on one GPU: set rollout.tensor_parallel_size=1 "
            f"(got {r.tensor_parallel_size}), or placement=separate"
        )
    if r.num_engines != t.num_workers:
        out.append(
            f"placement=colocate runs one engine per trainer rank, on the rank's GPU: set "
            f"rollout.num_engines={t.num_workers} (got {r.num_engines}) or train.num_workers={r.num_engines}"
        )
    if (r.num_gpus > 0) != (t.num_gpus > 0):
        out.append(
            f"placement=colocate shares each GPU between a trainer rank and an engine: give GPUs on both sides or "
            f"on neither (rollout.num_gpus={r.num_gpus:g}, train.num_gpus={t.num_gpus:g})"
        )
    elif r.num_gpus + t.num_gpus > 1 + 1e-9:
        out.append(
            f"placement=colocate: rollout.num_gpus + train.num_gpus = {r.num_gpus + t.num_gpus:g}, the shares of one "
            "GPU must add up to at most 1 (e.g. 0.5 and 0.5; rollout.gpu_memory_utilization sets the engine's memory)"
        )
    if cfg.sync.backend == "nccl":
        out.append(
            "placement=colocate with sync.backend=nccl would put two ranks of one NCCL group on one GPU, which NCCL "
            "refuses: use sync.backend=auto (CUDA IPC on GPUs)"
        )
    return out


def engine_cpus(cfg: RunConfig) -> float:
    """CPUs one engine reserves: its TP placement group has one bundle of rollout.num_cpus per worker."""
    r = cfg.rollout
    return r.num_cpus * r.tensor_parallel_size if r.num_gpus > 0 and r.tensor_parallel_size > 1 else r.num_cpus


def colocated_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """`placement: colocate`: bundle i holds trainer rank i and engine i (a whole GPU when they have GPUs)."""
    r, t = cfg.rollout, cfg.train
    bundle = {"CPU": r.num_cpus + t.num_cpus, **_plus(r.resources, t.resources)}
    if t.num_gpus > 0:
        bundle["GPU"] = 1.0
    return [dict(bundle) for _ in range(t.num_workers)]


def demands(cfg: RunConfig) -> list[Demand]:
    check(cfg)
    r, t, w = cfg.rollout, cfg.train, cfg.reward
    if cfg.placement == "colocate":
        return [
            Demand(
                f"bundle {i}: trainer rank {i} + rollout engine {i}",
                b["CPU"],
                b.get("GPU", 0.0),
                custom={k: v for k, v in b.items() if k not in ("CPU", "GPU")},
            )
            for i, b in enumerate(colocated_bundles(cfg))
        ] + [Demand("reward actor", w.num_cpus, w.num_gpus, custom=dict(w.resources))]
    tp_group = r.num_gpus > 0 and r.tensor_parallel_size > 1  # one bundle per TP worker, each with the resources
    out = [
        Demand(
            f"rollout engine {i} (TP {r.tensor_parallel_size})",
            engine_cpus(cfg),
            r.num_gpus * r.tensor_parallel_size,
            custom=_times(r.resources, r.tensor_parallel_size if tp_group else 1),
        )
        for i in range(r.num_engines)
    ]
    out += [Demand(f"trainer rank {i}", t.num_cpus, t.num_gpus, custom=dict(t.resources)) for i in range(t.num_workers)]
    out.append(Demand("reward actor", w.num_cpus, w.num_gpus, custom=dict(w.resources)))
    return out


def fit(cfg: RunConfig, nodes: list[dict[str, float]]) -> list[tuple[str, int]]:
    """First-fit-decreasing placement of every demand onto nodes; raises PlanError naming what does not fit."""
    free = [{k: float(v) for k, v in n.items()} for n in nodes]
    placed = []
    for d in sorted(demands(cfg), key=lambda d: (-d.gpu, -d.cpu)):
        need = d.needs()
        for i, node in enumerate(free):
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] = node.get(k, 0.0) - v
                placed.append((d.name, i))
                break
        else:
            total_gpu = sum(float(n.get("GPU", 0)) for n in nodes)
            custom = "".join(f" and {v:g} {k}" for k, v in d.custom.items())
            missing = [k for k in d.custom if not any(k in n for n in nodes)]
            hint = (
                f"no node offers the custom resource(s) {', '.join(missing)}: start nodes with `ray start --resources`, "
                "or fix the *.resources settings"
                if missing
                else "Lower rollout.num_engines, rollout.tensor_parallel_size or train.num_workers, or add nodes"
            )
            raise PlanError(
                f"the plan does not fit the cluster: no node has {d.gpu:g} GPU and {d.cpu:g} CPU{custom} left for "
                f"{d.name} (cluster: {len(nodes)} node(s), {total_gpu:g} GPUs in all). {hint}"
            )
    return placed


def cluster_nodes() -> list[dict[str, float]]:
    """Alive nodes' resources of the connected Ray cluster."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def dry_run(cfg: RunConfig, nodes: list[dict[str, float]] | None = None, params: int | None = None) -> str:
    """The plan as `--dry-run` prints it: each demand, where it fits on `nodes`, and for a colocated GPU plan
    the memory split of each GPU (`params`: the policy's parameter count)."""
    ds = demands(cfg)
    width = max(32, *(len(d.name) for d in ds))
    lines = ["resource plan:"] + [f"  {d.name:{width}s} CPU {d.cpu:g}  GPU {d.gpu:g}" for d in ds]
    lines.append(f"  {'total':{width}s} CPU {sum(d.cpu for d in ds):g}  GPU {sum(d.gpu for d in ds):g}")
    rank0 = "trainer rank 0"
    if nodes is not None:
        placed = fit(cfg, nodes)
        lines.append(f"fits the cluster ({len(nodes)} node(s)):")
        lines += [f"  {name:{width}s} -> node {i}" for name, i in placed]
        rank0 += "".join(f" (node {i})" for name, i in placed if "trainer rank 0" in name)
    lines += [
        f"writes to output_dir {cfg.output_dir}:",
        "  the driver (the node it runs on): metrics.jsonl, samples.jsonl, report.*, config.yaml, logs/",
        f"  {rank0}: checkpoints/ (a run refuses a directory that a node able to hold it cannot write: use a "
        "shared filesystem or an fsspec URL)",
    ]
    if cfg.placement == "colocate" and cfg.train.num_gpus > 0:
        lines += colocated_memory_plan(cfg, params)
    return "\n".join(lines)


def parameter_count(model_path: str, trust_remote_code: bool = False) -> int:
    """The policy's parameter count from its config alone (built on the meta device: no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def colocated_memory_plan(cfg: RunConfig, params: int | None) -> list[str]:
    """How one GPU's memory is shared when a trainer rank and an engine take turns on it."""
    r, t = cfg.rollout, cfg.train
    world = t.num_workers
    engine_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    lines = [
        "memory plan, each GPU (a trainer rank and an engine take turns):",
        f"  rollout and eval: the engine may use rollout.gpu_memory_utilization={r.gpu_memory_utilization:g} of the "
        "GPU (its weights and KV cache)",
        f"  training: the engine sleeps while the trainer trains (rollout.sleep_level={r.sleep_level}: the KV cache "
        + ("freed, the weights offloaded to CPU memory)" if r.sleep_level == 1 else "and the weights freed)"),
    ]
    if params is not None:
        # ZeRO: bf16 keeps a bf16 module (2 B), its gradients (2 B) and fp32 masters + Adam (12 B); fp32 keeps the
        # module (4 B), gradients (4 B) and Adam (8 B). Stage 2 partitions gradients and optimizer state, stage 3
        # the module too.
        module, grads, optim = (2, 2, 12) if t.bf16 else (4, 4, 8)
        per_param = module / (world if t.zero_stage == 3 else 1) + (grads + optim) / world
        lines.append(
            f"  trainer rank: about {_gib(params * per_param)} of model states ({params / 1e6:.0f}M parameters, "
            f"ZeRO-{t.zero_stage}, {'bf16' if t.bf16 else 'fp32'}, {world} rank(s)) plus activations"
        )
        if r.sleep_level == 1:
            lines.append(f"  host memory: {_gib(params * engine_bytes)} for the sleeping engine's weights")
    lines.append("  weight sync: the engine wakes its weights, takes the new ones over CUDA IPC, then its KV cache")
    return lines


_ENGINE_GROUPS: list = []  # the placement groups this process created, until `remove_engine_placements`


def engine_placement(tp: int, gpus_per_worker: float, cpus: float, resources: dict[str, float] | None = None):
    """A STRICT_PACK placement group holding one engine's TP workers on one node (GPU clusters): one bundle
    of `cpus` CPUs, `gpus_per_worker` GPUs and `resources` per worker. Kept until `remove_engine_placements`."""
    from ray.util.placement_group import placement_group

    bundle = {"GPU": gpus_per_worker, "CPU": cpus, **(resources or {})}
    pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
    _ENGINE_GROUPS.append(pg)
    return pg


def colocated_placement(cfg: RunConfig):
    """The placement group of `placement: colocate` (`colocated_bundles`; PACK: one node if it fits). Kept
    until `remove_engine_placements`."""
    from ray.util.placement_group import placement_group

    pg = placement_group(colocated_bundles(cfg), strategy="PACK")
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
