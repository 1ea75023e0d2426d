"""Where P5's rollout time goes: the vLLM engine and HF `generate`, each profiled in its own process.

    .venv/bin/python bench/rollout_profile.py [--model bench|smollm2]

P5 compares the rollout actor's engine with HF `generate` on the same prompts (bench/throughput.py: 64
prompts x 4 samples x 64 new tokens, sampling at temperature 1). Here each side runs that rollout once
timed and once under cProfile, and the profile splits it into the model's forward pass (the same fp32
matmuls on the same 2 cores for both), the LM head and sampling, and everything else (vLLM: scheduler,
input preparation, KV-cache bookkeeping, detokenization; HF: its generation loop). The profiled shares
are scaled to the timed run. The forward pass bounds P5: vLLM cannot be faster than HF by more than HF's
total time over vLLM's forward time.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import time

from benchkit import cumulative, machine, run_json, write_section
from throughput import bench_model, hf_rollout, make_pairs, pair_groups

N_PROMPTS, N_SAMPLES, MAX_NEW = 64, 4, 64


def prompts_for(path: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [g.prompt_ids for g in pair_groups(tok, make_pairs(tok, N_PROMPTS))]


def profile_vllm(path: str) -> dict:
    from common.config import RolloutConfig
    from workers.rollout import RolloutWorker

    prompts = prompts_for(path)
    engine = RolloutWorker(path, RolloutConfig(kv_cache_mb=256, max_model_len=512))
    run = lambda seed: engine.generate(  # noqa: E731
        prompts, list(range(len(prompts))), N_SAMPLES, 1.0, 1.0, MAX_NEW, 0, seed
    )
    run(0)  # warm-up
    t = time.perf_counter()
    tokens = sum(len(o.response_ids) for o in run(1))
    secs = time.perf_counter() - t
    prof = cProfile.Profile()
    prof.enable()
    run(2)
    prof.disable()
    stats = pstats.Stats(prof)
    total = cumulative(stats, "generate")
    return {
        "seconds": secs,
        "tokens": tokens,
        "forward": cumulative(stats, "_model_forward") / total,
        "head_and_sampling": cumulative(stats, "compute_logits", "_sample") / total,
        "scheduler": cumulative(stats, "schedule", "update_from_output") / total,
        "inputs": cumulative(stats, "_prepare_inputs", "_update_states") / total,
        "outputs": cumulative(stats, "process_outputs") / total,
    }


def profile_hf(path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = prompts_for(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = type(model.base_model).forward.__name__  # the decoder stack's forward: "forward"
    assert base == "forward"

    def run() -> int:
        return hf_rollout(model, tok, prompts, N_SAMPLES, MAX_NEW)

    run()  # warm-up
    t = time.perf_counter()
    tokens = run()
    secs = time.perf_counter() - t
    # time the decoder stack and the LM head by wrapping them (cProfile cannot tell the model's many
    # `forward`s apart by name)
    spent = {"body": 0.0, "head": 0.0}

    def timed(module, key):
        original = module.forward

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            spent[key] += time.perf_counter() - t0
            return out

        module.forward = wrapper

    timed(model.base_model, "body")
    timed(model.get_output_embeddings(), "head")
    t = time.perf_counter()
    run()
    total = time.perf_counter() - t
    return {
        "seconds": secs,
        "tokens": tokens,
        "forward": spent["body"] / total,
        "head_and_sampling": None,
        "head": spent["head"] / total,
    }


def run_part(part: str, model: str) -> dict:
    from common.config import RolloutConfig
    from workers.rollout import engine_env

    env = {**os.environ, **(engine_env(RolloutConfig()) if part == "vllm" else {})}
    return run_json([__file__, "--model", model, "--part", part], env)


def main(model: str) -> None:
    path, described, _ = bench_model(model)
    vllm, hf = run_part("vllm", model), run_part("hf", model)
    vllm_tps, hf_tps = vllm["tokens"] / vllm["seconds"], hf["tokens"] / hf["seconds"]
    ms = lambda r, share: r["seconds"] * share * 1e3  # noqa: E731
    rows = [
        ("model forward (decoder stack)", ms(vllm, vllm["forward"]), ms(hf, hf["forward"])),
        ("LM head", None, ms(hf, hf["head"])),
        ("LM head and sampling (vLLM: compute_logits + sampler)", ms(vllm, vllm["head_and_sampling"]), None),
        ("scheduler (schedule + update_from_output)", ms(vllm, vllm["scheduler"]), None),
        ("input preparation (_prepare_inputs + _update_states)", ms(vllm, vllm["inputs"]), None),
        ("output processing and detokenization", ms(vllm, vllm["outputs"]), None),
        ("total (timed run)", vllm["seconds"] * 1e3, hf["seconds"] * 1e3),
    ]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    table = ["| part | vLLM engine ms | HF generate ms |", "|---|---|---|"]
    table += [f"| {name} | {fmt(a)} | {fmt(b)} |" for name, a, b in rows]
    bound = hf["seconds"] / (vllm["seconds"] * vllm["forward"])
    command = "`.venv/bin/python bench/rollout_profile.py" + ("" if model == "bench" else f" --model {model}") + "`"
    body = (
        f"Command: {command} ({datetime.date.today()}, {machine()}).\n\n"
        f"{described}; {N_PROMPTS} prompts x {N_SAMPLES} samples x {MAX_NEW} new tokens at temperature 1, "
        "each side in its own process on 2 cores (vLLM as the rollout actor runs it, tcmalloc preloaded; HF in "
        "batches of 16 prompts, as P5's baseline). Shares profiled in a second run (vLLM: cProfile; HF: timers "
        "around the decoder stack and the LM head), scaled to the timed run.\n\n"
        + "\n".join(table)
        + f"\n\nTokens/s: vLLM {vllm_tps:.0f}, HF {hf_tps:.0f}: P5 {vllm_tps / hf_tps:.2f}x. With everything but "
        f"the forward pass free, vLLM would reach {bound:.2f}x HF's time (P5's ceiling on this machine)."
    )
    title = "Where the rollout time goes (bench/rollout_profile.py" + ("" if model == "bench" else f" --model {model}")
    write_section(title + ")", body)
    print(body)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["bench", "smollm2"], default="bench")
    ap.add_argument("--part", choices=["vllm", "hf"])
    args = ap.parse_args()
    if args.part == "vllm":
        print(json.dumps(profile_vllm(bench_model(args.model)[0])))
    elif args.part == "hf":
        print(json.dumps(profile_hf(bench_model(args.model)[0])))
    else:
        main(args.model)
