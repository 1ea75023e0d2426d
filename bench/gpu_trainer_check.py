"""The trainer side of the GPU path, checked on CUDA without vLLM or Ray (issue 28, part 3).

DeepSpeed ranks (`workers.trainer.TrainerWorker`, the pipeline's own trainer) on CUDA in bf16, ZeRO-2 and
ZeRO-3, three iterations each on a synthetic DPO batch, and four checks that print PASS or FAIL:

1. fp32 masters kept: at lr=1e-9 no weight moves by more than 1/100 of its bf16 rounding step (a policy
   restarted from its bf16 rounding each iteration would move by up to half a step);
2. memory flat: the peak and the resident CUDA memory of iterations 2 and 3 within 5% of iteration 1's;
3. the tensors the GPU sync paths hand vLLM's producers (`workers.nccl_client.engine_tensors`) are bit for bit
   the trainer's fp32 weights rounded to bf16 on the CPU;
4. log-probs of the bf16 module against the fp32 module, per token (reported; checked against 0.05 nats).

Run where a GPU is (one rank per visible GPU, at most 2): `python bench/gpu_trainer_check.py [--hidden 1024
--layers 8]`; it writes `gpu_trainer_check.json` under $OUT (or the current directory) and exits 1 if a check
fails. Record its output in BENCHMARKS.md.

Recipe for the lent GPU machine (PyTorch and transformers, but no DeepSpeed, Ray, vLLM or network; at most
64 MiB of files per command). Here, fetch the pure-Python wheels for its Python 3.12:

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_17_x86_64 --platform any -d .whl \\
        deepspeed==0.19.8 hjson py-cpuinfo ninja msgpack einops nvidia-ml-py \\
        pydantic pydantic-core annotated-types typing-inspection pyyaml

then run there (the device tool carries the untracked .whl/ directory):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. timeout 500 python bench/gpu_trainer_check.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common.ports import free_port  # noqa: E402

ITERATIONS = 3
MOVE_LIMIT = 0.01  # of a bf16 rounding step
MEMORY_LIMIT = 1.05
LOGP_LIMIT = 0.05  # nats per token


def bf16_step(w: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers (8 significant bits) at each of `w`'s magnitudes, at least 1e-3's: a weight
    at or near zero (a bias initialised to 0) loses nothing to bf16 rounding, while lr=1e-9's own steps are
    ~1e-8, far below 1/100 of the spacing at 1e-3 (7.6e-6) and far above it at 1e-9."""
    return torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-3))) - 7)


def synthetic_batch(vocab: int, n: int, seed: int):
    from common.records import PreferenceBatch, PreferenceGroup

    rng = random.Random(seed)

    def ids(length: int) -> list[int]:
        return [rng.randrange(4, vocab) for _ in range(length)]

    groups = [
        PreferenceGroup(
            prompt_index=i, prompt_ids=ids(rng.randint(8, 24)), responses=[ids(12), ids(16)], rewards=[1.0, 0.0]
        )
        for i in range(n)
    ]
    return PreferenceBatch(groups=groups)


def rank_main(rank: int, world: int, port: int, stage: int, model_path: str, results, gpus: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank) if gpus else ""
    from common.config import TrainConfig
    from workers.logprobs import batched_sequence_logprobs
    from workers.nccl_client import engine_tensors
    from workers.trainer import TrainerWorker

    trainer = TrainerWorker(rank, world, 600, num_gpus=gpus)
    trainer.connect("127.0.0.1", port)
    train = TrainConfig(
        num_workers=world, num_gpus=gpus, zero_stage=stage, bf16=True, lr=1e-9, epochs=1, micro_batch_size=8
    )
    trainer.setup(model_path, train, {"name": "dpo", "nll_coef": 1.0}, seed=0)
    vocab = trainer.hf_config.vocab_size
    batch = synthetic_batch(vocab, 32 * world, seed=1)
    start = {k: v.clone() for k, v in trainer.weights.items()}
    peaks, resident = [], []
    for it in range(1, ITERATIONS + 1):
        if gpus:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train(batch, it)
        if gpus:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
            resident.append(torch.cuda.memory_allocated())
    moved = max(float(((trainer.weights[k] - w0).abs() / bf16_step(w0)).max()) for k, w0 in start.items())
    out = {"rank": rank, "stage": stage, "moved_in_bf16_steps": moved, "peak_bytes": peaks, "resident_bytes": resident}
    if rank == 0:
        sent = dict(engine_tensors(trainer.sync_weights(), torch.bfloat16, trainer.device))
        if gpus:
            torch.cuda.synchronize()
        out["sync_bit_exact"] = all(
            torch.equal(v.cpu().view(torch.int16), trainer.sync_weights()[k].to(torch.bfloat16).view(torch.int16))
            for k, v in sent.items()
        )
        groups = batch.groups[:16]
        prompts, responses = [g.prompt_ids for g in groups], [g.responses[0] for g in groups]
        fp32 = trainer._fp32_module(trainer.weights).to(trainer.device).eval()
        lp32, lengths = batched_sequence_logprobs(fp32, prompts, responses, trainer.pad_id)
        del fp32
        bf16 = trainer._model(trainer.weights).eval()
        lp16, _ = batched_sequence_logprobs(bf16, prompts, responses, trainer.pad_id)
        out["logp_per_token_max_diff"] = float(((lp16.float() - lp32.float()).abs() / lengths.float()).max())
    results.put(out)


def check_stage(stage: int, world: int, model_path: str, gpus: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, stage, model_path, results, gpus)) for r in range(world)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sorted(got, key=lambda r: r["rank"])


def verdicts(rows: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    for r in rows:
        tag = f"ZeRO-{r['stage']} rank {r['rank']}"
        out.append(
            (
                f"{tag}: fp32 masters kept",
                r["moved_in_bf16_steps"] <= MOVE_LIMIT,
                f"{r['moved_in_bf16_steps']:.2e} steps",
            )
        )
        if r["peak_bytes"]:  # CUDA memory (not measured by --cpu)
            flat = max(r["peak_bytes"][1:]) <= MEMORY_LIMIT * r["peak_bytes"][0]
            flat &= max(r["resident_bytes"][1:]) <= MEMORY_LIMIT * max(r["resident_bytes"][0], 1)
            mib = [f"{b / 2**20:.0f}" for b in r["peak_bytes"]]
            out.append((f"{tag}: memory flat over {ITERATIONS} iterations", flat, f"peaks {'/'.join(mib)} MiB"))
        if "sync_bit_exact" in r:
            out.append((f"{tag}: sync tensors bit-exact", r["sync_bit_exact"], "bf16 vs CPU rounding"))
            d = r["logp_per_token_max_diff"]
            out.append((f"{tag}: bf16 vs fp32 log-probs", d <= LOGP_LIMIT, f"max {d:.4f} nats/token"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--cpu", action="store_true", help="the same checks on CPU ranks (gloo), memory left out")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_trainer_check: no CUDA device here; run it on a GPU machine (see the recipe in its docstring)")
        return 2
    from pipeline.tiny_model import tiny_model_path

    model_path = str(tiny_model_path(args.hidden, args.layers, sft_steps=0))
    gpus = 0 if args.cpu else 1
    world = 2 if args.cpu else min(2, torch.cuda.device_count())
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    rows = [row for stage in (2, 3) for row in check_stage(stage, world, model_path, gpus)]
    checks = verdicts(rows)
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    print(
        f"gpu_trainer_check: {device}, torch {torch.__version__}, {world} rank(s), "
        f"Qwen2 hidden {args.hidden} x {args.layers} layers"
    )
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    out = Path(os.environ.get("OUT", "."))
    (out / "gpu_trainer_check.json").write_text(json.dumps({"rows": rows, "checks": checks}, indent=1))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
