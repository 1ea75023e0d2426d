"""torch.distributed ranks spawned by the tests, safe against the free-port race: a port found free can be
taken by another process before rank 0's store binds it."""

from __future__ import annotations

from collections.abc import Callable


def spawn_ranks(
    fn: Callable, args: Callable[[int], tuple], nprocs: int, port: int | None = None, tries: int = 3
) -> None:
    """Run `fn(rank, *args(port))` in `nprocs` spawned processes on a port that was free when chosen (`port`:
    the first one to try); when rank 0 finds it taken (EADDRINUSE), all start again on a fresh port. A spawned
    process imports `fn` by its module's name (`e2e.test_...`): tests/, on this process's path under pytest,
    is on theirs too."""
    import torch.multiprocessing as mp

    from common.ports import free_port

    port = port or free_port()
    for attempt in range(tries):
        try:
            mp.start_processes(fn, args=args(port), nprocs=nprocs, join=True, start_method="spawn")
            return
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == tries - 1:
                raise
            port = free_port()


def store_rank(rank: int, port: int) -> None:
    """A rank that only opens the group's TCP store on `port` (rank 0 binds it)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.TCPStore("127.0.0.1", port, 1, rank == 0, timeout=timedelta(seconds=10))
