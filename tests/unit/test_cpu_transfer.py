"""The CPU sync's wire format: exact round trip (fp32 and bf16), and zero-copy reads from Ray's object store."""

from __future__ import annotations

import torch

from workers.cpu_transfer import buckets, from_wire, to_wire


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(3, 4, generator=g).t(),  # non-contiguous
    }


def test_round_trip_is_exact_for_fp32_and_bf16():
    w = weights()
    back = from_wire(to_wire(w))
    assert list(back) == list(w)
    for k in w:
        assert back[k].dtype == w[k].dtype and torch.equal(back[k], w[k])


def test_buckets_respect_the_size_and_keep_order():
    w = {f"t{i}": torch.zeros(256) for i in range(10)}  # 1 KiB each
    out = buckets(w, 3 * 1024)
    assert [len(names) for names, _ in out] == [3, 3, 3, 1]
    assert [n for names, _ in out for n in names] == list(w)
    assert [len(names) for names, _ in buckets(w, 1)] == [1] * 10  # a tensor larger than the bucket goes alone
