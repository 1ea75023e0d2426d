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
