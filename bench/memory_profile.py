"""Where P6's trainer memory goes: one training iteration's resident memory, phase by phase.

    .venv/bin/python bench/memory_profile.py [--model bench|smollm2]

One TrainerWorker (world 1, ZeRO-2 on CPU, fp32, reference log-probs from the rollout) trains one DPO
iteration on bench/throughput.py's pairs in this process, while a thread samples the resident set every
few milliseconds. Each sample is labelled with the phase the trainer is in (wrapping the trainer's own
steps: reference log-probs, DeepSpeed set-up, forward, backward, optimizer step, gather, release), so
the table shows each phase's peak and what it adds over the memory before the model was loaded.
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
        self.phase = phase
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
    args = ap.parse_args()
    import os

    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    import deepspeed
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from transformers import AutoTokenizer

    from common.records import PreferenceBatch
    from workers import trainer as trainer_module
    from workers.trainer import TrainerWorker, flatten, free_port

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
    worker.setup(path, {**cfg, "reference_logps": "rollout"}, {"name": "dpo", "beta": 0.1}, 0)
    tied = getattr(worker.hf_config, "tie_word_embeddings", False)  # a tied LM head is the embedding: count once
    params = sum(v.numel() for k, v in worker.weights.items() if not (tied and k == "lm_head.weight"))
    lps = worker.sequence_logprobs(*flatten(groups))  # what the engine returns with each sample
    groups = with_sampled_logps(groups, lps, 1)
    sampler.enter("between iterations (policy held as a CPU state dict)")
    sampler.wrap(deepspeed, "initialize", "DeepSpeed engine set-up", after="after set-up")
    sampler.wrap(trainer_module, "loss_inputs", "forward (policy log-probs, logits)", after="loss")
    sampler.wrap(DeepSpeedEngine, "backward", "backward (gradients, reduction)", after="after backward")
    sampler.wrap(DeepSpeedEngine, "step", "optimizer step (Adam)", after="after step")
    sampler.wrap(TrainerWorker, "_gather", "gather the new weights", after="release the engine")
    worker.train(PreferenceBatch(groups), 1)
    sampler.enter("after the iteration")
    time.sleep(0.05)
    sampler.running = False
    sampler.thread.join()
    weights_mb = params * 4 / 2**20
    lines = ["| phase (in order) | peak RSS MiB | above start MiB | x fp32 weights |", "|---|---|---|---|"]
    for phase in sampler.order:
        if phase == "start":
            continue
        peak = sampler.peaks[phase]
        lines.append(f"| {phase} | {peak:.0f} | {peak - start:.0f} | {(peak - start) / weights_mb:.1f}x |")
    command = (
        "`.venv/bin/python bench/memory_profile.py" + ("" if args.model == "bench" else f" --model {args.model}") + "`"
    )
    body = (
        f"Command: {command} ({datetime.date.today()}, {machine()}).\n\n"
        f"{described}, {params / 1e6:.1f}M parameters ({weights_mb:.0f} MiB in fp32); one rank (world 1, so ZeRO-2 "
        f"partitions nothing), DPO, {N_PAIRS} pairs, micro-batch {BATCH // 2}, 1 epoch, reference log-probs from "
        f"the rollout. Resident memory sampled every 2 ms; the process held {start:.0f} MiB with its libraries "
        "loaded, before the model.\n\n" + "\n".join(lines)
    )
    title = (
        "Where the trainer's memory goes (bench/memory_profile.py"
        + ("" if args.model == "bench" else " --model smollm2")
        + ")"
    )
    write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
