"""`make bench`: every benchmark in turn, each in its own process (its own Ray cluster), results into
BENCHMARKS.md. Prints each script's last line (its ratio)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "throughput.py",
    "sync_profile.py",
    "memory_profile.py",
    "rollout_profile.py",
    "levers.py",
    "methods.py",
    "orchestration.py",
    "optune.py",
    "collector.py",
]


def main() -> int:
    status = 0
    for script in SCRIPTS:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
        last = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"{script}: {last}  [{time.perf_counter() - t:.0f} s]", flush=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
