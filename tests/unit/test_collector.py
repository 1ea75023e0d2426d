"""The actors freeze their start-up objects out of the cyclic collector: later garbage is still collected,
and the frozen objects are handed back at exit (else native bindings report them as leaked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import gc, weakref
from workers.collector import freeze_long_lived

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

kept = cycle()                # garbage before the freeze: collected by it, not frozen
freeze_long_lived()
assert kept() is None, "the freeze froze garbage"
assert gc.get_freeze_count() > 0
later = cycle()               # garbage made after start-up: the next collection frees it
gc.collect()
assert later() is None
print("ok", gc.get_freeze_count())
"""


def test_freeze_keeps_later_garbage_collectable_and_unfreezes_at_exit():
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok ")


def test_frozen_objects_are_finalised_at_exit():
    """An object frozen at start-up still runs its finaliser when the process exits."""
    code = """
import gc
from workers.collector import freeze_long_lived

class Loud:
    def __del__(self):
        print("finalised", flush=True)

a, b = Loud(), Loud()
a.other, b.other = b, a   # a cycle: only the collector can free it
freeze_long_lived()
del a, b
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("finalised") == 2
