"""The driver's per-iteration records and the one function that turns them into a metrics row (the only
thing the report, the console table and W&B read)."""

from __future__ import annotations

from dataclasses import dataclass

from common.records import PreferenceBatch, Rollout

# a row's unix time (time to reward, in metrics.jsonl and metrics.csv): a timestamp, not a measure to chart
TIMESTAMPS = ("finished_at",)


@dataclass
class RolloutStage:
    """What generation, scoring and pair building produced in one iteration."""

    rollouts: list[Rollout]
    scored: dict  # the reward actor's `ingest` summary: rewards, reward_mean, reward_std, distinct fraction
    batch: PreferenceBatch
    pair_stats: dict
    time_generate_s: float
    time_score_s: float


@dataclass
class TrainStage:
    """What training (and APO's step, and the sync) did in one iteration."""

    stats: dict  # merged per-rank trainer metrics; train_steps 0 when skipped
    apo_step_norm: float | None
    time_train_s: float
    time_sync_s: float


def iteration_row(
    it: int, selected: list[int], n_prompts: int, n_samples: int, rollout: RolloutStage, train: TrainStage, ev: dict
) -> dict:
    """One metrics row. Generation savings compare the tokens generated with what regenerating all
    `n_prompts` prompts (n_samples each, at this iteration's mean length) would have cost."""
    gen_tokens = sum(len(r.response_ids) for r in rollout.rollouts)
    mean_len = gen_tokens / max(len(rollout.rollouts), 1)
    if_all = mean_len * n_samples * n_prompts
    return {
        "iteration": it,
        "reward_mean": rollout.scored["reward_mean"],
        "reward_std": rollout.scored["reward_std"],
        **{k: ev[k] for k in ("eval_reward_mean", "win_rate_vs_initial")},
        **rollout.pair_stats,
        "training_skipped": train.stats["train_steps"] == 0,
        "generated_tokens": gen_tokens,
        "prompts_regenerated": len(selected),
        "prompts_reused": n_prompts - len(selected),
        "generated_tokens_if_all": round(if_all, 1),
        "generation_saved_fraction": 1.0 - gen_tokens / if_all if if_all else 0.0,
        "distinct_response_fraction": rollout.scored["distinct_response_fraction"],
        **train.stats,
        "apo_step_norm": train.apo_step_norm,
        "time_generate_s": rollout.time_generate_s,
        "time_score_s": rollout.time_score_s,
        "time_train_s": train.time_train_s,
        "time_sync_s": train.time_sync_s,
        "time_eval_s": ev["time_eval_s"],
    }


# per-rank metrics whose worst rank is the iteration's figure
MAX_OVER_RANKS = ("sync_logp_max_abs_diff", "time_sync_check_s")


def merge_rank_stats(per_rank: list[dict]) -> dict:
    """Average per-rank metrics weighted by the pairs each rank trained on (`MAX_OVER_RANKS`: the largest)."""
    total = sum(s["trained_pairs"] for s in per_rank)
    out: dict = {"train_steps": sum(s["steps"] for s in per_rank) // max(len(per_rank), 1), "trained_pairs": total}
    for k in MAX_OVER_RANKS:
        values = [s[k] for s in per_rank if s.get(k) is not None]
        if values:
            out[k] = max(values)
    skip = ("steps", "trained_pairs", "pair_weights", *MAX_OVER_RANKS)
    keys = {k for s in per_rank for k in s if k not in skip}
    for k in sorted(keys):
        out[k] = sum(s[k] * s["trained_pairs"] for s in per_rank if k in s) / max(total, 1)
    weights = sorted(pair for s in per_rank for pair in s.get("pair_weights", []))  # prompt order
    if weights:
        out["pair_prompts"] = [p for p, _ in weights]
        out["pair_weights"] = [w for _, w in weights]
    return out
