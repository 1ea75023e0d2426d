"""A group of trainer actors that act as one data-parallel job: rank plumbing and fan-out calls."""

from __future__ import annotations

import socket
from typing import Any

import ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TrainerGroup:
    """`world` TrainerWorker actors wired as ranks 0..world-1 of one torch.distributed group."""

    def __init__(
        self, world: int, num_cpus: float, num_gpus: float, env: dict[str, str], timeout_s: float = 1800
    ) -> None:
        from workers.trainer import TrainerWorker

        master_addr = ray.util.get_node_ip_address()
        port = free_port()
        cls = ray.remote(TrainerWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env}, max_concurrency=1
        )
        self.world = world
        self.actors = [cls.remote(rank, world, master_addr, port, timeout_s) for rank in range(world)]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method` on every rank (collectives need all of them); returns one ref per rank."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return getattr(self.actors[0], method).remote(*args, **kwargs)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
