"""The memory allocator of CPU actors (PyTorch's CPU tensors come from plain malloc).

tcmalloc, preloaded into a CPU process, serves the many tensors a forward, backward and step allocate
and free much faster than glibc, and is what vLLM's CPU backend asks for. glibc, for its part, serves blocks
below its mmap threshold from a heap it keeps when they are freed (raising that threshold up to 32 MiB
each time a large block is freed), so a trainer's tensors fragment it; a fixed threshold of 128 KiB maps
every larger block on its own and returns it when freed: a lower peak for more time (page faults on every
fresh block). So tcmalloc by default, and the threshold as the setting for a run short of memory
(BENCHMARKS.md, "Where the trainer's memory and time go", has both measured).
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)

TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def tcmalloc_preload() -> dict[str, str]:
    """{"LD_PRELOAD": tcmalloc first, then what was preloaded already} when tcmalloc is installed (the Debian
    package libtcmalloc-minimal4), else {}. A preload only works in the environment a process starts with."""
    found = [p for p in TCMALLOC_PATHS if os.path.isfile(p)]
    if not found:
        return {}
    return {"LD_PRELOAD": ":".join(filter(None, [found[0], os.environ.get("LD_PRELOAD", "")]))}


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def set_mmap_threshold(kib: int) -> bool:
    """Serve every allocation of `kib` KiB or more with its own mapping, returned to the OS when freed (a
    fixed threshold: glibc stops raising it). 0 keeps glibc's default. Returns whether it was set."""
    libc = _libc()
    if kib <= 0 or libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, kib * 1024))


def trim() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
