"""Where P6's trainer memory and P1's training time go: one training iteration, phase by phase.

    .venv/bin/python bench/memory_profile.py [--model bench|smollm2]

One TrainerWorker (world 1, ZeRO-2 on CPU, fp32, reference log-probs from the rollout) trains two DPO
iterations on bench/throughput.py's pairs in this process, while a thread samples the resident set every
few milliseconds. The first is a warm-up (DeepSpeed's op builds; one line in the table); the second is the
profiled one, so what an iteration leaves behind shows in the next one's memory, as in a run. Each sample
is labelled with the phase the trainer is in (wrapping the trainer's own steps: reference log-probs,
DeepSpeed set-up, forward, backward, optimizer step, gather, release), so the table shows each phase's
peak and what it adds over the memory before the model was loaded, and the seconds spent in it (summed
over the micro-batches; the sampling thread costs a little of them).
"""

from __future__ import annotations

import argparse
import datetime
import threading
import time

from benchkit import machine, write_section
from throughput import BATCH, N_PAIRS, bench_model, make_pairs, pair_groups, with_sampled_logps


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PhaseSampler:
    """Peak resident memory per phase label, sampled by a background thread."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self.order: list[str] = []
        self.seconds: dict[str, float] = {}
        self.since = time.perf_counter()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(0.002)

    def sample(self) -> None:
        phase, now = self.phase, rss_mb()
        if phase not in self.peaks:
            self.order.append(phase)
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), now)

    def enter(self, phase: str) -> None:
        self.sample()
        now = time.perf_counter()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.since
        self.phase, self.since = phase, now
        self.sample()

    def wrap(self, owner, name: str, phase: str, after: str | None = None) -> None:
        """Label the time inside `owner.name` as `phase` (and what follows it as `after`)."""
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.enter(phase)
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    self.enter(after)

        setattr(owner, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["bench", "smollm2"], default="bench")
    ap.add_argument(
        "--mmap-threshold-kib",
        type=int,
        default=None,
        help="glibc's heap with train.cpu_mmap_threshold_kib (default: tcmalloc, as the trainer ranks)",
    )
    ap.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing true")
    args = ap.parse_args()
    import os
    import sys

    from workers.heap import tcmalloc_preload

    if args.mmap_threshold_kib is None and "libtcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        preload = tcmalloc_preload()  # as a CPU trainer rank starts (train.cpu_preload_tcmalloc)
        if preload:
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **preload})

    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    import deepspeed
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from transformers import AutoTokenizer

    from common.ports import free_port
    from common.records import PreferenceBatch
    from workers import trainer as trainer_module
    from workers.batches import flatten
    from workers.trainer import TrainerWorker

    torch.set_num_threads(2)
    path, described, _ = bench_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    groups = pair_groups(tok, make_pairs(tok, N_PAIRS))
    sampler = PhaseSampler()
    start = rss_mb()
    worker = TrainerWorker(0, 1)
    worker.connect("127.0.0.1", free_port())
    sampler.enter("setup: load the policy")
    cfg = {"num_workers": 1, "zero_stage": 2, "lr": 5e-4, "epochs": 1, "micro_batch_size": BATCH // 2}
    if args.mmap_threshold_kib is not None:
        cfg.update(cpu_preload_tcmalloc=False, cpu_mmap_threshold_kib=args.mmap_threshold_kib)
    if args.gradient_checkpointing:
        cfg.update(gradient_checkpointing=True)
    worker.setup(path, {**cfg, "reference_logps": "rollout"}, {"name": "dpo", "beta": 0.1}, 0)
    tied = getattr(worker.hf_config, "tie_word_embeddings", False)  # a tied LM head is the embedding: count once
    params = sum(v.numel() for k, v in worker.weights.items() if not (tied and k == "lm_head.weight"))
    lps = worker.sequence_logprobs(*flatten(groups))  # what the engine returns with each sample
    sampler.enter("warm-up iteration (the first; not split into phases)")
    worker.train(PreferenceBatch(with_sampled_logps(groups, lps, 1)), 1)
    sampler.enter("between iterations (policy held as a CPU state dict)")
    sampler.wrap(TrainerWorker, "_reference_logps", "reference log-probs", after="module built over the weights")
    sampler.wrap(deepspeed, "initialize", "DeepSpeed engine set-up", after="after set-up")
    sampler.wrap(trainer_module, "loss_inputs", "forward (policy log-probs, logits)", after="loss")
    sampler.wrap(DeepSpeedEngine, "backward", "backward (gradients, reduction)", after="after backward")
    sampler.wrap(DeepSpeedEngine, "step", "optimizer step (Adam)", after="after step")
    sampler.wrap(trainer_module, "gather_fp32", "gather the new weights", after="release the engine")
    worker.train(PreferenceBatch(with_sampled_logps(groups, lps, 2)), 2)
    sampler.enter("after the iteration")
    time.sleep(0.05)
    sampler.running = False
    sampler.thread.join()
    weights_mb = params * 4 / 2**20
    if "libtcmalloc" in os.environ.get("LD_PRELOAD", ""):
        allocator = "tcmalloc preloaded (as the trainer ranks start)"
    else:
        k = args.mmap_threshold_kib
        allocator = "glibc's heap, " + (f"mmap threshold {k} KiB" if k else "its own mmap threshold")
    lines = [
        "| phase (in order) | seconds | peak RSS MiB | above start MiB | x fp32 weights |",
        "|---|---|---|---|---|",
    ]
    timed = [p for p in sampler.order if p not in ("start", "after the iteration")]
    for phase in timed:
        peak = sampler.peaks[phase]
        lines.append(
            f"| {phase} | {sampler.seconds.get(phase, 0.0):.2f} | {peak:.0f} | {peak - start:.0f} | "
            f"{(peak - start) / weights_mb:.1f}x |"
        )
    training = [p for p in timed if not p.startswith(("setup", "warm-up", "between"))]
    train_s = sum(sampler.seconds.get(p, 0.0) for p in training)
    compute_s = sum(sampler.seconds.get(p, 0.0) for p in training if p.startswith(("forward", "backward", "optim")))
    command = (
        "`.venv/bin/python bench/memory_profile.py"
        + ("" if args.model == "bench" else f" --model {args.model}")
        + ("" if args.mmap_threshold_kib is None else f" --mmap-threshold-kib {args.mmap_threshold_kib}")
        + (" --gradient-checkpointing" if args.gradient_checkpointing else "")
        + "`"
    )
    body = (
        f"Command: {command} ({datetime.date.today()}, {machine()}).\n\n"
        f"{described}, {params / 1e6:.1f}M parameters ({weights_mb:.0f} MiB in fp32); one rank (world 1, so ZeRO-2 "
        f"partitions nothing), DPO, {N_PAIRS} pairs, micro-batch {BATCH // 2}, 1 epoch, reference log-probs from "
        f"the rollout, {allocator}; the phases are the second iteration's. Resident memory sampled every 2 ms; the process held {start:.0f} MiB with its libraries "
        "loaded, before the model.\n\n"
        + "\n".join(lines)
        + f"\n\nThe second training call (set-up to release) took {train_s:.1f} s, {compute_s / train_s:.0%} of it in the "
        "forward, backward and optimizer step that TRL's trainer runs too."
    )
    title = (
        "Where the trainer's memory and time go (bench/memory_profile.py"
        + ("" if args.model == "bench" else " --model smollm2")
        + ")"
    )
    if args.mmap_threshold_kib is None and not args.gradient_checkpointing:  # the defaults' section; others print
        write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
