"""A group of trainer actors that act as one data-parallel job: rank plumbing and fan-out calls."""

from __future__ import annotations

from typing import Any

import ray

from common.config import TrainConfig
from common.devices import hidden_gpus_env
from workers.heap import tcmalloc_preload


def trainer_env(t: TrainConfig) -> dict[str, str]:
    """A trainer rank's start-up environment: one OpenMP thread per rank, quiet libraries, and on CPU no
    visible GPU, DeepSpeed's CPU accelerator and tcmalloc preloaded when installed (`train.cpu_preload_tcmalloc`)."""
    env = hidden_gpus_env(t.num_gpus) | {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if t.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
        if t.cpu_preload_tcmalloc:
            env.update(tcmalloc_preload())
    return env


class TrainerGroup:
    """`world` TrainerWorker actors wired as ranks 0..world-1 of one torch.distributed group.

    torch's env:// store is served by rank 0, on whichever node Ray placed it (not the driver's: under
    `ray job submit` the driver may run on a CPU-only head node). So rank 0 reports its own node IP and a
    port free there, and then every rank connects to that address. The constructor returns once the group
    is formed (or raises, naming the address, if it is not within `timeout_s`)."""

    def __init__(
        self,
        world: int,
        num_cpus: float,
        num_gpus: float,
        env: dict[str, str],
        timeout_s: float = 1800,
        placement=None,
        resources: dict[str, float] | None = None,
    ) -> None:
        """`placement`: a placement group whose bundle i holds rank i (`placement: colocate`), or None;
        `resources`: Ray custom resources each rank asks for (`train.resources`)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from workers.trainer import TrainerWorker

        opts = {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": dict(resources or {}),
            "runtime_env": {"env_vars": env},
            "max_concurrency": 1,
        }

        def bundle(rank: int) -> dict:
            if placement is None:
                return {}
            return {
                "scheduling_strategy": PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank)
            }

        self.world = world
        self.actors = [
            ray.remote(TrainerWorker).options(**opts, **bundle(rank)).remote(rank, world, timeout_s, num_gpus)
            for rank in range(world)
        ]
        try:
            self.master_addr, self.master_port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.kill()
            raise RuntimeError(
                f"trainer rank 0 did not start within call_timeout_s={timeout_s:g}s (num_cpus={num_cpus:g}, "
                f"num_gpus={num_gpus:g} per rank: does the cluster have them free? raise call_timeout_s on a busy "
                "machine)"
            ) from None
        refs = [a.connect.remote(self.master_addr, self.master_port) for a in self.actors]
        try:
            self.connected: list[dict] = ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.kill()
            raise RuntimeError(
                f"the {world} trainer ranks did not form their process group at rank 0's address "
                f"{self.master_addr}:{self.master_port} within {timeout_s:g}s (is every rank scheduled? can the "
                "nodes reach each other on that port?)"
            ) from None

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method` on every rank (collectives need all of them); returns one ref per rank."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return getattr(self.actors[0], method).remote(*args, **kwargs)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
