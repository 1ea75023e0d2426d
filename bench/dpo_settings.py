"""Which training settings let iterative DPO improve the built-in task: a small sweep over lr, epochs and
nll_coef, several seeds, on-policy pairs. APO's comparison with DPO uses the winner.

    .venv/bin/python bench/dpo_settings.py [--iterations 4] [--seeds 3]
"""

from __future__ import annotations

import argparse
import datetime
import statistics

from common import machine, shared_workers, write_section

SETTINGS = [
    ("lr 5e-4, 2 epochs, nll 0 (preset before)", ["train.lr=5e-4", "train.epochs=2", "algorithm.nll_coef=0"]),
    ("lr 5e-4, 2 epochs, nll 1", ["train.lr=5e-4", "train.epochs=2", "algorithm.nll_coef=1.0"]),
    ("lr 1e-4, 2 epochs, nll 1", ["train.lr=1e-4", "train.epochs=2", "algorithm.nll_coef=1.0"]),
    ("lr 2e-4, 1 epoch, nll 1", ["train.lr=2e-4", "train.epochs=1", "algorithm.nll_coef=1.0"]),
    ("lr 1e-4, 1 epoch, nll 0", ["train.lr=1e-4", "train.epochs=1", "algorithm.nll_coef=0"]),
    ("lr 5e-5, 2 epochs, nll 1", ["train.lr=5e-5", "train.epochs=2", "algorithm.nll_coef=1.0"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    lines = [
        "| setting | " + " | ".join(f"iter {i}" for i in range(args.iterations + 1)) + " | final - start (min) |",
        "|---|" + "---|" * (args.iterations + 2),
    ]
    best = None
    with shared_workers([f"iterations={args.iterations}", "tensorboard=false"]) as run:
        for name, extra in SETTINGS:
            runs = []
            for seed in range(args.seeds):
                rows, _ = run(
                    f"/tmp/onalign-bench/dpo-settings/{len(runs)}",
                    [*extra, f"seed={seed}"],
                    config="configs/cpu-dpo.yaml",
                )
                runs.append([r["eval_reward_mean"] for r in rows])
                print(name, seed, [round(v, 3) for v in runs[-1]], flush=True)
            means = [statistics.fmean(r[i] for r in runs) for i in range(args.iterations + 1)]
            gains = [r[-1] - r[0] for r in runs]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{m:.3f}" for m in means)
                + f" | {statistics.fmean(gains):+.3f} ({min(gains):+.3f}) |"
            )
            score = statistics.fmean(gains)
            if best is None or score > best[1]:
                best = (name, score)
    body = (
        f"Command: `.venv/bin/python bench/dpo_settings.py --iterations {args.iterations} --seeds {args.seeds}` "
        f"({datetime.date.today()}, {machine()}).\n\nIterative DPO (reference = previous iterate, on-policy "
        f"best-vs-worst of 4 samples, 256 prompts) under each setting: mean greedy eval reward over "
        f"{args.seeds} seeds per iteration, and the mean (minimum) gain over the run.\n\n" + "\n".join(lines)
    )
    write_section("Settings where iterative DPO improves (bench/dpo_settings.py)", body)
    print(f"best setting: {best[0]} (mean gain {best[1]:+.3f})")


if __name__ == "__main__":
    main()
