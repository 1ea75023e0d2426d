"""Python's cyclic garbage collector in the actors.

An actor imports torch, transformers, DeepSpeed or vLLM before it does any work: some 400k objects that
live as long as the process. A full collection walks every one of them, and collections run every
iteration: the trainer collects once to free the iteration's DeepSpeed engine (`ds_engine.collect`), vLLM
collects several times while it starts, and the interpreter's own generation-2 passes come on top.
`freeze_long_lived` moves what is alive after start-up out of the collector's sight (`gc.freeze`, as CPython
recommends for long-lived processes), so a collection walks only what the run allocates since; it is taken
after a collection, so no garbage is frozen with them. What it saves: BENCHMARKS.md, "The collector".
"""

from __future__ import annotations

import atexit
import gc


def freeze_long_lived() -> None:
    """Collect, then exempt every object alive now from later collections (they are freed by reference
    counting as before, but a cycle among them would never be collected: call it once start-up is done).
    They are handed back at exit, so the interpreter's last collection finalises them (native bindings such
    as triton's report instances never finalised as leaks)."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # once, however often it is called
    atexit.register(gc.unfreeze)
