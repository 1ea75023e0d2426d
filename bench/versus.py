"""Whole runs against what a user would run instead, on the same model, prompts, samples, reward, loss,
learning rate, batch and iterations, each run in a process of its own:

- onalign, every prompt regenerated (`selection.mode: all`), and with OPTune's selection (rho 0.5);
- TRL's online DPO (bench/peers/trl_online_dpo.py): HF `generate`, 2 samples per prompt, pure DPO;
- a generate-score-train loop as RLHFlow runs it (bench/peers/generate_score_train.py): per iteration a
  fresh vLLM process, the reward, TRL's DPOTrainer in a fresh process, the model saved and reloaded.

    .venv/bin/python bench/versus.py [--model tiny|smollm2] [--seeds 0 1 2] [--iterations 6]

Shared: 2 samples per prompt (online DPO's fixed count), one gradient pass over each iteration's pairs,
reference = the initial model (online DPO's and RLHFlow's), constant learning rate. Against TRL's online DPO
the loss is pure DPO on both sides (it has no NLL term); against the loop DPO + NLL of the chosen response
(DPOTrainer's "sft" loss; onalign's `algorithm.nll_coef`). Every run's eval: onalign's eval prompts, greedy.

Time to reward: seconds from the process's launch until the first iteration whose eval reward reaches
onalign's final one, less the time spent evaluating (each tool evaluates its own way). The ratio is the
peer's time over onalign's (same loss); "> x" when the peer never reached it (its whole run over onalign's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchkit import ROOT, machine, write_section

from common.config_files import load_config

OUT = Path("/tmp/onalign-bench/versus")
MODELS = {"tiny": "configs/demo-cpu.yaml", "smollm2": "configs/smollm2-cpu.yaml"}
SHARED = ["rollout.n_samples=2", "train.epochs=1", "algorithm.name=dpo", "algorithm.reference=initial"]


def onalign_runs(nll: float) -> dict[str, list[str]]:
    return {
        f"onalign all, {loss_name(nll)}": [f"algorithm.nll_coef={nll}", "selection.mode=all"],
        f"onalign rho 0.5, {loss_name(nll)}": [
            f"algorithm.nll_coef={nll}",
            "selection.mode=lowest_reward",
            "selection.rho=0.5",
        ],
    }


def loss_name(nll: float) -> str:
    return f"DPO + {nll:g} NLL" if nll else "DPO"


def write_task(config: str, overrides: list[str], path: Path) -> dict:
    """The task every peer is given: onalign's own model, prompts (rendered by onalign's loader), reward and
    settings."""
    from transformers import AutoTokenizer

    from pipeline.data import load_prompt_sets
    from pipeline.model_source import resolve_model

    cfg = load_config(ROOT / config, overrides)
    model = resolve_model(cfg)
    train, evals = load_prompt_sets(cfg.data, AutoTokenizer.from_pretrained(model), cfg.seed)
    task = {
        "model": model,
        "reward": cfg.reward.function,
        "train": {"texts": train.texts, "references": train.references},
        "eval": {"texts": evals.texts, "references": evals.references},
        "n_samples": cfg.rollout.n_samples,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "max_model_len": cfg.rollout.max_model_len,
        "iterations": cfg.iterations,
        "lr": cfg.train.lr,
        "beta": cfg.algorithm.beta,
        "nll_coef": cfg.algorithm.nll_coef,
        "batch_size": cfg.train.num_workers * cfg.train.micro_batch_size,
        "seed": cfg.seed,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task))
    return task


def launch(argv: list[str], log: Path) -> tuple[float, float]:
    """Run a command to its end; returns (unix time at launch, wall seconds)."""
    launched, t = time.time(), time.perf_counter()
    with log.open("w") as f:
        subprocess.run(argv, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return launched, time.perf_counter() - t


def run_onalign(config: str, overrides: list[str], out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [str(ROOT / ".venv/bin/onalign"), "run", config, *overrides, f"output_dir={out}", "tensorboard=false"]
    launched, wall = launch(argv, out.parent / f"{out.name}.log")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"launched": launched, "wall": wall, "rows": rows}


def run_peer(script: str, task: Path, out: Path) -> dict:
    argv = [sys.executable, str(ROOT / "bench/peers" / script), str(task), str(out)]
    launched, wall = launch(argv, out.with_suffix(".log"))
    return {"launched": launched, "wall": wall, "rows": json.loads(out.read_text())["rows"]}


def timeline(run: dict) -> list[tuple[int, float, float]]:
    """(iteration, eval reward, seconds since launch less the evaluation so far) per row."""
    out, eval_s = [], 0.0
    for r in run["rows"]:
        eval_s += r.get("time_eval_s") or 0.0
        out.append((r["iteration"], r["eval_reward_mean"], r["finished_at"] - run["launched"] - eval_s))
    return out


def time_to(run: dict, target: float) -> float | None:
    return next((s for it, reward, s in timeline(run) if it > 0 and reward >= target - 1e-9), None)


def stage_means(runs: list[dict]) -> str:
    rows = [r for run in runs for r in run["rows"] if r["iteration"] > 0]
    keys = [("gen", "time_generate_s"), ("score", "time_score_s"), ("train", "time_train_s"), ("sync", "time_sync_s")]
    parts = [
        f"{name} {statistics.fmean(r.get(k) or 0.0 for r in rows):.1f}" for name, k in keys if any(k in r for r in rows)
    ]
    return " / ".join(parts)


def start_and_stop(run: dict) -> float:
    """Seconds outside the iterations and evaluations: start-up (to the initial eval) and shutdown."""
    rows = run["rows"]
    start = rows[0]["finished_at"] - run["launched"] - (rows[0].get("time_eval_s") or 0.0)
    stop = run["launched"] + run["wall"] - rows[-1]["finished_at"]
    return start + stop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=None, help="default: the model's config")
    ap.add_argument("--no-rho", action="store_true", help="leave out onalign's OPTune runs")
    ap.add_argument("--summarize", action="store_true", help="only rewrite the table from the last run's results")
    args = ap.parse_args()
    config = MODELS[args.model]
    if args.summarize:
        saved = json.loads((OUT / f"results-{args.model}.json").read_text())
        args.seeds = saved.get("seeds", args.seeds)
        summarize(args, config, saved["results"], saved["task"])
        return
    iters = [f"iterations={args.iterations}"] if args.iterations else []
    results: dict[str, list[dict]] = {}
    comparisons = [
        (0.0, "TRL online DPO", "trl_online_dpo.py"),
        (1.0, "generate-score-train loop", "generate_score_train.py"),
    ]
    for seed in args.seeds:
        for nll, peer, script in comparisons:
            overrides = [*SHARED, *iters, f"seed={seed}", f"algorithm.nll_coef={nll}"]
            task = write_task(
                config,
                [*overrides, "output_dir=/tmp/onalign-bench/versus/_"],
                OUT / f"task-{args.model}-{seed}-{nll:g}.json",
            )
            for name, extra in onalign_runs(nll).items():
                if args.no_rho and "rho" in name:
                    continue
                run = run_onalign(
                    config, [*overrides, *extra], OUT / f"{args.model}-{seed}-{name.replace(' ', '_').replace(',', '')}"
                )
                results.setdefault(name, []).append(run)
                print(
                    name,
                    seed,
                    [round(r["eval_reward_mean"], 3) for r in run["rows"]],
                    f"{run['wall']:.0f}s",
                    flush=True,
                )
            run = run_peer(
                script, OUT / f"task-{args.model}-{seed}-{nll:g}.json", OUT / f"{args.model}-{seed}-{script}.json"
            )
            results.setdefault(f"{peer}, {loss_name(nll)}", []).append(run)
            print(peer, seed, [round(r["eval_reward_mean"], 3) for r in run["rows"]], f"{run['wall']:.0f}s", flush=True)
    (OUT / f"results-{args.model}.json").write_text(json.dumps({"results": results, "task": task, "seeds": args.seeds}))
    summarize(args, config, results, task)


def summarize(args, config: str, results: dict[str, list[dict]], task: dict) -> None:
    n_iters = task["iterations"]

    lines = [
        f"Machine: {machine()}; {datetime.date.today()}; model {args.model} ({config} with {' '.join(SHARED)}), "
        f"{n_iters} iterations, seeds {args.seeds}, batch {task['batch_size']} pairs per step, lr {task['lr']:g}.",
        "",
        "| run | eval reward after each iteration (mean over seeds) | start-up + shutdown s | per iteration s "
        "(gen / score / train / sync) | wall s | time to onalign's final reward s | its time / onalign's, per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        nll = 1.0 if "NLL" in name else 0.0
        base_runs = results[f"onalign all, {loss_name(nll)}"]
        evals = [statistics.fmean(run["rows"][i]["eval_reward_mean"] for run in runs) for i in range(n_iters + 1)]
        reach, ratios = [], []
        for run, base in zip(runs, base_runs, strict=True):
            target = base["rows"][-1]["eval_reward_mean"]
            mine, theirs = time_to(base, target), time_to(run, target)
            reach.append(theirs)
            total = timeline(run)[-1][2]
            ratios.append(f"{theirs / mine:.2f}x" if theirs is not None else f"never (whole run {total / mine:.2f}x)")
        reached = [r for r in reach if r is not None]
        mean_reach = f"{statistics.fmean(reached):.1f} " if reached else ""
        lines.append(
            f"| {name} | {' → '.join(f'{e:.3f}' for e in evals)} | {statistics.fmean(map(start_and_stop, runs)):.1f} "
            f"| {stage_means(runs)} | {statistics.fmean(r['wall'] for r in runs):.1f} "
            f"| {mean_reach}({len(reached)}/{len(runs)} reached) | {', '.join(ratios)} |"
        )
    checks = [
        r for name, runs in results.items() if name.startswith("onalign") for run in runs for r in run["rows"][1:]
    ]
    check_s = sum(r.get("time_sync_check_s") or 0.0 for r in checks)
    iter_s = sum(r["time_total_s"] for r in checks)
    gaps = [r["sync_logp_max_abs_diff"] for r in checks if r.get("sync_logp_max_abs_diff") is not None]
    if gaps and iter_s:
        lines += [
            "",
            f"Sync check (onalign runs): {check_s:.2f} s of {iter_s:.1f} s of iterations ({check_s / iter_s:.2%}); "
            f"largest gap {max(gaps):.1e} per token over {len(gaps)} iterations.",
        ]
    text = "\n".join(lines)
    print(text)
    write_section(
        f"Whole runs against TRL's online DPO and a generate-score-train loop (bench/versus.py --model {args.model})",
        "```\n"
        + f".venv/bin/python bench/versus.py --model {args.model} --seeds {' '.join(map(str, args.seeds))}"
        + (f" --iterations {args.iterations}" if args.iterations else "")
        + "\n```\n\n"
        + text,
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
