"""P1, P2, P3, P5, P6: ratios against a named baseline measured in the same run, on a 10-30M model.

    .venv/bin/python bench/throughput.py [--model bench|smollm2]

`--model bench` (default, `make bench`): the 13M Qwen2 built offline by the demo's builder.
`--model smollm2` (`make bench-real`): SmolLM2-135M-Instruct (pipeline/smollm2.py), a real pretrained model.

P1 DPO training tokens/s: our 2-rank ZeRO-2 trainer group vs TRL DPOTrainer (same model, pairs, global
   batch, sequence lengths, fp32).
P2 orchestration share of iteration wall time (pipeline run, 3 iterations).
P3 weight-sync bandwidth: bytes / sync time vs a plain in-process copy of the same tensors.
P5 rollout tokens/s: the vLLM actor vs HF `generate` on the same model and prompts.
P6 peak trainer RSS: one of our trainer ranks vs TRL DPOTrainer with its resident reference model; P1 also
with train.packing (sequences bin-packed into shared rows); P1 and P6 also with the memory setting
(MEMORY_SETTING: gradient checkpointing, glibc's heap with a 128 KiB mmap threshold). Baseline: TRL's defaults (its DPOConfig checkpoints gradients by default); also TRL at equal
settings: without checkpointing against our defaults (TRL_WITHOUT_CHECKPOINTING), with it and the same
glibc threshold against the memory setting (TRL_MEMORY_SETTING). TRL's figures are its best of TRL_RUNS
runs (its time and its peak memory vary from run to run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import time

from benchkit import best_of, machine, run_json, start_engine, write_section

HIDDEN, LAYERS = 512, 6
N_PAIRS, BATCH, EPOCHS = 128, 16, 1


def bench_model(name: str) -> tuple[str, str, str]:
    """(model directory, how BENCHMARKS.md describes it, the section title) for `--model name`."""
    if name == "smollm2":
        from pipeline.smollm2 import smollm2_path

        title = "Throughput and memory on SmolLM2-135M-Instruct (bench/throughput.py --model smollm2)"
        return str(smollm2_path()), "SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings)", title
    from pipeline.tiny_model import tiny_model_path

    path = str(tiny_model_path(hidden=HIDDEN, layers=LAYERS, sft_steps=0))
    return path, f"Qwen2 built offline by the demo's builder, hidden {HIDDEN}, {LAYERS} layers", TITLE


TITLE = "Throughput and memory (bench/throughput.py)"


def make_pairs(tok, n: int, seed: int = 0, response_chars: tuple[int, int] = (20, 40)) -> list[dict]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = []
    for _ in range(n):
        prompt = "reverse: " + "".join(rng.choice(letters) for _ in range(rng.randint(10, 30)))
        rows.append(
            {
                "prompt": prompt,
                "chosen": "".join(rng.choice(letters) for _ in range(rng.randint(*response_chars))),
                "rejected": "".join(rng.choice(letters) for _ in range(rng.randint(*response_chars))),
            }
        )
    return rows


def pair_groups(tok, rows: list[dict]):
    """`make_pairs` rows as the trainer's PreferenceGroups (responses end with EOS; chosen first)."""
    from common.records import PreferenceGroup

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        PreferenceGroup(
            i,
            enc(r["prompt"]),
            [enc(r["chosen"]) + [tok.eos_token_id], enc(r["rejected"]) + [tok.eos_token_id]],
            [1.0, 0.0],
        )
        for i, r in enumerate(rows)
    ]


def with_sampled_logps(groups: list, logps: list[float], iteration: int) -> list:
    """The groups as the rollout of `iteration` hands them over: each response with its sampled log-prob
    (`logps`: flattened, two per group), so the trainer takes its reference log-probs from them."""
    return [
        dataclasses.replace(g, sample_logps=logps[2 * i : 2 * i + 2], sampled_at=[iteration] * 2)
        for i, g in enumerate(groups)
    ]


def hf_rollout(model, tok, prompts: list[list[int]], n: int, max_new: int) -> int:
    """P5's baseline: HF `generate` (sampling, `n` per prompt) in batches of 16 left-padded prompts; returns
    the number of tokens generated."""
    import torch

    tokens = 0
    with torch.no_grad():
        for s in range(0, len(prompts), 16):
            chunk = prompts[s : s + 16]
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
            attn = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
            gen = model.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                max_new_tokens=max_new,
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
            )
            tokens += int(sum(int((row != tok.pad_token_id).sum()) for row in gen[:, width:]))
    return tokens


TRL_SCRIPT = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # libraries loaded, no model yet
path, rows, batch, epochs = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
args = DPOConfig(output_dir="/tmp/onalign-bench/trl", per_device_train_batch_size=batch, num_train_epochs=epochs,
                 learning_rate=5e-4, beta=0.1, report_to="none", use_cpu=True, logging_steps=10**6, save_strategy="no",
                 max_length=256, dataloader_num_workers=0, bf16=False,
                 **json.loads(sys.argv[5]))  # {} keeps TRL's own defaults (gradient checkpointing on)
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
t = time.perf_counter(); trainer.train(); secs = time.perf_counter() - t
print(json.dumps({"seconds": secs, "start_rss_mb": rss_start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
"""


def run_trl(path: str, rows: list[dict], config: dict | None = None, env: dict | None = None) -> dict:
    """TRL's DPOTrainer in its own process; `config` overrides DPOConfig fields, `env` adds to the environment."""
    data = "/tmp/onalign-bench/pairs.json"
    os.makedirs(os.path.dirname(data), exist_ok=True)
    with open(data, "w") as f:
        json.dump(rows, f)
    argv = ["-c", TRL_SCRIPT, path, data, str(BATCH), str(EPOCHS), json.dumps(config or {})]
    return run_json(argv, env={**os.environ, **(env or {})})


def best_trl(path: str, rows: list[dict], runs: int, **kwargs) -> dict:
    """TRL at its best over `runs` runs: the shortest time and the lowest peak (its tokens/s on the 13M model
    varied 1031-1179 between single runs), so our ratios are the conservative ones."""
    results = [run_trl(path, rows, **kwargs) for _ in range(runs)]
    low = min(results, key=lambda r: r["peak_rss_mb"])
    return {**low, "seconds": min(r["seconds"] for r in results), "runs": runs}


# For a run short of memory: each layer recomputed in the backward pass instead of its activations kept, and
# glibc's heap mapping every block of 128 KiB or more on its own (freed memory leaves the process at once).
MEMORY_SETTING = {"gradient_checkpointing": True, "cpu_preload_tcmalloc": False, "cpu_mmap_threshold_kib": 128}
# TRL's DPOConfig checkpoints by default (TRL >= 1.0): the goals' baseline. At equal settings: without it
# against our defaults; with it and the same glibc threshold (an environment variable) against the memory setting.
TRL_WITHOUT_CHECKPOINTING = {"config": {"gradient_checkpointing": False}}
TRL_MEMORY_SETTING = {"config": {"gradient_checkpointing": True}, "env": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}}
TRL_RUNS = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["bench", "smollm2"], default="bench")
    args = ap.parse_args()
    import ray
    import torch

    from common.config import SyncConfig, TrainConfig
    from common.records import PreferenceBatch
    from workers.actor_group import TrainerGroup, trainer_env
    from workers.batches import flatten
    from workers.weight_sync import sync_weights

    path, described, title = bench_model(args.model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    rows = make_pairs(tok, N_PAIRS)
    results: dict[str, str] = {}

    # ---------------- P1 / P6 baseline: TRL in its own process (before Ray takes the cores)
    trl = best_trl(path, rows, TRL_RUNS)  # TRL's defaults
    trl_plain = best_trl(path, rows, TRL_RUNS, **TRL_WITHOUT_CHECKPOINTING)
    trl_gc = best_trl(path, rows, TRL_RUNS, **TRL_MEMORY_SETTING)
    groups = pair_groups(tok, rows)
    tokens = EPOCHS * sum(2 * len(g.prompt_ids) + len(g.responses[0]) + len(g.responses[1]) for g in groups)

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1 << 30)
    train_cfg = {"num_workers": 2, "zero_stage": 2, "lr": 5e-4, "epochs": EPOCHS, "micro_batch_size": BATCH // 2}

    def train_ours(reference_logps: str, settings: dict | None = None):
        """A fresh 2-rank group: a warm-up iteration (DeepSpeed op builds, allocator), then one timed.
        Returns (the group, seconds, the peak-RSS rank's memory)."""
        cfg = {**train_cfg, "reference_logps": reference_logps, **(settings or {})}
        group = TrainerGroup(2, 0.5, 0, trainer_env(TrainConfig(**cfg)))  # as the pipeline starts its ranks
        ray.get(group.call("setup", path, cfg, {"name": "dpo", "beta": 0.1}, 0))
        warm_up, timed = groups, groups
        if reference_logps == "rollout":
            # what the engine returns with every sample: log-probs of the policy that sampled (this one)
            lps = ray.get(group.call_rank0("sequence_logprobs", *flatten(groups)))
            warm_up, timed = with_sampled_logps(groups, lps, 1), with_sampled_logps(groups, lps, 2)
        ray.get(group.call("train", ray.put(PreferenceBatch(warm_up)), 1))  # DeepSpeed op builds, allocator
        batch_ref = ray.put(PreferenceBatch(timed))
        t = time.perf_counter()
        ray.get(group.call("train", batch_ref, 2))
        secs = time.perf_counter() - t
        return group, secs, max(ray.get(group.call("memory_mb")), key=lambda m: m["peak"])

    fwd_group, fwd_s, fwd_mem = train_ours("forward")
    fwd_group.kill()
    mem_group, mem_s, mem_mem = train_ours("rollout", MEMORY_SETTING)
    mem_group.kill()
    packed_group, packed_s, _ = train_ours("rollout", {"packing": True})
    packed_group.kill()
    group, ours_s, ours_mem = train_ours("rollout")
    ours_rss = ours_mem["peak"]
    p1, p1_fwd = trl["seconds"] / ours_s, trl["seconds"] / fwd_s
    results["P1"] = (
        f"| P1 | DPO training tokens/s | {tokens / ours_s:.0f} (2 ranks, ZeRO-2, reference log-probs from the "
        f"rollout); {tokens / fwd_s:.0f} with a reference forward | TRL DPOTrainer {tokens / trl['seconds']:.0f}, "
        f"best of {trl['runs']}, its defaults (gradient checkpointing on) "
        f"| **{p1:.2f}x** ({trl_plain['seconds'] / ours_s:.2f}x against TRL without checkpointing; {p1_fwd:.2f}x with "
        f"a reference forward; {trl['seconds'] / packed_s:.2f}x with train.packing, {tokens / packed_s:.0f} tokens/s; "
        f"{trl['seconds'] / mem_s:.2f}x with the memory setting, {trl_gc['seconds'] / mem_s:.2f}x "
        "against TRL at equal settings) | >= 1.5x |"
    )
    p6, p6_fwd = ours_rss / trl["peak_rss_mb"], fwd_mem["peak"] / trl["peak_rss_mb"]
    ours_model, trl_model = ours_rss - ours_mem["start"], trl["peak_rss_mb"] - trl["start_rss_mb"]
    results["P6"] = (
        f"| P6 | peak trainer RSS (above the process's start-up RSS) | {ours_rss:.0f} MiB ({ours_model:.0f}) one rank, "
        f"reference from the rollout; {fwd_mem['peak']:.0f} MiB with a reference forward "
        f"| TRL DPOTrainer {trl['peak_rss_mb']:.0f} MiB ({trl_model:.0f}), best of {trl['runs']}, its defaults "
        f"| **{p6:.2f}x** ({ours_model / trl_model:.2f}x; {ours_rss / trl_plain['peak_rss_mb']:.2f}x against TRL "
        f"without checkpointing, {trl_plain['peak_rss_mb']:.0f} MiB; "
        f"{p6_fwd:.2f}x with a reference forward; **{mem_mem['peak'] / trl['peak_rss_mb']:.2f}x** with the memory setting, "
        f"{mem_mem['peak']:.0f} MiB ({mem_mem['peak'] - mem_mem['start']:.0f}); "
        f"{mem_mem['peak'] / trl_gc['peak_rss_mb']:.2f}x against TRL at equal settings, "
        f"{trl_gc['peak_rss_mb']:.0f} MiB ({trl_gc['peak_rss_mb'] - trl_gc['start_rss_mb']:.0f})) | <= 0.7x |"
    )

    # ---------------- P3: weight sync vs in-process copy
    engine = start_engine(path)
    weights = ray.get(group.call_rank0("sync_weights"))  # what a sync sends (a tied LM head once)
    nbytes = sum(v.numel() * v.element_size() for v in weights.values())
    sync_s = best_of(lambda: ray.get(sync_weights(group, [engine], SyncConfig())))
    clone_s = best_of(lambda: {k: v.clone() for k, v in weights.items()})
    dst = {k: torch.empty_like(v) for k, v in weights.items()}
    copy_s = best_of(lambda: [dst[k].copy_(v) for k, v in weights.items()])
    p3 = (nbytes / sync_s) / (nbytes / copy_s)
    results["P3"] = (
        f"| P3 | weight-sync bandwidth | {nbytes / sync_s / 1e9:.2f} GB/s ({nbytes / 1e6:.0f} MB, trainer rank 0 "
        f"-> object store -> vLLM, bucketed; best of 5) | in-process copy_ into preallocated tensors "
        f"{nbytes / copy_s / 1e9:.2f} GB/s (clone {nbytes / clone_s / 1e9:.2f} GB/s) | **{p3:.2f}x** "
        f"({clone_s / sync_s:.2f}x of clone) | >= 0.5x |"
    )
    group.kill()

    # ---------------- P5: vLLM actor vs HF generate
    prompts = [g.prompt_ids for g in groups[:64]]
    n, max_new = 4, 64
    ray.get(engine.generate.remote(prompts[:4], [0, 1, 2, 3], n, 1.0, 1.0, max_new, 0, 0))  # warm-up
    t = time.perf_counter()
    outs = ray.get(engine.generate.remote(prompts, list(range(len(prompts))), n, 1.0, 1.0, max_new, 0, 1))
    vllm_s = time.perf_counter() - t
    vllm_tokens = sum(len(o.response_ids) for o in outs)
    ray.kill(engine)
    ray.shutdown()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = time.perf_counter()
    hf_tokens = hf_rollout(model, tok, prompts, n, max_new)
    hf_s = time.perf_counter() - t
    p5 = (vllm_tokens / vllm_s) / (hf_tokens / hf_s)
    results["P5"] = (
        f"| P5 | rollout tokens/s ({len(prompts)} prompts x {n} x {max_new} tokens) | vLLM actor "
        f"{vllm_tokens / vllm_s:.0f} | HF generate {hf_tokens / hf_s:.0f} | **{p5:.2f}x** | >= 3x |"
    )

    body = (
        f"Command: `.venv/bin/python bench/throughput.py{'' if args.model == 'bench' else ' --model ' + args.model}` "
        f"({datetime.date.today()}, {machine()}).\n\n"
        f"Model: {described}, {params / 1e6:.1f}M "
        f"parameters, fp32 on CPU. P1/P6: {N_PAIRS} pairs, global batch {BATCH}, {EPOCHS} epoch, prompt 10-30 and "
        "responses 20-40 characters. P2 is in the methods/optune sections' timing columns (see below).\n\n"
        "| id | measure | onalign | baseline (same run) | ratio | goal |\n|---|---|---|---|---|---|\n"
        + "\n".join(results[k] for k in ("P1", "P3", "P5", "P6"))
    )
    write_section(title, body)
    for k in ("P1", "P3", "P5", "P6"):
        print(results[k])
    print(
        f"ratios: P1 {p1:.2f}x  P3 {p3:.2f}x  P5 {p5:.2f}x  P6 {p6:.2f}x  "
        f"(packing: P1 {trl['seconds'] / packed_s:.2f}x; memory setting: P1 {trl['seconds'] / mem_s:.2f}x, P6 {mem_mem['peak'] / trl['peak_rss_mb']:.2f}x; "
        f"against TRL at equal settings: P1 {trl_plain['seconds'] / ours_s:.2f}x and {trl_gc['seconds'] / mem_s:.2f}x, "
        f"P6 {ours_rss / trl_plain['peak_rss_mb']:.2f}x and {mem_mem['peak'] / trl_gc['peak_rss_mb']:.2f}x)"
    )


if __name__ == "__main__":
    main()
