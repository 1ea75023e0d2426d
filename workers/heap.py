"""glibc heap settings of a CPU trainer process: what it keeps of the memory it frees.

PyTorch's CPU allocator is plain malloc. glibc serves blocks below its mmap threshold from a heap that
it keeps when they are freed, and it raises that threshold (up to 32 MiB) each time a large block is
freed, so a trainer's tensors (weights, activations, DeepSpeed's buffers) end up in a heap that fragments
across set-up, forward, backward and step: bench/memory_profile.py measured SmolLM2's peak at 10.1x the
fp32 weights with glibc's defaults and 7.2x with every block of 128 KiB or more mapped on its own.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


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
