"""Which levers helped: each one switched off alone, against everything on, measured in the same run.

    .venv/bin/python bench/levers.py

Training levers (DPO, the bench model of bench/throughput.py, one process with 2 threads per variant so
that each peak RSS is its own; the variants use the trainer's own code: `sequence_logprobs`,
`batched_sequence_logprobs`, `micro_batches`, `dpo_loss`):
- concat:      one forward over chosen + rejected (2B sequences) vs two forwards of B;
- ref_from_rollout: the reference log-probs are the ones the engine returned with each sample (the
               reference is the policy that sampled: no reference model at all) vs computed once per
               iteration by a reference forward (no-grad, length-sorted, model dropped before training);
- ref_precompute: that once-per-iteration reference forward vs a resident reference model run at every
               micro-batch (this variant also has the rollout lever off);
- group_by_length: micro-batches cut from length-sorted windows vs uniformly random micro-batches;
- response_logits: logits (LM head, log-softmax and their gradients) only from the first response column
               on (`logits_to_keep`) vs every column, the prompt's included (the path for a model whose
               forward has no `logits_to_keep`);
- fused_adam:  torch's fused AdamW (one pass over the weights per step, what the trainer asks DeepSpeed
               for) vs its per-tensor implementation;
- packing (train.packing, off by default; a variant with the lever on): the micro-batch's sequences bin-packed into rows as
               wide as its longest sequence, each restarting its positions (HF builds the block-diagonal
               causal mask from the position ids), so no padding between them vs one padded row each;
- tcmalloc:    tcmalloc preloaded (train.cpu_preload_tcmalloc, as every CPU trainer rank starts) vs glibc's
               heap, and vs glibc mapping every block of 128 KiB or more on its own
               (train.cpu_mmap_threshold_kib 128, the setting for a run short of memory).
Rollout levers (the vLLM engine of the rollout actor, in its own process per variant, as P5 measures it:
64 prompts x 4 samples x 64 tokens on the bench model):
- tcmalloc:    LD_PRELOAD tcmalloc (rollout.cpu_preload_tcmalloc, on by default when installed) vs glibc malloc;
- iomp:        Intel OpenMP preloaded too (vLLM's other CPU advice; not the default);
- eager:       rollout.enforce_eager (the default) vs torch.compile (slower start, timed separately);
- prefix caching: the n samples of a prompt share its KV blocks (rollout.enable_prefix_caching) vs not.
- batch:       all 256 samples decoded together (vLLM's CPU default max_num_seqs 256) vs
               rollout.max_num_seqs 64 (four waves).
Sync lever (the vLLM actor, through Ray, as in P3):
- bucketed sync: the state dict in one object-store transfer, loaded in 256 MB buckets vs one Ray call
               per tensor.
Every ratio is (variant with the lever off) / (all levers on): above 1.0x for time or memory means the
lever helped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from benchkit import best_of, machine, run_json, start_engine, write_section
from throughput import bench_model, make_pairs

N_PAIRS, MICRO_BATCH, EPOCHS, ROUNDS = 64, 8, 2, 2  # two rounds keep `make bench` under 25 minutes
ROLLOUT_ROUNDS = 2  # each compiled engine start takes ~35 s: two rounds keep `make bench` under 25 minutes
RESPONSE_CHARS = (4, 120)  # a wide length spread, as in real preference data
VARIANTS = {
    "all levers on": {},
    "concat off (two forwards)": {"concat": False},
    "ref_from_rollout off (reference forward per iteration)": {"reference": "precompute"},
    "ref_precompute off too (resident reference)": {"reference": "resident"},
    "group_by_length off (random micro-batches)": {"group_by_length": False},
    "response_logits off (logits of every column)": {"response_logits": False},
    "fused_adam off (per-tensor AdamW)": {"fused_adam": False},
    "packing on (bin-packed rows, no padding between sequences)": {"packing": True},
    "tcmalloc off (glibc's heap)": {"tcmalloc": False},
    "tcmalloc off, glibc 128 KiB mmap threshold": {"tcmalloc": False, "mmap_threshold_kib": 128},
}


def train_variant(
    concat: bool = True,
    reference: str = "rollout",
    group_by_length: bool = True,
    response_logits: bool = True,
    fused_adam: bool = True,
    mmap_threshold_kib: int = 0,
    packing: bool = False,
) -> dict:
    """One DPO iteration (EPOCHS epochs) over the bench pairs with the given levers; tokens/s and peak RSS."""
    import torch

    class EveryColumnLogits(torch.nn.Module):
        """The policy with `logits_to_keep` hidden from `sequence_logprobs`, so it computes every column's logits."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, **kwargs):
            return self.model(**kwargs)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.config import AlgorithmConfig
    from workers.batches import micro_batches
    from workers.heap import set_mmap_threshold
    from workers.logprobs import batched_sequence_logprobs, bin_pack, sequence_logprobs
    from workers.losses import LossInputs, dpo_loss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    set_mmap_threshold(mmap_threshold_kib)
    path = bench_model("bench")[0]
    tok = AutoTokenizer.from_pretrained(path)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = make_pairs(tok, N_PAIRS, response_chars=RESPONSE_CHARS)
    prompts = [enc(r["prompt"]) for r in rows]
    chosen = [enc(r["chosen"]) + [tok.eos_token_id] for r in rows]
    rejected = [enc(r["rejected"]) + [tok.eos_token_id] for r in rows]
    pad = tok.pad_token_id
    cfg = AlgorithmConfig(name="dpo", beta=0.1)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trained = policy if response_logits else EveryColumnLogits(policy)
    ref_all = None
    if reference == "rollout":  # the engine's sampled log-probs of the policy, before training (not timed)
        lp, _ = batched_sequence_logprobs(policy.eval(), prompts + prompts, chosen + rejected, pad)
        ref_all = torch.stack([lp[:N_PAIRS], lp[N_PAIRS:]], dim=1)
        policy.train()
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if packing:  # train.packing's own packed path, checked against the padded one (fp32: to float rounding)
        with torch.no_grad():
            pk, pd = (
                sequence_logprobs(policy, prompts[:16], chosen[:16], pad, packed=True),
                sequence_logprobs(policy, prompts[:16], chosen[:16], pad),
            )
        assert torch.allclose(pk[0], pd[0], atol=1e-3), (pk[0] - pd[0]).abs().max()
    t0 = time.perf_counter()
    if reference == "precompute":
        lp, _ = batched_sequence_logprobs(ref_model, prompts + prompts, chosen + rejected, pad)
        ref_all = torch.stack([lp[:N_PAIRS], lp[N_PAIRS:]], dim=1)
        del ref_model
    optim = torch.optim.AdamW(policy.parameters(), lr=5e-4, foreach=False, fused=fused_adam)
    widths = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    real = padded = 0
    for epoch in range(EPOCHS):
        for idx in micro_batches(widths, MICRO_BATCH, random.Random(epoch), group_by_length):
            p = [prompts[i] for i in idx]
            c, r = [chosen[i] for i in idx], [rejected[i] for i in idx]
            if concat or packing:
                lp, ln = sequence_logprobs(trained, p + p, c + r, pad, packing)
                logps, lengths = (
                    torch.stack([lp[: len(idx)], lp[len(idx) :]], 1),
                    torch.stack([ln[: len(idx)], ln[len(idx) :]], 1),
                )
            else:
                (lc, nc), (lr, nr) = sequence_logprobs(trained, p, c, pad), sequence_logprobs(trained, p, r, pad)
                logps, lengths = torch.stack([lc, lr], 1), torch.stack([nc, nr], 1)
            if ref_all is not None:
                ref = ref_all[idx]
            else:
                with torch.no_grad():
                    ref = torch.stack(
                        [sequence_logprobs(ref_model, p, c, pad)[0], sequence_logprobs(ref_model, p, r, pad)[0]], 1
                    )
            loss, _ = dpo_loss(LossInputs(logps, lengths, torch.tensor([[1.0, 0.0]] * len(idx)), ref), cfg)
            optim.zero_grad()
            loss.mean().backward()
            optim.step()
            forwards = [(p + p, c + r)] if concat or packing else [(p, c), (p, r)]
            for xs, ys in forwards:
                seqs = [len(x) + len(y) for x, y in zip(xs, ys, strict=True)]
                real += sum(seqs)
                padded += max(seqs) * (len(bin_pack(seqs, max(seqs))) if packing else len(seqs))
    secs = time.perf_counter() - t0
    return {
        "tokens_per_s": real / secs,
        "seconds": secs,
        "pad_fraction": 1 - real / padded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


ROLLOUT_VARIANTS = {
    "defaults (tcmalloc, eager, prefix caching)": {},
    "tcmalloc off": {"tcmalloc": False},
    "iomp on (with tcmalloc)": {"iomp": True},
    "compiled (enforce_eager off)": {"enforce_eager": False},
    "prefix caching off": {"enable_prefix_caching": False},
    "max_num_seqs 64 (four waves)": {"max_num_seqs": 64},
}


def rollout_variant(
    enforce_eager: bool = True, enable_prefix_caching: bool = True, max_num_seqs: int | None = None
) -> dict:
    """The engine in this process (its LD_PRELOAD set by the caller): start-up seconds and rollout tokens/s."""
    import os

    from common.config import RolloutConfig
    from workers.rollout import ENGINE_ENV, RolloutWorker

    os.environ.update(ENGINE_ENV)
    path = bench_model("bench")[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in make_pairs(tok, 64)]
    cfg = RolloutConfig(
        kv_cache_mb=256,
        max_model_len=512,
        enforce_eager=enforce_eager,
        enable_prefix_caching=enable_prefix_caching,
        max_num_seqs=max_num_seqs,
    )
    t = time.perf_counter()
    engine = RolloutWorker(path, cfg)
    start_s = time.perf_counter() - t
    engine.generate(prompts[:4], [0, 1, 2, 3], 4, 1.0, 1.0, 64, 0, 0)  # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompts, list(range(len(prompts))), 4, 1.0, 1.0, 64, 0, 1)
    secs = time.perf_counter() - t
    return {"tokens_per_s": sum(len(o.response_ids) for o in outs) / secs, "start_s": start_s}


def run_variant(levers: dict, kind: str = "train") -> dict:
    import os

    from common.config import RolloutConfig
    from workers.heap import tcmalloc_preload
    from workers.rollout import engine_env

    env = dict(os.environ)
    if kind == "train" and levers.pop("tcmalloc", True):  # preloaded, as a CPU trainer rank starts
        env.update(tcmalloc_preload())
    if kind == "rollout":
        preload = engine_env(RolloutConfig(cpu_preload_tcmalloc=levers.pop("tcmalloc", True))).get("LD_PRELOAD", "")
        if levers.pop("iomp", False):
            preload = ":".join(filter(None, [preload, str(Path(sys.prefix) / "lib" / "libiomp5.so")]))
        env["LD_PRELOAD"] = preload
    return run_json([__file__, f"--{kind}", json.dumps(levers)], env)


def sync_lever() -> tuple[float, float, float, int]:
    """Seconds per sync (same engine, same weights): bucketed numpy buffers through the object store (ours) vs
    one Ray call per tensor vs the state dict as pickled torch tensors."""
    import ray
    from transformers import AutoModelForCausalLM

    from workers.cpu_transfer import to_wire
    from workers.weights import sync_state_dict

    path = bench_model("bench")[0]
    model = AutoModelForCausalLM.from_pretrained(path)
    # what a sync sends: a tied LM head once, under the embedding's name (vLLM rejects it on its own)
    weights = sync_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1 << 30)
    engine = start_engine(path)

    def bucketed() -> None:
        ray.get(engine.load_weights.remote(ray.put(to_wire(weights)), 256))

    def per_tensor() -> None:
        ray.get(engine.start_weight_update.remote())
        ray.get(
            [engine.update_weights.remote({"update_info": {"names": [k], "tensors": [v]}}) for k, v in weights.items()]
        )
        ray.get(engine.finish_weight_update.remote())

    def pickled_torch() -> None:  # one bucket, but torch tensors pickled through the object store
        ray.get(engine.start_weight_update.remote())
        ray.get(
            engine.update_weights.remote({"update_info": {"names": list(weights), "tensors": list(weights.values())}})
        )
        ray.get(engine.finish_weight_update.remote())

    out = [best_of(bucketed), best_of(per_tensor), best_of(pickled_torch)]
    ray.shutdown()
    return out[0], out[1], out[2], len(weights)


def main() -> None:
    # ROUNDS interleaved rounds (each variant once per round); the median round counts, the spread is shown
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(ROUNDS):
        for name, levers in VARIANTS.items():
            runs[name].append(run_variant(levers))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base_tps, base_rss = median("all levers on", "tokens_per_s"), median("all levers on", "peak_rss_mb")
    rows, ratios = [], {}
    for name in VARIANTS:
        tps = [r["tokens_per_s"] for r in runs[name]]
        ratios[name] = base_tps / median(name, "tokens_per_s")
        rows.append(
            f"| {name} | {median(name, 'tokens_per_s'):.0f} ({min(tps):.0f}-{max(tps):.0f}) | "
            f"**{ratios[name]:.2f}x** | {median(name, 'pad_fraction'):.0%} | {median(name, 'peak_rss_mb'):.0f} | "
            f"{median(name, 'peak_rss_mb') / base_rss:.2f}x |"
        )
    gen: dict[str, list[dict]] = {name: [] for name in ROLLOUT_VARIANTS}
    for _ in range(ROLLOUT_ROUNDS):
        for name, levers in ROLLOUT_VARIANTS.items():
            gen[name].append(run_variant(dict(levers), kind="rollout"))
    gen_base = statistics.median(r["tokens_per_s"] for r in gen["defaults (tcmalloc, eager, prefix caching)"])
    gen_rows = []
    for name, results in gen.items():
        tps = [r["tokens_per_s"] for r in results]
        ratios[name] = statistics.median(tps) / gen_base
        gen_rows.append(
            f"| {name} | {statistics.median(tps):.0f} ({min(tps):.0f}-{max(tps):.0f}) | **{ratios[name]:.2f}x** "
            f"| {statistics.median(r['start_s'] for r in results):.1f} |"
        )
    bucketed_s, per_tensor_s, pickled_s, n_tensors = sync_lever()
    body = (
        f"Command: `.venv/bin/python bench/levers.py` ({datetime.date.today()}, {machine()}).\n\n"
        f"Training: DPO on the bench model (13.2M parameters, fp32), {N_PAIRS} pairs, micro-batch {MICRO_BATCH}, "
        f"{EPOCHS} epochs, responses {RESPONSE_CHARS[0]}-{RESPONSE_CHARS[1]} characters; each variant in its own "
        f"process (2 threads), switching one lever off; {ROUNDS} interleaved rounds, medians (tokens/s range in "
        "brackets). Time ratio = time of the variant / time with every lever on: above 1.00x, the lever helped.\n\n"
        "| variant | tokens/s | time vs all on | padding | peak RSS MiB | RSS vs all on |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nRollout: the engine of the rollout actor in its own process per variant (its preloads set at "
        f"process start), 64 prompts x 4 samples x 64 tokens, {ROLLOUT_ROUNDS} interleaved rounds, medians. Ratio = "
        "tokens/s of the variant / the defaults: above 1.00x the variant is faster.\n\n"
        "| variant | tokens/s | vs defaults | engine start-up s |\n|---|---|---|---|\n"
        + "\n".join(gen_rows)
        + f"\n\nSync ({n_tensors} tensors, 53 MB, into the vLLM actor through Ray, best of 5): ours (numpy buffers in "
        f"one object-store transfer, 256 MB buckets) {bucketed_s * 1e3:.0f} ms; one Ray call per tensor "
        f"{per_tensor_s * 1e3:.0f} ms (**{per_tensor_s / bucketed_s:.2f}x** slower); one transfer of pickled torch "
        f"tensors {pickled_s * 1e3:.0f} ms (**{pickled_s / bucketed_s:.2f}x** slower)."
    )
    write_section("Which levers helped (bench/levers.py)", body)
    print(body)
    train_parts = [f"{name.split(' (')[0]} {ratios[name]:.2f}x" for name in VARIANTS if name != "all levers on"]
    gen_parts = [f"{name} {ratios[name]:.2f}x" for name in list(ROLLOUT_VARIANTS)[1:]]
    print(
        "training time with the lever off / all on: "
        + ", ".join(train_parts)
        + "; rollout tokens/s vs defaults: "
        + ", ".join(gen_parts)
        + f"; sync per tensor {per_tensor_s / bucketed_s:.2f}x, pickled torch {pickled_s / bucketed_s:.2f}x"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", help="JSON of lever switches: run one training variant and print its JSON")
    ap.add_argument("--rollout", help="JSON of lever switches: run one rollout variant and print its JSON")
    args = ap.parse_args()
    if args.train is not None:
        print(json.dumps(train_variant(**json.loads(args.train))))
    elif args.rollout is not None:
        print(json.dumps(rollout_variant(**json.loads(args.rollout))))
    else:
        main()
