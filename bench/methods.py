"""Every method for N iterations on the built-in task from the same SFT start: eval reward per iteration.

    .venv/bin/python bench/methods.py [--iterations 4]

A miniature of the papers' tables, written to BENCHMARKS.md whatever it shows. Pure methods use the
papers' losses (nll_coef 0); "dpo+nll" is the demo's default (DPO + NLL of the chosen response).
"""

from __future__ import annotations

import argparse
import datetime

from common import machine, shared_workers, write_section

RUNS = [
    ("dpo", "configs/cpu-dpo.yaml", []),
    ("dpo+nll", "configs/cpu-dpo.yaml", ["algorithm.nll_coef=1.0"]),
    ("ipo", "configs/cpu-ipo.yaml", []),
    ("slic", "configs/cpu-slic.yaml", []),
    ("rrhf", "configs/cpu-rrhf.yaml", []),
    ("wdpo (OPTune, rho 0.5)", "configs/cpu-wdpo.yaml", []),
    ("wdpo+nll (rho 0.5)", "configs/cpu-wdpo.yaml", ["algorithm.nll_coef=1.0"]),
    ("spin", "configs/cpu-spin.yaml", []),
    ("apo (alpha 0.3)", "configs/cpu-apo.yaml", []),
    ("apo+nll (alpha 0.3)", "configs/cpu-apo.yaml", ["algorithm.nll_coef=1.0"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=4)
    args = ap.parse_args()
    results = []
    with shared_workers([f"iterations={args.iterations}", "tensorboard=false"]) as run:
        for name, config, extra in RUNS:
            rows, secs = run(f"/tmp/onalign-bench/methods/{name.split()[0]}", extra, config=config)
            results.append((name, [r["eval_reward_mean"] for r in rows], secs))
            print(name, [round(r["eval_reward_mean"], 3) for r in rows], f"{secs:.0f}s", flush=True)
    head = "| method | " + " | ".join(f"iter {i}" for i in range(args.iterations + 1)) + " | final - start | wall s |"
    lines = [head, "|---|" + "---|" * (args.iterations + 3)]
    for name, evals, secs in results:
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in evals) + f" | {evals[-1] - evals[0]:+.3f} | {secs:.0f} |"
        )
    body = (
        f"Command: `.venv/bin/python bench/methods.py --iterations {args.iterations}` "
        f"({datetime.date.today()}, {machine()}).\n\n"
        "Greedy eval reward (`eval_reward_mean`, 64 held-out prompts) after each iteration, same SFT start "
        "(iteration 0), 256 train prompts x 4 samples, one seed. Tiny 338k-parameter model: differences of a few "
        "hundredths are within seed noise.\n\n" + "\n".join(lines)
    )
    write_section("Methods on the built-in task (bench/methods.py)", body)
    best = max(results, key=lambda r: r[1][-1])
    print(
        f"best final eval reward: {best[0]} {best[1][-1]:.3f} vs start {best[1][0]:.3f} "
        f"(ratio {best[1][-1] / best[1][0]:.2f}x)"
    )


if __name__ == "__main__":
    main()
