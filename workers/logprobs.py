"""Summed response log-probs of a causal LM: the quantity every loss is built from.

Only response tokens count: the prompt (with its chat template) and the padding never do. Sequences
are right-padded, and the model computes logits only from the column of the earliest response on
(`logits_to_keep`): no LM head, log-softmax or their gradients for the prompt columns before it, whose
logits no loss reads (with a chat template, most of a row). An empty response gives log-prob 0 and
length 0.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from common.batching import length_sorted_batches, right_pad


@dataclass
class Packed:
    """Right-padded rows of prompt + response, and which next-token predictions score a response token.

    The logits at column `start + t` predict `ids[:, start + 1 + t]`; `target[i, t]` says whether that token
    is one of row i's response tokens. `start` is the last prompt column of the shortest prompt: no
    response token is predicted before it."""

    ids: torch.Tensor
    attn: torch.Tensor
    target: torch.Tensor
    start: int

    def to(self, device: torch.device) -> Packed:
        return Packed(self.ids.to(device), self.attn.to(device), self.target.to(device), self.start)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Packed:
    """The rows right-padded to the longest prompt + response (no more padding than that)."""
    if any(not p for p in prompts):
        raise ValueError("an empty prompt has no column to predict its response's first token from")
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    ids, attn = right_pad(seqs, pad_id)
    start = min(len(p) for p in prompts) - 1
    target = torch.zeros((len(seqs), ids.shape[1] - 1 - start), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        target[i, len(p) - 1 - start : len(s) - 1 - start] = True
    return Packed(ids, attn, target, start)


@functools.cache
def _forward_keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (HF causal LMs do; a DeepSpeed engine passes it on).
    Asked once per model class, not at every micro-batch."""
    return _forward_keeps_logits(type(getattr(model, "module", model)))


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(y_t | x, y_<t) over response tokens, response length) for each sequence.

    Gradients flow when called outside `torch.no_grad()`. One forward pass for the whole list, so a
    caller that concatenates chosen and rejected responses gets them in a single pass.
    """
    device = next(model.parameters()).device
    b = pack(prompts, responses, pad_id).to(device)
    kwargs = {"input_ids": b.ids, "attention_mask": b.attn, "use_cache": False}
    if _keeps_logits(model):
        logits = model(**kwargs, logits_to_keep=b.ids.shape[1] - b.start).logits  # columns start .. end
    else:
        logits = model(**kwargs).logits[:, b.start :]
    logits = logits[:, :-1].float()  # the last column predicts past the end
    next_ids = b.ids[:, b.start + 1 :]
    token_logps = logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = token_logps * b.target
    return token_logps.sum(-1), b.target.sum(-1).to(token_logps.dtype)


@torch.no_grad()
def batched_sequence_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad `sequence_logprobs` in length-sorted batches (little padding), returned in input order."""
    logps = torch.zeros(len(prompts))
    lens = torch.zeros(len(prompts))
    for idx in length_sorted_batches([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], batch_size):
        lp, ln = sequence_logprobs(model, [prompts[i] for i in idx], [responses[i] for i in idx], pad_id)
        logps[idx] = lp.cpu()
        lens[idx] = ln.cpu()
    return logps, lens
