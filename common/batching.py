"""Batching token sequences for a forward pass: right-padding, and length-sorted batches (little padding).

Shared by the trainer's log-probs (workers/logprobs.py) and the reward model (rewards/model.py)."""

from __future__ import annotations

import torch


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `seqs` right-padded with `pad_id` to the longest one."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths` in batches of `batch_size`, shortest first, so each batch pads little.
    The caller puts each batch's results back at these indices, restoring input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
