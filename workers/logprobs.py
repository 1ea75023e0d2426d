"""Summed response log-probs of a causal LM: the quantity every loss is built from.

Only response tokens count: the prompt (with its chat template) and the padding never do. Each row is laid
out as `[left padding, prompt, response, right padding]`, so every response starts at the same column and
the model computes logits only from there on (`logits_to_keep`): no LM head, log-softmax or their
gradients for prompt tokens, whose logits no loss uses. Position ids count real tokens only, so the left
padding changes nothing the model computes. An empty response gives log-prob 0 and length 0.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from common.batching import length_sorted_batches


@dataclass
class Packed:
    """A batch of (prompt, response) rows with the responses aligned at one column.

    `target[i, t]` says whether `ids[i, start + 1 + t]` is a response token, i.e. whether the logits at
    column `start + t` score one: the next-token predictions from column `start` (the last prompt column)
    to the second-to-last column."""

    ids: torch.Tensor
    attn: torch.Tensor
    positions: torch.Tensor
    target: torch.Tensor
    start: int

    def to(self, device: torch.device) -> Packed:
        return Packed(
            self.ids.to(device), self.attn.to(device), self.positions.to(device), self.target.to(device), self.start
        )


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Packed:
    """Prompts left-padded and responses right-padded, so all responses start at column `max prompt length`."""
    width_p = max(len(p) for p in prompts)
    width_r = max(len(r) for r in responses)
    ids = torch.full((len(prompts), width_p + width_r), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    target = torch.zeros((len(prompts), width_r), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, width_p - len(p) : width_p + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, width_p - len(p) : width_p + len(r)] = 1
        target[i, : len(r)] = True
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return Packed(ids, attn, positions, target, width_p - 1)


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (HF causal LMs do; a DeepSpeed engine passes it on)."""
    forward = getattr(model, "module", model).forward
    return "logits_to_keep" in inspect.signature(forward).parameters


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
    kwargs = {"input_ids": b.ids, "attention_mask": b.attn, "position_ids": b.positions, "use_cache": False}
    kept = b.ids.shape[1] - b.start  # columns start .. end
    if _keeps_logits(model):
        logits = model(**kwargs, logits_to_keep=kept).logits
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
