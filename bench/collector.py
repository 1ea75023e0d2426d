"""The collector: what freezing the actors' start-up objects out of Python's cyclic collector saves.

    .venv/bin/python bench/collector.py [--model tiny|smollm2]

Baseline: the same actor code with `workers.collector.freeze_long_lived` made a no-op, each variant in a
process of its own, measured in the same run (best of `--repeats` processes):
- engine start: constructing the rollout actor's vLLM engine (`RolloutWorker`, CPU, imports included);
- generate: 64 prompts x 4 samples x 16 tokens on that engine;
- train: one iteration of the trainer (`TrainerWorker.train`, one rank, DPO, 128 pairs, 2 epochs of
  micro-batches of 16), mean of iterations 2-5.
A ratio is baseline / frozen: above 1.0x the freeze saved time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit import machine, run_json, write_section  # noqa: E402

TITLE = "The collector (bench/collector.py)"


def model_path(name: str) -> str:
    if name == "smollm2":
        from pipeline.smollm2 import smollm2_path

        return str(smollm2_path())
    from pipeline.tiny_model import tiny_model_path

    return str(tiny_model_path())


def engine_child(path: str) -> dict:
    from common.config import RolloutConfig
    from workers.rollout import RolloutWorker

    t = time.perf_counter()
    engine = RolloutWorker(path, RolloutConfig(kv_cache_mb=256, max_model_len=256), "float32", 0, "cpu")
    start = time.perf_counter() - t
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"reverse: word{i}"}], add_generation_prompt=True)
        for i in range(64)
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    engine.generate(prompts, list(range(64)), 4, 1.0, 1.0, 16, 0, 0)  # warm-up
    t = time.perf_counter()
    engine.generate(prompts, list(range(64)), 4, 1.0, 1.0, 16, 1, 1)
    return {"engine_start_s": start, "generate_s": time.perf_counter() - t}


def trainer_child(path: str) -> dict:
    from throughput import make_pairs, pair_groups, with_sampled_logps
    from transformers import AutoTokenizer

    from common.ports import free_port
    from common.records import PreferenceBatch
    from workers.batches import flatten
    from workers.trainer import TrainerWorker

    tok = AutoTokenizer.from_pretrained(path)
    groups = pair_groups(tok, make_pairs(tok, 128))
    worker = TrainerWorker(0, 1)
    worker.connect("127.0.0.1", free_port())
    cfg = {"num_workers": 1, "zero_stage": 2, "lr": 1e-4, "epochs": 2, "micro_batch_size": 16}
    worker.setup(path, {**cfg, "reference_logps": "rollout"}, {"name": "dpo", "beta": 0.1}, 0)
    lps = worker.sequence_logprobs(*flatten(groups))
    times = []
    for it in range(1, 6):
        t = time.perf_counter()
        worker.train(PreferenceBatch(with_sampled_logps(groups, lps, it)), it)
        times.append(time.perf_counter() - t)
    return {"train_s": statistics.fmean(times[1:])}


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.baseline:
        from workers import collector

        collector.freeze_long_lived = lambda: None
    path = model_path(args.model)
    out = engine_child(path) if args.child == "engine" else trainer_child(path)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["engine", "trainer"])
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    best: dict[str, dict[str, float]] = {"baseline": {}, "frozen": {}}
    for _ in range(args.repeats):
        for variant in ("baseline", "frozen"):
            for kind in ("engine", "trainer"):
                argv = [
                    __file__,
                    "--child",
                    kind,
                    "--model",
                    args.model,
                    *(["--baseline"] if variant == "baseline" else []),
                ]
                for key, value in run_json(argv, env).items():
                    best[variant][key] = min(value, best[variant].get(key, float("inf")))
    rows = [
        ("engine start (vLLM, imports included)", "engine_start_s"),
        ("generate 64 prompts x 4 samples x 16 tokens", "generate_s"),
        ("one training iteration (1 rank, 128 pairs, 2 epochs)", "train_s"),
    ]
    lines = [
        f"Command: `.venv/bin/python bench/collector.py --model {args.model}` "
        f"({datetime.date.today()}, {machine()}), best of {args.repeats} processes per variant.",
        "",
        "| stage | baseline: no freeze (s) | start-up objects frozen (s) | baseline / frozen |",
        "|---|---:|---:|---:|",
    ]
    for label, key in rows:
        b, f = best["baseline"][key], best["frozen"][key]
        lines.append(f"| {label} | {b:.3f} | {f:.3f} | **{b / f:.2f}x** |")
    body = "\n".join(lines)
    print(body)
    write_section(TITLE if args.model == "tiny" else TITLE.replace(")", f" --model {args.model})"), body)


if __name__ == "__main__":
    main()
