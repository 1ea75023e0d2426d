"""Summed response log-probs of a causal LM: the quantity every loss is built from.

Only response tokens count: the prompt (with its chat template) and the padding never do. Sequences
are right-padded, and the model computes logits only from the column of the earliest response on
(`logits_to_keep`): no LM head, log-softmax or their gradients for the prompt columns before it, whose
logits no loss reads (with a chat template, most of a row). An empty response gives log-prob 0 and
length 0.

Packed (`packed=True`, `train.packing`): the sequences are bin-packed into rows as wide as the longest,
each restarting its position ids and no attention mask given, so HF's masking builds a block-diagonal
causal mask from the position ids (attention stays inside each sequence) and the padding between
sequences is gone; logits only at the columns that predict a response token. `packing_agrees` checks a
model class honours this before the trainer relies on it.
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


def _joined(prompts: list[list[int]], responses: list[list[int]]) -> list[list[int]]:
    """Each prompt + response; a response's first token is predicted from its prompt's last column."""
    if any(not p for p in prompts):
        raise ValueError("an empty prompt has no column to predict its response's first token from")
    return [p + r for p, r in zip(prompts, responses, strict=True)]


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Packed:
    """The rows right-padded to the longest prompt + response (no more padding than that)."""
    seqs = _joined(prompts, responses)
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


def _logits_at(model: torch.nn.Module, kwargs: dict, keep: int | torch.Tensor) -> torch.Tensor:
    """The model's logits at the kept columns only: the last `keep` (an int) or those indexed (a tensor);
    HF's `logits_to_keep` where the forward takes it, else every column's logits, then sliced."""
    if _keeps_logits(model):
        return model(**kwargs, logits_to_keep=keep).logits
    logits = model(**kwargs).logits
    return logits[:, -keep:] if isinstance(keep, int) else logits[:, keep]


def _token_logps(logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """log pi(next token) at each kept column, in fp32."""
    logits = logits.float()
    return logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(y_t | x, y_<t) over response tokens, response length) for each sequence.

    Gradients flow when called outside `torch.no_grad()`. One forward pass for the whole list, so a
    caller that concatenates chosen and rejected responses gets them in a single pass. `packed`: in
    bin-packed rows instead of one padded row each (check the model with `packing_agrees` first).
    """
    if packed:
        return packed_sequence_logprobs(model, prompts, responses, pad_id)
    device = next(model.parameters()).device
    b = pack(prompts, responses, pad_id).to(device)
    kwargs = {"input_ids": b.ids, "attention_mask": b.attn, "use_cache": False}
    logits = _logits_at(model, kwargs, b.ids.shape[1] - b.start)  # columns start .. end
    # the last column predicts past the end
    token_logps = _token_logps(logits[:, :-1], b.ids[:, b.start + 1 :]) * b.target
    return token_logps.sum(-1), b.target.sum(-1).to(token_logps.dtype)


def bin_pack(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` in rows whose lengths sum to at most `width`."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((k for k, f in enumerate(fill) if f + lengths[i] <= width), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        fill[row] += lengths[i]
    return rows


@dataclass
class PackedRows:
    """Sequences bin-packed into rows. `pos` restarts at 0 where each sequence (and a row's padding tail)
    begins; `cols` are the logit columns that predict some row's response token, and `owner[r, j]` the
    sequence whose response token the logit at (row r, column cols[j]) predicts (-1: none)."""

    ids: torch.Tensor
    pos: torch.Tensor
    cols: torch.Tensor
    owner: torch.Tensor

    def to(self, device: torch.device) -> PackedRows:
        return PackedRows(self.ids.to(device), self.pos.to(device), self.cols.to(device), self.owner.to(device))


def pack_rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedRows:
    """The sequences bin-packed into rows as wide as the longest (see `PackedRows`)."""
    seqs = _joined(prompts, responses)
    width = max(map(len, seqs))
    rows = bin_pack([len(s) for s in seqs], width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    owner_full = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            n, first = len(seqs[i]), o + len(prompts[i]) - 1  # the logit column of the response's first token
            ids[r, o : o + n] = torch.tensor(seqs[i], dtype=torch.long)
            pos[r, o : o + n] = torch.arange(n)
            owner_full[r, first : first + len(responses[i])] = i
            o += n
        pos[r, o:] = torch.arange(width - o)  # the padding tail: a block of its own
    cols = (owner_full >= 0).any(0).nonzero().squeeze(-1)
    return PackedRows(ids, pos, cols, owner_full[:, cols])


def packed_sequence_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` over bin-packed rows (see the module docstring)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([float(len(r)) for r in responses], device=device)
    b = pack_rows(prompts, responses, pad_id).to(device)
    if b.cols.numel() == 0:  # every response empty
        return lengths * 0, lengths
    kwargs = {"input_ids": b.ids, "position_ids": b.pos, "use_cache": False}
    token_logps = _token_logps(_logits_at(model, kwargs, b.cols), b.ids[:, b.cols + 1])
    scored = b.owner >= 0
    sums = token_logps.new_zeros(len(responses)).index_add(0, b.owner[scored], token_logps[scored])
    return sums, lengths


PROBE = (
    [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13], [14]],
    [[15, 16, 17, 18], [19, 20], [21, 22], [23, 24, 25]],
)


@torch.no_grad()
def packing_agrees(model: torch.nn.Module, pad_id: int) -> bool:
    """Whether `model` gives packed rows the log-probs it gives padded ones, to 1e-3 in fp32 (0.1 in half
    precision, far below what attending across sequences moves). A model that ignores packed position ids
    would attend across the sequences of a row. Probe sequences of 10, 4, 5 and 4 tokens: the
    5 and a 4 share a row."""
    prompts, responses = PROBE
    was_training = model.training
    model.eval()
    try:
        packed, _ = packed_sequence_logprobs(model, prompts, responses, pad_id)
        padded, _ = sequence_logprobs(model, prompts, responses, pad_id)
    finally:
        model.train(was_training)
    atol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
    return bool(torch.allclose(packed.float(), padded.float(), atol=atol, rtol=0))


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
