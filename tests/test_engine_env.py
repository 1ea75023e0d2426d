"""The rollout actor's start-up environment: tcmalloc preloaded for CPU engines when installed."""

from __future__ import annotations

import os

from common.config import RolloutConfig
from workers.rollout import ENGINE_ENV, TCMALLOC_PATHS, engine_env


def test_cpu_engine_preloads_tcmalloc_when_installed():
    env = engine_env(RolloutConfig())
    installed = [p for p in TCMALLOC_PATHS if os.path.isfile(p)]
    if installed:
        assert env["LD_PRELOAD"].split(":")[0] == installed[0]
    else:
        assert "LD_PRELOAD" not in env or env["LD_PRELOAD"] == os.environ.get("LD_PRELOAD")
    assert {k: env[k] for k in ENGINE_ENV} == ENGINE_ENV


def test_no_preload_when_switched_off_or_on_gpu():
    for cfg in (RolloutConfig(cpu_preload_tcmalloc=False), RolloutConfig(num_gpus=1)):
        assert "LD_PRELOAD" not in engine_env(cfg)
