"""Summed response log-probs against a plain HF forward pass, one sequence at a time, no padding."""

from __future__ import annotations

import pytest
import torch

from workers.logprobs import (
    PROBE,
    batched_sequence_logprobs,
    pack,
    pack_rows,
    packing_agrees,
    sequence_logprobs,
)


@pytest.fixture(scope="module")
def model_and_tok(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        model_path
    )


def reference_logprob(model, prompt, response) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response))


def test_matches_unpadded_forward_and_ignores_prompt_and_padding(model_and_tok):
    model, tok = model_and_tok
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"reverse: {w}"}], add_generation_prompt=True)
        for w in ["ab", "hello", "xyzzyq"]
    ]
    prompts = [list(p["input_ids"]) for p in prompts]
    responses = [tok("ba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], [], [5, 6, 7, 8, 9, 10, 11]]
    with torch.no_grad():
        lp, lens = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
    expect = [reference_logprob(model, p, r) for p, r in zip(prompts, responses, strict=True)]
    assert lp.tolist() == pytest.approx(expect, abs=1e-4)
    assert lens.tolist() == [len(r) for r in responses]
    assert lp[1] == 0.0  # empty response
    blp, blens = batched_sequence_logprobs(model, prompts, responses, tok.pad_token_id, batch_size=2)
    assert blp.tolist() == pytest.approx(expect, abs=1e-4) and blens.tolist() == lens.tolist()


def test_pack_marks_only_response_targets_from_the_shortest_prompt_on():
    b = pack([[1, 2, 3], [4, 5]], [[7, 8], [9, 9, 9]], pad_id=0)
    assert b.ids.tolist() == [[1, 2, 3, 7, 8], [4, 5, 9, 9, 9]]
    assert b.attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    b = pack([[1, 2, 3], [4]], [[7, 8], [9]], pad_id=0)
    assert b.ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]]
    assert b.attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # the logits at column start + t predict ids[:, start + 1 + t]; target says whether that is a response token
    assert b.start == 0
    assert b.target.tolist() == [[False, False, True, True], [True, False, False, False]]
    assert pack([[1, 2, 3], [4, 5, 6, 7]], [[7], [8]], pad_id=0).start == 2


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[1, 2], []], [[3], [4]], pad_id=0)


def test_lm_head_sees_only_columns_from_the_first_response_on(model_and_tok):
    """The logits of the prompt columns before the earliest response are never computed."""
    model, tok = model_and_tok
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    try:
        with torch.no_grad():
            sequence_logprobs(model, [[5] * 30, [6] * 28], [[7, 8, 9], [10]], tok.pad_token_id)
    finally:
        hook.remove()
    assert seen == [(2, 33 - 27)]  # columns 27 (the shorter prompt's last) .. 32


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no `logits_to_keep` (older or custom models)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_a_forward_without_logits_to_keep_gets_the_same_logprobs(model_and_tok):
    """Whether a forward takes `logits_to_keep` is asked once per model class (a cache keyed on anything
    coarser would pass it to this forward, a TypeError): a model without it, scored between two calls of
    one with it, gets the same log-probs through the slicing path."""
    model, tok = model_and_tok
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    with torch.no_grad():
        expect, _ = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
        plain, _ = sequence_logprobs(WithoutLogitsToKeep(model), prompts, responses, tok.pad_token_id)
        again, _ = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
    assert plain.tolist() == pytest.approx(expect.tolist(), abs=1e-5)
    assert again.tolist() == expect.tolist()


@pytest.mark.parametrize("grouped", [True, False])
def test_micro_batches_partition_every_item_once(grouped):
    import random

    from workers.batches import micro_batches

    widths = [random.Random(i).randint(5, 200) for i in range(203)]
    batches = micro_batches(widths, 8, random.Random(0), grouped)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert sorted(len(b) for b in batches) == [3] + [8] * 25  # 203 = 25 * 8 + 3
    # deterministic for a seed, different across seeds
    assert micro_batches(widths, 8, random.Random(0), grouped) == batches
    assert micro_batches(widths, 8, random.Random(1), grouped) != batches


def test_group_by_length_pads_less_and_keeps_order_random():
    import random

    from workers.batches import micro_batches

    widths = [random.Random(i).randint(5, 200) for i in range(256)]

    def padding(batches):
        return sum(max(widths[i] for i in b) * len(b) - sum(widths[i] for i in b) for b in batches)

    grouped = micro_batches(widths, 8, random.Random(0), True)
    plain = micro_batches(widths, 8, random.Random(0), False)
    assert padding(grouped) < 0.3 * padding(plain)
    firsts = [max(widths[i] for i in b) for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # not globally sorted


def test_pack_rows_shares_rows_and_restarts_positions():
    """The probe's 10-, 5- and 4-token sequences: the 5 and a 4 share a row, each from position 0; the logit
    columns kept are those predicting a response token, each owned by its sequence."""
    b = pack_rows(*PROBE, pad_id=0)
    assert b.ids.shape == (3, 10)
    assert b.ids[1].tolist() == [11, 12, 13, 21, 22, 9, 10, 19, 20, 0]
    assert b.pos[1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]  # two sequences, then the padding's own block
    owned = {(r, int(b.cols[j])): int(b.owner[r, j]) for r in range(3) for j in range(len(b.cols))}
    assert {k: v for k, v in owned.items() if v >= 0 and k[0] == 1} == {(1, 2): 2, (1, 3): 2, (1, 6): 1, (1, 7): 1}
    assert sorted(v for v in owned.values() if v >= 0) == sorted(i for i, r in enumerate(PROBE[1]) for _ in r)


def test_packed_logprobs_and_gradients_equal_padded(model_and_tok):
    """Bin-packed rows give every sequence the log-prob and the gradient it gets alone in a padded row."""
    model, tok = model_and_tok
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16], [17], [18, 19, 20, 21], [22, 23]]
    responses = [[30, 31, 32], [33, 34, 35, 36, 37], [], [38, 39], [40], [41, 42, 43, 44, 45, 46]]
    weights = torch.arange(1.0, 7.0)
    grads = {}
    for packed in (False, True):
        model.zero_grad()
        lp, lens = sequence_logprobs(model, prompts, responses, tok.pad_token_id, packed)
        (lp * weights).sum().backward()
        grads[packed] = (lp.detach(), lens, [p.grad.clone() for p in model.parameters()])
    assert grads[True][0].tolist() == pytest.approx(grads[False][0].tolist(), abs=1e-5)
    assert grads[True][1].tolist() == grads[False][1].tolist()
    assert grads[True][0][2] == 0.0  # the empty response
    for a, b in zip(grads[True][2], grads[False][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    assert len(pack_rows(prompts, responses, tok.pad_token_id).ids) < len(prompts)  # it did pack


class IgnoresPositionIds(torch.nn.Module):
    """A causal LM that takes position ids and drops them (a custom model that would silently attend
    across the sequences of a packed row)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, logits_to_keep=logits_to_keep
        )


def test_packing_check_refuses_a_model_that_attends_across_sequences(model_and_tok):
    model, tok = model_and_tok
    assert packing_agrees(model, tok.pad_token_id)
    assert not packing_agrees(IgnoresPositionIds(model), tok.pad_token_id)
    model.train()
    assert packing_agrees(model, tok.pad_token_id) and model.training  # the mode it found, restored
    model.eval()
