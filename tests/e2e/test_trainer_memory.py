"""The trainer's memory: the copies of the policy it holds (and that training never writes the ones it
keeps), and what its heap keeps of the memory it frees."""

from __future__ import annotations

import pytest
import torch


def _train_rank(rank: int, model_path: str, stage: int, port: int, out: str) -> None:
    import gc

    torch.set_num_threads(1)
    from deepspeed.runtime.engine import DeepSpeedEngine

    from common.records import PreferenceBatch, PreferenceGroup
    from workers.trainer import TrainerWorker

    t = TrainerWorker(0, 1)
    t.connect("127.0.0.1", port)
    t.setup(
        model_path, {"zero_stage": stage, "micro_batch_size": 2, "lr": 1e-2}, {"name": "dpo", "reference": "initial"}, 0
    )
    before = {k: v.clone() for k, v in t.weights.items()}
    groups = [PreferenceGroup(i, [5, 6, 7 + i], [[8, 9, 10], [11, 12]], [1.0, 0.0]) for i in range(4)]
    gc.disable()  # only the trainer's own collection runs: what it leaves alive is what it left
    t.train(PreferenceBatch(groups), 1)
    engines = sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())
    modules = sum(type(o).__name__.endswith("ForCausalLM") for o in gc.get_objects())
    gc.enable()
    torch.save(
        {"before": before, "initial": t.initial, "after": t.weights, "engines": engines, "modules": modules}, out
    )


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def trained(request, model_path, tmp_path_factory):
    """One DPO iteration with `reference: initial` in a spawned DeepSpeed rank, and what it left behind."""
    from ranks import spawn_ranks

    out = str(tmp_path_factory.mktemp("trained") / "weights.pt")
    spawn_ranks(_train_rank, lambda port: (model_path, request.param, port, out), nprocs=1)
    return torch.load(out)


@pytest.mark.slow
def test_training_never_writes_the_weights_it_started_from(trained):
    """The DeepSpeed module is built over the held tensors (no copy): DeepSpeed must copy or partition them
    before its first update, so the fixed reference (`reference: initial`) keeps the weights it started from."""
    assert all(torch.equal(trained["initial"][k], v) for k, v in trained["before"].items())
    assert any(not torch.equal(trained["after"][k], v) for k, v in trained["before"].items())


@pytest.mark.slow
def test_an_iteration_frees_its_engine_before_it_returns(trained):
    """The engine, its module and DeepSpeed's flat copies of the weights form reference cycles: collected
    while `train` still held them, they lived on until Python's cyclic collector happened to run, so the
    next iteration's peak held two engines' buffers (a 2-rank group on the 13M model: 893 MiB a rank)."""
    assert trained["engines"] == 0
    assert trained["modules"] == 0


def _train_with(rank: int, model_path: str, settings: dict, port: int, out: str) -> None:
    """One DPO iteration in a spawned DeepSpeed rank with `settings` in the train section: the weights it
    reaches, its loss, and how often the first decoder layer ran in training mode."""
    torch.set_num_threads(1)
    from common.records import PreferenceBatch, PreferenceGroup
    from workers.trainer import TrainerWorker

    t = TrainerWorker(0, 1)
    t.connect("127.0.0.1", port)
    t.setup(model_path, {"micro_batch_size": 2, "lr": 1e-2, **settings}, {"name": "dpo"}, 0)
    build, layer_calls = t._model, []

    def counted(weights):  # a spy: how often the first decoder layer trains (twice a step when checkpointed)
        model = build(weights)
        model.model.layers[0].register_forward_pre_hook(lambda m, _: layer_calls.append(1) if m.training else None)
        return model

    t._model = counted
    from workers import logprobs

    packed_calls, packed_forward = [], logprobs.packed_sequence_logprobs

    def spied(*args, **kwargs):  # a spy: forwards in bin-packed rows (the packing check's two included)
        packed_calls.append(1)
        return packed_forward(*args, **kwargs)

    logprobs.packed_sequence_logprobs = spied
    groups = [  # prompts and responses of several lengths, so that packing shares rows
        PreferenceGroup(i, [5, 6, 7 + i][: 1 + i % 3], [[8, 9, 10][: 1 + i % 3], [11, 12, 13, 14][i % 2 :]], [1.0, 0.0])
        for i in range(4)
    ]
    res = t.train(PreferenceBatch(groups), 1)
    torch.save(
        {
            "after": t.weights,
            "layer_calls": len(layer_calls),
            "packed_calls": len(packed_calls),
            "steps": res["steps"],
            "loss": res["loss"],
        },
        out,
    )


def _trained_with(model_path: str, tmp_path, name: str, settings: dict) -> dict:
    from ranks import spawn_ranks

    out = str(tmp_path / f"{name}.pt")
    spawn_ranks(_train_with, lambda port: (model_path, settings, port, out), nprocs=1)
    return torch.load(out)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_and_trains_to_the_same_weights(model_path, tmp_path):
    """`train.gradient_checkpointing` (the memory setting) keeps only each layer's input through DeepSpeed's
    forward and recomputes the layer in the backward pass: the same weights, each layer run twice a step."""
    res = {on: _trained_with(model_path, tmp_path, f"gc-{on}", {"gradient_checkpointing": on}) for on in (False, True)}
    steps = res[True]["steps"]
    assert steps == res[False]["steps"] > 0
    assert res[False]["layer_calls"] == steps
    assert res[True]["layer_calls"] == 2 * steps
    for k, v in res[False]["after"].items():
        torch.testing.assert_close(res[True]["after"][k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_packing_trains_to_the_same_weights(model_path, tmp_path):
    """`train.packing` through DeepSpeed: the micro-batches' sequences bin-packed into shared rows train the
    model as padded rows do: the same loss at every step to 1e-5, and the same weights to 1e-4 (1% of the
    learning rate: Adam divides each gradient by its own size, so the rounding of other matmul shapes
    moves a near-zero gradient's update by up to 2.8e-5 here)."""
    padded = _trained_with(model_path, tmp_path, "padded", {"packing": False})
    packed = _trained_with(model_path, tmp_path, "packed", {"packing": True})
    assert packed["steps"] == padded["steps"] > 0
    assert padded["packed_calls"] == 0 and packed["packed_calls"] > packed["steps"]  # trained packed
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
    for k, v in padded["after"].items():
        if k.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores a shift): Adam scales noise
            continue
        torch.testing.assert_close(packed["after"][k], v, rtol=0, atol=1e-4, msg=k)
