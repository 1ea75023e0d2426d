"""`python tests/colocated_run.py OUT_DIR [key=value ...]`: the CPU demo with `placement: colocate` (one trainer
rank and one engine in one placement-group bundle), in a Ray of its own. Its last line is JSON: the metrics
rows and the engine's lifecycle (`RolloutWorker.lifecycle`), read before the actors go."""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    import ray

    from common.config_files import load_config
    from pipeline.driver import init_ray, run_with_workers, start_workers
    from pipeline.preflight import prepare

    out, *overrides = sys.argv[1:]
    cfg = load_config(
        "configs/demo-cpu.yaml", ["placement=colocate", "train.num_workers=1", f"output_dir={out}", *overrides]
    )
    prep = prepare(cfg)
    init_ray(cfg)
    workers = start_workers(cfg, prep.model_path)
    try:
        rows = run_with_workers(prep, workers)
        events = ray.get(workers.rollouts[0].lifecycle.remote())
    finally:
        workers.shutdown()
        ray.shutdown()
    print(json.dumps({"rows": rows, "events": events}))
