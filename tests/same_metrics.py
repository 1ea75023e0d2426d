"""The comparison every resume and placement test makes: a run's rows equal a reference run's."""

from __future__ import annotations

import pytest


def assert_same_metrics(rows: list[dict], reference: list[dict], keys: list[str]) -> None:
    """Same iterations, and on each the same value of every metric in `keys` (None where the reference has
    none), to float round-off."""
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in reference]
    for a, b in zip(rows, reference, strict=True):
        for key in keys:
            if b.get(key) is None:
                assert a.get(key) is None, (a["iteration"], key)
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["iteration"], key)
