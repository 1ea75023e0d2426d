"""Which groups each trainer rank trains, in which micro-batches, and the loss inputs of one micro-batch.

Every rank must run the same number of collective steps, so the ranks take equal strided shards of the
groups; what that leaves over rotates with the iteration (`trained_order`)."""

from __future__ import annotations

import random
from typing import TypeVar

import torch

from common.config import AlgorithmConfig
from common.methods import Method
from common.records import PreferenceGroup
from workers.logprobs import sequence_logprobs
from workers.losses import LossInputs, wdpo_weights

T = TypeVar("T")


def trained_order(n: int, world: int, rotate: int = 0) -> list[int]:
    """The indices of the n groups that train this iteration, in the order the ranks stride over them. Every
    rank must run the same number of collective steps, so n % world groups wait; which ones rotates with
    `rotate` (the iteration), so no group waits every time (with SPIN, the mixed-in previous pairs were the
    last ones, and never trained)."""
    if n == 0:
        return []
    start = (rotate * (n % world)) % n
    order = [*range(start, n), *range(start)]
    return order[: n - n % world]


def shard_for_rank(groups: list[T], rank: int, world: int, rotate: int = 0) -> list[T]:
    """Rank `rank`'s equal-sized strided shard of the groups that train (`trained_order`)."""
    return [groups[i] for i in trained_order(len(groups), world, rotate)[rank::world]]


def flatten(groups: list[PreferenceGroup]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt, response) token lists of every response of every group, group by group."""
    return [g.prompt_ids for g in groups for _ in g.responses], [r for g in groups for r in g.responses]


def rank_pair_weights(
    groups: list[PreferenceGroup], rank: int, world: int, cfg: AlgorithmConfig, rotate: int = 0
) -> torch.Tensor:
    """OPTune's wDPO weights of this rank's shard (`shard_for_rank` with the same `rotate`), normalised over
    the pairs that all ranks train on together, so a pair's weight does not depend on the rank or micro-batch
    it lands in."""
    order = trained_order(len(groups), world, rotate)
    gaps = torch.tensor([groups[i].rewards[0] - groups[i].rewards[-1] for i in order], dtype=torch.float32)
    return wdpo_weights(gaps, cfg)[rank::world]


def loss_inputs(
    model,
    groups: list[PreferenceGroup],
    method: Method,
    pad_id: int,
    ref_logps: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    packed: bool = False,
) -> LossInputs:
    """The loss inputs of one micro-batch: policy log-probs of every group's responses (with gradient),
    their lengths and rewards, the given reference log-probs and pair weights, and, for methods that score
    the dataset's target (SLiC-HF's y_ref), log pi(y_ref | x)."""
    k = len(groups[0].responses)
    logps, lengths = sequence_logprobs(model, *flatten(groups), pad_id, packed)
    device = logps.device
    inputs = LossInputs(
        logps=logps.view(len(groups), k),
        lengths=lengths.view(len(groups), k),
        rewards=torch.tensor([g.rewards for g in groups], dtype=torch.float32, device=device),
        ref_logps=ref_logps.to(device) if ref_logps is not None else None,
        weights=weights.to(device) if weights is not None else None,
    )
    if method.scores_sft_target:
        missing = [g.prompt_index for g in groups if not g.sft_ids]
        if missing:
            raise ValueError(f"{method.name} needs each prompt's SFT target; prompts {missing[:5]} have none")
        inputs.sft_logps, _ = sequence_logprobs(
            model, [g.prompt_ids for g in groups], [g.sft_ids for g in groups], pad_id, packed
        )
    return inputs


def steps_per_rank(n_groups: int, world: int, micro_batch_size: int, epochs: int) -> int:
    """Optimizer steps each rank runs on `n_groups` groups (for the driver's progress bar)."""
    shard = len(shard_for_rank(list(range(n_groups)), 0, world))
    return epochs * -(-shard // micro_batch_size)


def micro_batches(widths: list[int], size: int, rng: random.Random, group_by_length: bool = True) -> list[list[int]]:
    """One epoch's micro-batches of indices into `widths` (each item's padded width), in random order.

    With `group_by_length` (HF's LengthGroupedSampler idea) each shuffled window of 8 micro-batches is
    sorted by width before it is cut, so a micro-batch holds similar lengths and pads little; the
    micro-batches are then shuffled, so the order stays random."""
    order = list(range(len(widths)))
    rng.shuffle(order)
    if group_by_length:
        window = size * 8
        order = [
            i
            for s in range(0, len(order), window)
            for i in sorted(order[s : s + window], key=lambda i: widths[i], reverse=True)
        ]
    batches = [order[s : s + size] for s in range(0, len(order), size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches
