"""Which training settings let iterative DPO improve the built-in task: a small sweep over lr, epochs and
nll_coef, several seeds, on-policy pairs. APO's comparison with DPO uses the winner.

    .venv/bin/python bench/dpo_settings.py [--iterations 4] [--seeds 3] [--config configs/cpu-dpo.yaml]

`--config` sweeps another method's preset the same way (e.g. configs/cpu-spin.yaml).
"""

from __future__ import annotations

import argparse
import datetime
import statistics

from benchkit import machine, shared_workers, write_section

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
    ap.add_argument("--config", default="configs/cpu-dpo.yaml")
    args = ap.parse_args()
    method = args.config.rsplit("cpu-", 1)[-1].removesuffix(".yaml")
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
                    config=args.config,
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
    flag = "" if args.config == "configs/cpu-dpo.yaml" else f" --config {args.config}"
    body = (
        f"Command: `.venv/bin/python bench/dpo_settings.py --iterations {args.iterations} --seeds {args.seeds}{flag}` "
        f"({datetime.date.today()}, {machine()}).\n\n{method} ({args.config}, on-policy data, 256 prompts) under "
        f"each setting: mean greedy eval reward over {args.seeds} seeds per iteration, and the mean (minimum) "
        "gain over the run.\n\n" + "\n".join(lines)
    )
    title = "Settings where iterative DPO improves" if method == "dpo" else f"Settings for {method}"
    write_section(f"{title} (bench/dpo_settings.py)", body)
    print(f"best setting: {best[0]} (mean gain {best[1]:+.3f})")


if __name__ == "__main__":
    main()
