"""Each method from the groups the reward actor builds to the loss inputs the trainer computes.

The losses alone are checked in test_losses.py; these tests check what the pipeline feeds them (which
samples, which iteration sampled them, the SFT target, the weights), on the real tiny policy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch

from common.config import AlgorithmConfig
from common.methods import get_method
from common.records import PreferenceGroup, Rollout
from rewards.actor import RewardWorker
from workers.batches import loss_inputs, micro_batches, rank_pair_weights, shard_for_rank
from workers.losses import LOSSES
from workers.weights import apo_extrapolate

WORDS = ["abc", "defg", "hij", "klmn", "opq", "rstu", "vwx", "yzab"]


@pytest.fixture(scope="module")
def tiny(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return tok, model


def prompt_data(tok) -> dict:
    texts = [f"reverse: {w}" for w in WORDS]
    refs = [w[::-1] for w in WORDS]
    ids = [
        list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"])
        for t in texts
    ]
    sft = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in refs]
    return {"texts": texts, "references": refs, "prompt_ids": ids, "sft_ids": sft}


def worker(tok, name: str, n: int = 4, selection: dict | None = None, **algo) -> RewardWorker:
    w = RewardWorker({"kind": "function", "function": "rewards.functions:reverse_reward"})
    data = prompt_data(tok)
    w.reset(data, data, {"name": name, **algo}, selection or {"mode": "all"}, n, seed=0)
    return w


def rollouts(tok, prompts, n: int, iteration: int, seed: int) -> list[Rollout]:
    """n distinct answers per prompt (a right one now and then), as token ids of the real tokenizer."""
    rng = random.Random(seed)
    out = []
    for i in prompts:
        word = WORDS[i]
        for s in range(n):
            text = (
                word[::-1]
                if rng.random() < 0.3
                else "".join(rng.sample(word, len(word))) + "xyz"[s % 3] * (s + iteration)
            )
            out.append(Rollout(i, tok(text, add_special_tokens=False)["input_ids"], text, "stop"))
    return out


def test_slic_y_ref_is_scored_with_gradient(tiny):
    tok, model = tiny
    w = worker(tok, "slic")
    w.ingest(rollouts(tok, range(len(WORDS)), 4, 1, seed=1), 1)
    batch, _ = w.batch()
    assert batch.groups and all(g.sft_ids for g in batch.groups)
    inp = loss_inputs(model, batch.groups, get_method("slic"), tok.pad_token_id)
    assert inp.sft_logps is not None and (inp.sft_logps < -0.1).all()  # log pi(y_ref|x): scored, not 0
    model.zero_grad()
    loss, _ = LOSSES["slic"](inp, AlgorithmConfig(name="slic", slic_lambda=1.0, slic_delta=1e-6))
    (-inp.sft_logps.sum()).backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # the regulariser carries gradient
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("name", ["dpo", "apo", "wdpo", "ipo", "slic", "rrhf"])
def test_regenerated_pairs_hold_only_this_iterations_samples(tiny, name):
    tok, _ = tiny
    w = worker(tok, name)
    w.ingest(rollouts(tok, range(len(WORDS)), 4, 1, seed=1), 1)
    w.batch()
    second = rollouts(tok, w.select(2), 4, 2, seed=2)
    w.ingest(second, 2)
    batch, _ = w.batch()
    fresh = {tuple(r.response_ids) for r in second}
    assert batch.groups
    for g in batch.groups:
        assert all(tuple(r) in fresh for r in g.responses), "a pair holds a sample of an older policy"


def test_pair_pool_all_keeps_the_old_samples_as_an_option(tiny):
    tok, _ = tiny
    w = worker(tok, "dpo", pair_pool="all")
    w.ingest(rollouts(tok, range(len(WORDS)), 4, 1, seed=1), 1)
    w.ingest(rollouts(tok, range(len(WORDS)), 4, 2, seed=2), 2)
    assert all(len(p) == 8 for p in w.pools)


def test_reused_prompt_keeps_its_pair_byte_identical(tiny):
    tok, _ = tiny
    w = worker(tok, "wdpo", selection={"mode": "lowest_reward", "rho": 0.5})
    w.ingest(rollouts(tok, range(len(WORDS)), 4, 1, seed=1), 1)
    before = {g.prompt_index: json.dumps(dataclasses.asdict(g)) for g in w.batch()[0].groups}
    selected = w.select(2)
    assert 0 < len(selected) < len(WORDS)
    w.ingest(rollouts(tok, selected, 4, 2, seed=2), 2)
    after = {g.prompt_index: json.dumps(dataclasses.asdict(g)) for g in w.batch()[0].groups}
    reused = [i for i in before if i not in selected]
    assert reused and all(after[i] == before[i] for i in reused)


def test_spin_pairs_ground_truth_with_this_iterations_sample_and_mixes_the_previous(tiny):
    tok, _ = tiny
    w = worker(tok, "spin", n=1)
    data = prompt_data(tok)
    first = rollouts(tok, range(len(WORDS)), 1, 1, seed=1)
    w.ingest(first, 1)
    b1, _ = w.batch()
    second = rollouts(tok, range(len(WORDS)), 1, 2, seed=2)
    w.ingest(second, 2)
    b2, _ = w.batch()
    own = {r.prompt_index: r.response_ids for r in second}
    current, previous = b2.groups[: len(WORDS)], b2.groups[len(WORDS) :]
    assert [g.responses for g in current] == [[data["sft_ids"][g.prompt_index], own[g.prompt_index]] for g in current]
    assert previous == b1.groups  # the previous iteration's pairs, as SPIN trains on D_t and D_{t-1}


def weights_by_prompt(groups, world: int, micro: int) -> dict[int, float]:
    """The pair weights the wdpo loss applies, collected per prompt over every rank and micro-batch,
    the way the trainer computes them."""
    cfg = AlgorithmConfig(name="wdpo", wdpo_beta2=2.0)
    out = {}
    for rank in range(world):
        shard = shard_for_rank(groups, rank, world)
        weights = rank_pair_weights(groups, rank, world, cfg)
        widths = [len(g.prompt_ids) + max(map(len, g.responses)) for g in shard]
        for idx in micro_batches(widths, micro, random.Random(rank)):
            logps = torch.zeros(len(idx), 2)
            inp = dataclasses.replace(
                loss_inputs_stub(shard, idx), logps=logps, ref_logps=logps.clone(), weights=weights[idx]
            )
            _, stats = LOSSES["wdpo"](inp, cfg)
            out.update(
                {shard[i].prompt_index: round(float(v), 6) for i, v in zip(idx, stats["pair_weight"], strict=True)}
            )
    return out


def loss_inputs_stub(shard, idx):
    from workers.losses import LossInputs

    groups = [shard[i] for i in idx]
    return LossInputs(
        logps=torch.zeros(len(groups), 2),
        lengths=torch.ones(len(groups), 2),
        rewards=torch.tensor([g.rewards for g in groups]),
    )


def test_wdpo_weights_do_not_depend_on_the_micro_batch_split(tiny):
    tok, _ = tiny
    w = worker(tok, "wdpo")
    w.ingest(rollouts(tok, range(len(WORDS)), 4, 1, seed=3), 1)
    groups = w.batch()[0].groups[:6]
    assert len({round(g.rewards[0] - g.rewards[1], 4) for g in groups}) > 1  # the weights differ
    reference = weights_by_prompt(groups, world=1, micro=6)
    assert weights_by_prompt(groups, world=1, micro=2) == reference
    assert weights_by_prompt(groups, world=2, micro=1) == reference
    assert sum(reference.values()) / len(reference) == pytest.approx(1.0, abs=1e-5)


def test_apo_step_keeps_tied_embeddings_tied_and_counts_them_once():
    emb = torch.ones(4, 3)
    trained = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "b": torch.zeros(2)}
    prev = {"model.embed_tokens.weight": torch.zeros(4, 3), "lm_head.weight": torch.zeros(4, 3), "b": torch.zeros(2)}
    new, norm = apo_extrapolate(trained, prev, 0.5)
    assert norm == pytest.approx((12 * 0.25) ** 0.5)  # 12 entries of step 0.5, once
    assert new["lm_head.weight"] is new["model.embed_tokens.weight"]
    assert torch.equal(new["model.embed_tokens.weight"], torch.full((4, 3), 1.5))
    assert copy.deepcopy(prev)["b"].sum() == 0


def test_apo_and_spin_refuse_a_fixed_initial_reference():
    from common.config import ConfigError
    from common.config_files import load_config

    for name, n in (("apo", 4), ("spin", 1)):
        with pytest.raises(
            ConfigError, match=f"algorithm.reference=initial: {name}'s reference is the previous iterate"
        ):
            load_config(None, [f"algorithm.name={name}", "algorithm.reference=initial", f"rollout.n_samples={n}"])


def test_spin_with_optune_reuse_trains_a_reused_pair_once(tiny):
    tok, _ = tiny
    w = worker(tok, "spin", n=1, selection={"mode": "lowest_reward", "rho": 0.5})
    w.ingest(rollouts(tok, range(len(WORDS)), 1, 1, seed=1), 1)
    w.batch()
    w.ingest(rollouts(tok, w.select(2), 1, 2, seed=2), 2)
    batch, _ = w.batch()
    keys = [json.dumps(dataclasses.asdict(g)) for g in batch.groups]
    assert len(keys) == len(set(keys))  # reused prompts' pairs are in this and last iteration's data alike


def test_reference_free_methods_refuse_a_reference_setting():
    from common.config import ConfigError
    from common.config_files import load_config

    for name in ("slic", "rrhf"):
        with pytest.raises(ConfigError, match=f"{name} uses no reference model"):
            load_config(None, [f"algorithm.name={name}", "algorithm.reference=initial"])


def with_sample_logps(model, tok, samples: list[Rollout]) -> list[Rollout]:
    """The rollouts with the log-prob the engine would report: the sampling policy's (here the tiny model)."""
    from workers.logprobs import batched_sequence_logprobs

    prompts = [prompt_data(tok)["prompt_ids"][r.prompt_index] for r in samples]
    logps, _ = batched_sequence_logprobs(model, prompts, [r.response_ids for r in samples], tok.pad_token_id)
    return [dataclasses.replace(r, sample_logprob=float(lp)) for r, lp in zip(samples, logps, strict=True)]


def test_reference_logps_come_from_the_rollout_only_for_this_iterations_own_samples(tiny):
    """OPTune reuse: a reused group's samples came from an older policy, so its reference log-probs need a
    forward pass; a regenerated group's come with the rollout and equal that forward pass."""
    from workers.logprobs import batched_sequence_logprobs
    from workers.sync_check import rollout_reference

    tok, model = tiny
    w = worker(tok, "wdpo", selection={"mode": "lowest_reward", "rho": 0.5})
    w.ingest(with_sample_logps(model, tok, rollouts(tok, range(len(WORDS)), 4, 1, seed=1)), 1)
    selected = w.select(2)
    w.ingest(with_sample_logps(model, tok, rollouts(tok, selected, 4, 2, seed=2)), 2)
    groups = w.batch()[0].groups
    known, missing = rollout_reference(groups, 2)
    regenerated = {i for i, g in enumerate(groups) if g.prompt_index in selected}
    assert regenerated and len(regenerated) < len(groups)
    assert sorted({i for i, _ in missing}) == sorted(set(range(len(groups))) - regenerated)
    forward, _ = batched_sequence_logprobs(
        model, [g.prompt_ids for g in groups for _ in g.responses], [r for g in groups for r in g.responses], 0
    )
    forward = forward.view(len(groups), 2)
    for i in regenerated:
        assert known[i].tolist() == pytest.approx(forward[i].tolist(), abs=1e-4)


def test_spin_ground_truth_is_never_taken_from_the_rollout(tiny):
    from workers.sync_check import rollout_reference

    tok, model = tiny
    w = worker(tok, "spin", n=1)
    w.ingest(with_sample_logps(model, tok, rollouts(tok, range(len(WORDS)), 1, 1, seed=1)), 1)
    w.ingest(with_sample_logps(model, tok, rollouts(tok, range(len(WORDS)), 1, 2, seed=2)), 2)
    groups = w.batch()[0].groups  # this iteration's pairs, then the previous iteration's
    _, missing = rollout_reference(groups, 2)
    current = len(WORDS)
    assert {(i, 0) for i in range(len(groups))} <= set(missing)  # y+ = the ground truth: no sampled log-prob
    assert not {(i, 1) for i in range(current)} & set(missing)  # y- sampled this iteration: from the rollout
    assert {(i, 1) for i in range(current, len(groups))} <= set(missing)  # y- of the previous iteration


def test_the_groups_left_out_for_equal_shards_rotate_over_iterations():
    """Len % world groups cannot be shared out equally (every rank runs the same number of collective
    steps). They were the same last groups every iteration (with SPIN, the mixed-in previous pairs), so those
    prompts never trained; now which ones wait rotates with the iteration, and every group trains."""
    groups = list(range(7))
    world = 3
    trained_over_time = set()
    for iteration in range(1, 8):
        shards = [shard_for_rank(groups, rank, world, iteration) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1 and sum(map(len, shards)) == 6
        assert len(set().union(*shards)) == 6  # no group twice
        trained_over_time |= set().union(*shards)
    assert trained_over_time == set(groups)
    # the weights of a rank's shard are still those of its own groups (wDPO normalises over what trains)
    pairs = [PreferenceGroup(i, [5], [[6], [7]], [float(i), 0.0]) for i in range(7)]
    cfg = AlgorithmConfig(name="wdpo", wdpo_beta2=1.0, wdpo_normalize_weights=False)
    for rank in range(world):
        shard = shard_for_rank(pairs, rank, world, 4)
        expected = torch.exp(torch.tensor([g.rewards[0] for g in shard]))
        assert torch.allclose(rank_pair_weights(pairs, rank, world, cfg, 4), expected)


def test_sync_gap_compares_only_this_iterations_samples_with_the_trainers_policy(tiny, model_path):
    """The sync's proof on the groups the reward actor builds: the trainer's log-probs of this iteration's
    samples, from the first micro-batch's forward or from the probe, equal what the sampling policy (the
    engine) reported; older samples (OPTune's reused groups, here sampled by another policy) are not compared;
    a trainer holding other weights than the engine's is seen."""
    from workers.sync_check import engine_logps, sync_gap
    from workers.trainer import TrainerWorker

    tok, model = tiny
    w = worker(tok, "wdpo", selection={"mode": "lowest_reward", "rho": 0.5})
    older = with_sample_logps(model, tok, rollouts(tok, range(len(WORDS)), 4, 1, seed=1))
    w.ingest([dataclasses.replace(r, sample_logprob=r.sample_logprob - 5.0) for r in older], 1)
    selected = w.select(2)
    w.ingest(with_sample_logps(model, tok, rollouts(tok, selected, 4, 2, seed=2)), 2)
    groups = w.batch()[0].groups
    sampled = engine_logps(groups, 2)
    regenerated = [i for i, g in enumerate(groups) if g.prompt_index in selected]
    assert not torch.isnan(sampled[regenerated]).any() and torch.isnan(sampled).sum() > 0

    inputs = loss_inputs(model, groups, get_method("wdpo"), tok.pad_token_id)
    assert sync_gap(inputs.logps, sampled, inputs.lengths) < 1e-4
    assert sync_gap(inputs.logps, torch.full_like(sampled, float("nan")), inputs.lengths) is None
    stale = copy.deepcopy(model)
    with torch.no_grad():
        stale.lm_head.weight.mul_(1.5)  # another policy than the one that sampled
    inputs = loss_inputs(stale, groups, get_method("wdpo"), tok.pad_token_id)
    assert sync_gap(inputs.logps, sampled, inputs.lengths) > 1e-2

    trainer = TrainerWorker(0, 1)
    trainer.setup(model_path, {"micro_batch_size": 3}, {"name": "wdpo"}, seed=0)
    probe = trainer._probe_sync(trainer._model(trainer.weights), groups, sampled)
    assert probe is not None and probe < 1e-4
    assert trainer._probe_sync(trainer._model(trainer.weights), groups, sampled + 0.5) > 1e-2
