"""Where P3's weight-sync time goes (CPU path): the engine's load of the new weights, profiled in-process.

    .venv/bin/python bench/sync_profile.py [--model bench|smollm2]

The CPU sync is: rank 0 puts the state dict into Ray's object store (one copy), the engine maps it
(zero-copy numpy views) and loads it through vLLM's weight-transfer API (`update_weights`, layerwise
reload). This script times each part in one process against the baseline of P3 (`copy_` of every
tensor into preallocated ones) and, with cProfile, splits the engine's load into vLLM's parameter copies
and its re-processing after loading (on CPU: building a oneDNN matmul handle, i.e. repacking, per linear
layer). A lever can only remove what is not inherent to the engine: the repack must follow every write.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import pstats

from benchkit import best_of, cumulative, machine, write_section
from throughput import bench_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["bench", "smollm2"], default="bench")
    args = ap.parse_args()
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from common.config import RolloutConfig
    from workers.cpu_transfer import to_wire
    from workers.rollout import ENGINE_ENV, RolloutWorker

    os.environ.update(ENGINE_ENV)
    path, described, _ = bench_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # sent once, as the pipeline does
    nbytes = sum(v.numel() * v.element_size() for v in weights.values())
    dst = {k: torch.empty_like(v) for k, v in weights.items()}
    copy_s = best_of(lambda: [dst[k].copy_(v) for k, v in weights.items()])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=2 << 30)
    put_s = best_of(lambda: ray.put(to_wire(weights)))
    engine = RolloutWorker(path, RolloutConfig(kv_cache_mb=256, max_model_len=512))
    wire = to_wire(weights)
    load_s = best_of(lambda: engine.load_weights(wire))
    prof = cProfile.Profile()
    prof.enable()
    engine.load_weights(wire)
    prof.disable()
    stats = pstats.Stats(prof)
    total = cumulative(stats, "load_weights", suffix=True) or load_s
    onednn = max((row[2] for key, row in stats.stats.items() if "create_onednn_mm" in key[2]), default=0.0)
    params = cumulative(stats, "_load_param", suffix=True)
    ray.shutdown()
    rate = lambda s: nbytes / s / 1e9  # noqa: E731
    rows = [
        ("in-process copy_ into preallocated tensors (P3's baseline)", copy_s),
        ("rank 0: to_wire + ray.put into the object store", put_s),
        ("engine: load_weights (start, update in 256 MB buckets, finish), in-process", load_s),
        ("  of which (profiled) vLLM's weight loaders copying into parameters", params * load_s / total),
        (
            "  of which (profiled) building oneDNN matmul handles (repacking for the CPU kernels)",
            onednn * load_s / total,
        ),
    ]
    lines = ["| part | ms | GB/s | vs copy_ |", "|---|---|---|---|"]
    lines += [f"| {name} | {s * 1e3:.1f} | {rate(s):.2f} | {copy_s / s:.2f}x |" for name, s in rows]
    floor = copy_s / (put_s + load_s)
    command = (
        "`.venv/bin/python bench/sync_profile.py" + ("" if args.model == "bench" else f" --model {args.model}") + "`"
    )
    body = (
        f"Command: {command} ({datetime.date.today()}, {machine()}).\n\n"
        f"{described}, {nbytes / 1e6:.0f} MB sent (fp32), best of 5; the profiled split is scaled to the timed "
        "load.\n\n" + "\n".join(lines) + f"\n\nput + load alone, with no Ray call overhead: {floor:.2f}x of copy_."
    )
    title = (
        "Where the sync time goes (bench/sync_profile.py" + ("" if args.model == "bench" else " --model smollm2") + ")"
    )
    write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
