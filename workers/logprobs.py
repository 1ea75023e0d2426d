"""Summed response log-probs of a causal LM: the quantity every loss is built from.

Only response tokens count: the prompt (with its chat template) and the padding never do. Sequences
are right-padded; an empty response gives log-prob 0 and length 0.
"""

from __future__ import annotations

import torch

from common.batching import length_sorted_batches, right_pad


def pack(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and a mask of the *target* positions that are response tokens.

    The target mask is aligned with `ids[:, 1:]`, i.e. with the next-token predictions.
    """
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    ids, attn = right_pad(seqs, pad_id)
    target = torch.zeros((len(seqs), ids.shape[1] - 1), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        target[i, len(p) - 1 : len(s) - 1] = True
    return ids, attn, target


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
    ids, attn, target = pack(prompts, responses, pad_id)
    ids, attn, target = ids.to(device), attn.to(device), target.to(device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    next_ids = ids[:, 1:]
    token_logps = logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = token_logps * target
    return token_logps.sum(-1), target.sum(-1).to(token_logps.dtype)


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
