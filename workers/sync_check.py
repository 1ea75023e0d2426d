"""The weight sync's proof, each iteration: the trainer's log-probs of the responses the engine sampled in
this iteration against the log-probs the engine returned for them (the engine sampled from the policy the
trainers hold at the iteration's start, so the two agree up to numerics unless a sync was lost)."""

from __future__ import annotations

import torch

from common.records import PreferenceGroup


def engine_logps(groups: list[PreferenceGroup], iteration: int) -> torch.Tensor:
    """[groups, K]: the engine's log pi(y|x) of each response it sampled in `iteration`, NaN for the rest
    (older samples: OPTune's reused groups, SPIN's mixed-in pairs, `pair_pool: all`; dataset targets). The
    engine sampled them from the policy the trainers hold at the iteration's start."""
    out = torch.full((len(groups), len(groups[0].responses)), float("nan"))
    for i, g in enumerate(groups):
        for k in range(len(g.responses)):
            logp = g.sample_logps[k] if g.sample_logps else None
            at = g.sampled_at[k] if g.sampled_at else None
            if logp is not None and at == iteration:
                out[i, k] = logp
    return out


def rollout_reference(groups: list[PreferenceGroup], iteration: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Reference log-probs [groups, K] that the rollout already gave, and the (group, response) slots it did
    not: a response's sampled log-prob is its reference log-prob when the policy that sampled it is the
    reference, i.e. it was sampled in this `iteration` (reference = the iteration's starting policy). The
    missing slots (see `engine_logps`) need a forward pass."""
    known = engine_logps(groups, iteration)
    missing = [(int(i), int(k)) for i, k in torch.isnan(known).nonzero().tolist()]
    return known.nan_to_num(0.0), missing


def sync_gap(trainer_logps: torch.Tensor, engine: torch.Tensor, lengths: torch.Tensor) -> float | None:
    """The sync's proof: max over the responses the engine sampled (`engine` not NaN) of
    |log pi_trainer(y|x) - log pi_engine(y|x)| / |y|, the per-token gap between the trainer's policy and
    the weights the engine sampled with; None when there is no such response."""
    fresh = ~torch.isnan(engine)
    if not fresh.any():
        return None
    gap = (trainer_logps.detach().float().cpu() - engine).abs() / lengths.float().cpu().clamp(min=1)
    return float(gap[fresh].max())


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward of `model` is random (dropout layers, or attention dropout)."""
    if getattr(model.config, "attention_dropout", 0.0):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
