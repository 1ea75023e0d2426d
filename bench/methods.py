"""Every method for N iterations on the built-in task from the same SFT start, over several seeds: eval
reward per iteration (mean and spread), and APO against iterative DPO at the same settings.

    .venv/bin/python bench/methods.py [--iterations 4] [--seeds 3]

A miniature of the papers' tables, written to BENCHMARKS.md whatever it shows. Each method runs its own
preset (configs/cpu-*.yaml: the paper's loss, lr 1e-4, 1 epoch, the setting bench/dpo_settings.py found
iterative DPO to improve in), so APO is compared with DPO at exactly those settings; "dpo+nll (demo)" is
make demo's setting (NLL of the chosen response added, Iterative RPO; 2 epochs).
A seed changes the prompt sets and the samples; the SFT start (iteration 0 model) is the same.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

from benchkit import eval_table, machine, shared_workers, write_section

RUNS = [
    ("dpo", "configs/cpu-dpo.yaml", []),
    ("dpo+nll (demo)", "configs/demo-cpu.yaml", []),
    ("ipo", "configs/cpu-ipo.yaml", []),
    ("slic", "configs/cpu-slic.yaml", []),
    ("rrhf", "configs/cpu-rrhf.yaml", []),
    ("wdpo (OPTune, rho 0.5)", "configs/cpu-wdpo.yaml", []),
    ("spin", "configs/cpu-spin.yaml", []),
    ("apo (alpha 0.1)", "configs/cpu-apo.yaml", ["algorithm.apo_alpha=0.1"]),
    ("apo (alpha 0.3)", "configs/cpu-apo.yaml", []),
]
# APO against iterative DPO with the same loss, lr and epochs (alpha = 0 is iterative DPO).
APO_VS_DPO = ["dpo", "apo (alpha 0.1)", "apo (alpha 0.3)"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    evals: dict[str, list[list[float]]] = {name: [] for name, *_ in RUNS}
    secs: dict[str, list[float]] = {name: [] for name, *_ in RUNS}
    with shared_workers([f"iterations={args.iterations}", "tensorboard=false"]) as run:
        for seed in range(args.seeds):
            for name, config, extra in RUNS:
                out = f"/tmp/onalign-bench/methods/{name.split()[0]}-{seed}"
                rows, s = run(out, [*extra, f"seed={seed}"], config=config)
                evals[name].append([r["eval_reward_mean"] for r in rows])
                secs[name].append(s)
                print(seed, name, [round(r["eval_reward_mean"], 3) for r in rows], f"{s:.0f}s", flush=True)
    names = [name for name, *_ in RUNS]
    body = (
        f"Command: `.venv/bin/python bench/methods.py --iterations {args.iterations} --seeds {args.seeds}` "
        f"({datetime.date.today()}, {machine()}).\n\n"
        f"Greedy eval reward (`eval_reward_mean`, 64 held-out prompts) after each iteration, mean ± half the "
        f"range over {args.seeds} seeds (seed = prompt sets and samples; the SFT start is the same), 256 train "
        "prompts x 4 samples (SPIN: 1), pairs from each iteration's own samples. Tiny 338k-parameter model.\n\n"
        + "\n".join(eval_table(names, evals, secs, args.iterations))
        + "\n\nAPO against iterative DPO at the same settings (the presets: lr 1e-4, 1 epoch; APO's paper claims "
        "it reaches iterative DPO's reward in fewer iterations):\n\n"
        + "\n".join(eval_table(APO_VS_DPO, evals, secs, args.iterations))
    )
    write_section("Methods on the built-in task (bench/methods.py)", body)
    finals = {name: statistics.fmean(run[-1] for run in evals[name]) for name in names}
    best = max(finals, key=finals.get)
    start = statistics.fmean(run[0] for run in evals[best])
    print(f"best mean final eval reward: {best} {finals[best]:.3f} vs start {start:.3f} ({finals[best] / start:.2f}x)")


if __name__ == "__main__":
    main()
