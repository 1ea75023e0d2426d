"""The trainer's memory: the copies of the policy it holds (and that training never writes the ones it
keeps), and what its heap keeps of the memory it frees."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def trainer(model_path):
    from workers.trainer import TrainerWorker

    t = TrainerWorker(0, 1)
    t.setup(model_path, {}, {"name": "dpo"}, seed=0)
    return t


def test_setup_holds_a_tied_head_as_the_embedding_itself(trainer):
    """One tensor under both names, as HF ties them (a separate clone was a sixth of SmolLM2's weights)."""
    assert trainer.hf_config.tie_word_embeddings
    w = trainer.get_weights()
    assert w["lm_head.weight"].data_ptr() == w["model.embed_tokens.weight"].data_ptr()


def test_set_weights_copies_once_and_keeps_the_tie(trainer):
    from workers.weights import clone_weights

    w = trainer.get_weights()
    copy = clone_weights(w)
    assert copy["lm_head.weight"] is copy["model.embed_tokens.weight"]
    assert copy["model.norm.weight"].data_ptr() != w["model.norm.weight"].data_ptr()
    assert all(torch.equal(copy[k], w[k]) for k in w)


def test_model_is_built_over_the_weights_without_a_copy(trainer, model_path):
    """No random initialisation and no second copy: the module's parameters are the held tensors, and it
    computes what the checkpoint computes."""
    from transformers import AutoModelForCausalLM

    w = trainer.get_weights()
    model = trainer._model(w)
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p.data_ptr() == w[name].data_ptr(), name
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    expect = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expect.detach())


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

    sys.path.insert(0, os.path.dirname(__file__))  # the spawned rank imports this module
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

    sys.path.insert(0, os.path.dirname(__file__))  # the spawned rank imports this module
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


FRAGMENT = r"""
import sys, torch
from workers.trainer import TrainerWorker

cfg = {"cpu_preload_tcmalloc": False, "cpu_mmap_threshold_kib": int(sys.argv[2])}
TrainerWorker(0, 1).setup(sys.argv[1], cfg, {"name": "dpo"}, 0)


def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


big = torch.ones(4 << 20, dtype=torch.uint8)
del big  # a freed 4 MiB block: glibc raises its own threshold to it
blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(120)]  # 1 MiB each, as activations are
before = rss_mb()
del blocks[::2]  # free every other one: holes in a heap
print(before - rss_mb())
"""


@pytest.mark.parametrize("kib", [0, 128])
def test_cpu_trainer_returns_freed_blocks_to_the_os(kib, model_path):
    """With `train.cpu_mmap_threshold_kib` 128 (the memory setting) a CPU trainer's freed 1 MiB blocks leave
    its resident memory at once; with glibc's default (0) they stay in the heap as holes."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # glibc's heap, whatever runs pytest
    env.update(PYTHONPATH=os.getcwd(), DS_ACCELERATOR="cpu")
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT, model_path, str(kib)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    returned_mb = float(out.stdout.split()[-1])
    if kib:
        assert returned_mb > 50  # 60 MiB freed
    else:
        assert returned_mb < 10


def test_cpu_ranks_use_small_zero_buckets():
    """DeepSpeed's default buckets (5e8 elements: 2 GB in fp32, allocated at every backward) made a 2-rank
    group on the 13M model peak at 1.7-2.4 GB a rank under tcmalloc; 0.95 GB with these."""
    from common.config import TrainConfig
    from workers.ds_engine import CPU_BUCKET_ELEMENTS, ds_config

    zero = ds_config(TrainConfig(), 2)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == CPU_BUCKET_ELEMENTS <= 50_000_000
    assert "reduce_bucket_size" not in ds_config(TrainConfig(num_gpus=1), 2)["zero_optimization"]


def test_mmap_threshold_is_a_glibc_setting():
    """It does nothing under tcmalloc, and glibc caps it at 32 MiB: both refused with the fix."""
    from pydantic import ValidationError

    from common.config import TrainConfig

    with pytest.raises(ValidationError, match="cpu_preload_tcmalloc=false"):
        TrainConfig(cpu_mmap_threshold_kib=128)
    with pytest.raises(ValidationError, match="less than or equal to 32768"):
        TrainConfig(cpu_preload_tcmalloc=False, cpu_mmap_threshold_kib=65536)
    assert TrainConfig(cpu_preload_tcmalloc=False, cpu_mmap_threshold_kib=128).cpu_mmap_threshold_kib == 128


def test_spawned_ranks_start_again_when_their_port_was_taken(tmp_path):
    """The free-port race (a port found free, then taken before rank 0 binds it), made certain: the first port
    given is held by a listening socket. The ranks start again on a fresh port instead of failing."""
    import socket

    from ranks import spawn_ranks, store_rank

    sys.path.insert(0, os.path.dirname(__file__))  # the spawned rank imports tests/ranks.py
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports: list[int] = []

        def args(p: int) -> tuple:
            ports.append(p)
            return (p,)

        spawn_ranks(store_rank, args, nprocs=1, port=port)
    assert ports[0] == port and len(ports) == 2 and ports[1] != port
