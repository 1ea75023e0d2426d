"""P2: orchestration share of iteration wall time, from the metrics of real pipeline runs.

    .venv/bin/python bench/orchestration.py [RUN_DIR ...]     (default: the runs bench/methods.py left)

Share = (time_total - generate - score - train - sync - eval) / time_total, summed over iterations.
The phases are timed by the driver around its remote calls, so Ray dispatch and object transfer inside
a phase count as that phase; the share is what the driver spends between phases (selection, pair
building bookkeeping, metrics, checkpoints are outside: checkpoint writes happen after time_total).
"""

from __future__ import annotations

import datetime
import glob
import json
import sys

from benchkit import machine, write_section

PHASES = ["time_generate_s", "time_score_s", "time_train_s", "time_sync_s", "time_eval_s"]


def main() -> None:
    dirs = sys.argv[1:] or sorted(glob.glob("/tmp/onalign-bench/methods/*"))
    total = phases = 0.0
    n = 0
    for d in dirs:
        for line in open(f"{d}/metrics.jsonl"):
            row = json.loads(line)
            if row["iteration"] == 0:
                continue
            total += row["time_total_s"]
            phases += sum(row[k] for k in PHASES)
            n += 1
    share = (total - phases) / total
    body = (
        f"Command: `.venv/bin/python bench/orchestration.py` over the {len(dirs)} runs of bench/methods.py "
        f"({datetime.date.today()}, {machine()}).\n\n"
        f"| id | measure | value | goal |\n|---|---|---|---|\n"
        f"| P2 | orchestration share of iteration wall time ({n} iterations, {total:.1f} s) | **{share:.2%}** | <= 5% |\n\n"
        "The phases are timed around the driver's remote calls, so Ray dispatch inside a phase counts as that "
        "phase; the share is the driver's own time between phases."
    )
    write_section("Orchestration share (bench/orchestration.py)", body)
    print(f"P2 orchestration share: {share:.2%} of {total:.1f} s over {n} iterations (goal <= 5%)")


if __name__ == "__main__":
    main()
