"""Reward scorers: one interface, several kinds (`reward.kind`).

A scorer is called as `scorer(prompts, responses, references) -> list[float]` (see
`rewards.functions` for the meaning of each argument) and must return one finite score per response,
in order. `check_scores` enforces that with a message naming the reward and the offending sample.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Callable

from common.config import RewardConfig
from common.errors import RewardError

ScoreFn = Callable[[list[str], list[str], list[str | None]], list[float]]


def load_function(spec: str) -> ScoreFn:
    """`package.module:function`, or `path/to/file.py:function` for a function in a local file."""
    if ":" not in spec:
        raise RewardError(f"reward.function '{spec}' must look like 'package.module:function' or 'file.py:function'")
    module_name, fn_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            file_spec = importlib.util.spec_from_file_location(f"onalign_reward_{abs(hash(module_name))}", module_name)
            if file_spec is None or not os.path.isfile(module_name):
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        hint = (
            f"; for a function in a local file, give its path: reward.function={module_name}.py:{fn_name}"
            if not module_name.endswith(".py")
            else ""
        )
        raise RewardError(f"reward.function '{spec}': cannot import module '{module_name}' ({e}){hint}") from None
    except SyntaxError as e:
        raise RewardError(
            f"reward.function '{spec}': {e.filename}, line {e.lineno}: {e.msg}; fix the reward file"
        ) from None
    except Exception as e:  # the module's own code failed while it was imported (a missing file, a bad import)
        text = " ".join(str(e).split())[:300]
        raise RewardError(
            f"reward.function '{spec}': importing the module '{module_name}' failed ({type(e).__name__}: {text}); "
            "the error is in the reward module's top-level code: fix it there"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward.function '{spec}': module '{module_name}' has no function '{fn_name}'")
    return fn


def check_scores(name: str, scores: object, prompts: list[str], responses: list[str]) -> list[float]:
    """One finite float per response, or a RewardError that names the reward and the sample."""
    try:
        values = [float(s) for s in scores]  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward '{name}' returned {type(scores).__name__}, not a list of numbers ({e})") from None
    if len(values) != len(responses):
        raise RewardError(f"reward '{name}' returned {len(values)} scores for {len(responses)} responses")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise RewardError(
                f"reward '{name}' returned {v} for sample {i} (prompt {prompts[i]!r}, response {responses[i]!r}); "
                "rewards must be finite numbers: fix the reward function or model"
            )
    return values


def make_scorer(cfg: RewardConfig) -> tuple[str, ScoreFn]:
    """(display name, scoring callable) for the configured reward kind."""
    if cfg.kind == "function":
        return cfg.function, load_function(cfg.function)
    if cfg.kind == "model":
        from rewards.model import ModelScorer

        return f"model:{cfg.model_path}", ModelScorer(cfg)
    from rewards.remote import RemoteScorer

    return f"remote:{cfg.url}", RemoteScorer(cfg)


def score(name: str, fn: ScoreFn, prompts: list[str], responses: list[str], refs: list[str | None]) -> list[float]:
    """Call the scorer and validate what comes back."""
    if not responses:
        return []
    try:
        raw = fn(prompts, responses, refs)
    except RewardError:
        raise
    except Exception as e:  # a user's reward function: report it, with what it was scoring
        raise RewardError(
            f"reward '{name}' raised {type(e).__name__}: {e} (while scoring {len(responses)} responses, "
            f"first prompt {prompts[0]!r}); fix the reward function"
        ) from None
    return check_scores(name, raw, prompts, responses)
