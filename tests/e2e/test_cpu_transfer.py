"""The CPU sync's wire format: exact round trip (fp32 and bf16), and zero-copy reads from Ray's object store."""

from __future__ import annotations

import pytest
import torch
from unit.test_cpu_transfer import weights

from workers.cpu_transfer import from_wire, to_wire


@pytest.mark.slow
def test_object_store_hands_the_engine_views_not_copies(ray_cluster):
    import ray

    w = weights()
    back = from_wire(ray.get(ray.put(to_wire(w))))
    for k in w:
        assert torch.equal(back[k], w[k])
    # arrays deserialised from the object store are read-only views into shared memory (no copy was made)
    wire = ray.get(ray.put(to_wire(w)))
    assert not any(array.flags.writeable for array, _ in wire.values())


@pytest.mark.slow
def test_the_sync_client_drives_every_engine_method_it_names(workers, model_path):
    """`EngineRanksClient` (vLLM's weight-sync client protocol over our engine actors) calls
    only methods the engine actor has: the whole lifecycle with a weight version, then the release of the
    trainer connection, on the real engine (CPU backend; the NCCL path calls the same methods)."""
    import ray
    from safetensors.torch import load_file

    from workers.nccl_client import EngineRanksClient

    weights = {}
    for f in sorted(__import__("pathlib").Path(model_path).glob("*.safetensors")):
        weights.update(load_file(f))
    weights.pop("lm_head.weight", None)  # tied: sent once, as the embedding
    client = EngineRanksClient(workers.rollouts)
    client.start_weight_update()
    client.update_weights({"names": list(weights), "tensors": list(weights.values())})
    client.finish_weight_update("iteration-7")
    assert ray.get([e.weight_version.remote() for e in workers.rollouts]) == ["iteration-7"] * len(workers.rollouts)
    client.update_weight_version("iteration-8")
    assert ray.get(workers.rollouts[0].weight_version.remote()) == "iteration-8"
    client.shutdown_weight_transfer_engine()  # the CPU backend holds no connection: a no-op that must exist
