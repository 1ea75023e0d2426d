"""Group builders: from one prompt's scored samples to its training group (a pair, or k ranked responses).

Each builder registers under its name in `GROUP_BUILDERS` where it is defined (`@GROUP_BUILDERS.register`); each
method's entry in `common.methods` names one (`Method.pairs`). The samples passed in are the prompt's pool: this iteration's samples by default (`algorithm.pair_pool: current`, on-policy as iterative DPO,
APO, SPIN and OPTune train), or every sample so far (`all`). Every group carries the prompt's SFT target
(`sft_ids`, None without one) so that methods that score it (SLiC-HF's y_ref) receive it.

Ties are broken deterministically by position in the pool (earlier wins), so the same pool always
gives the same group.
"""

from __future__ import annotations

from collections.abc import Callable

from common.records import PreferenceGroup, Rollout
from common.registry import Registry

GroupBuilder = Callable[[int, list[int], list[Rollout], list[int] | None, int], PreferenceGroup | None]

# Builder name (common.methods.Method.pairs) -> function, each registered where it is defined.
GROUP_BUILDERS: Registry[GroupBuilder] = Registry("group builder")


def _group(
    prompt_index: int, prompt_ids: list[int], responses: list[Rollout | list[int]], sft_ids: list[int] | None
) -> PreferenceGroup:
    """A group of `responses`, best first: sampled ones (Rollouts) carry their reward, the engine's log-prob
    and the iteration that sampled them; a dataset target (token ids: SPIN's y+) has reward 1 and neither."""
    sampled = [r if isinstance(r, Rollout) else None for r in responses]
    return PreferenceGroup(
        prompt_index,
        prompt_ids,
        [r.response_ids if r is not None else ids for r, ids in zip(sampled, responses, strict=True)],
        [(r.reward or 0.0) if r is not None else 1.0 for r in sampled],
        sft_ids,
        sample_logps=[r.sample_logprob if r is not None else None for r in sampled],
        sampled_at=[r.iteration if r is not None else None for r in sampled],
    )


def _ranked(pool: list[Rollout]) -> list[Rollout]:
    """Pool sorted by reward, best first; equal rewards keep pool order (stable)."""
    return sorted(pool, key=lambda r: -float(r.reward))


@GROUP_BUILDERS.register("best_worst")
def best_worst(
    prompt_index: int, prompt_ids: list[int], pool: list[Rollout], sft_ids: list[int] | None, k: int
) -> PreferenceGroup | None:
    """chosen = highest reward, rejected = lowest; None when every response ties."""
    if len(pool) < 2:
        return None
    ranked = _ranked(pool)
    best, worst = ranked[0], ranked[-1]
    if best.reward == worst.reward:
        return None
    return _group(prompt_index, prompt_ids, [best, worst], sft_ids)


@GROUP_BUILDERS.register("ranked_list")
def ranked_list(
    prompt_index: int, prompt_ids: list[int], pool: list[Rollout], sft_ids: list[int] | None, k: int
) -> PreferenceGroup | None:
    """RRHF's k responses (the newest k of the pool), ranked by reward; None when all tie."""
    latest = pool[-k:]
    if len(latest) < 2 or len({r.reward for r in latest}) == 1:
        return None
    return _group(prompt_index, prompt_ids, _ranked(latest), sft_ids)


@GROUP_BUILDERS.register("ground_truth")
def ground_truth(
    prompt_index: int, prompt_ids: list[int], pool: list[Rollout], sft_ids: list[int] | None, k: int
) -> PreferenceGroup | None:
    """SPIN: chosen = the dataset's ground-truth response, rejected = the policy's newest own generation."""
    if sft_ids is None or not pool:
        return None
    return _group(prompt_index, prompt_ids, [sft_ids, pool[-1]], sft_ids)
