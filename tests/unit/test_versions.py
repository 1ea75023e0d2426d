"""The versions onalign is tested with are pinned in pyproject.toml and checked at start-up."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from common.versions import TESTED, VersionError, check_versions

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_pins_the_tested_ranges():
    """One list: what pyproject.toml asks pip for is what the start-up check accepts."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {}
    for req in reqs:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([^;]*)", req)
        declared.setdefault(m.group(1).lower(), set()).add(m.group(3).replace(" ", ""))
    for name, spec in TESTED.items():
        dists = [d for d in declared if d == name or d == f"{name}-cpu"]
        assert dists, f"{name} is not declared in pyproject.toml"
        for d in dists:
            assert declared[d] == {spec}, (name, declared[d], spec)


def test_this_environment_passes():
    check_versions()


def test_an_untested_version_is_one_line_naming_the_fix(monkeypatch):
    fake = {"deepspeed": "0.16.4", "ray": "2.44.0", "transformers": "5.19.0", "vllm": "0.32.0"}
    monkeypatch.setattr("common.versions.installed_version", lambda name: fake[name])
    with pytest.raises(VersionError) as e:
        check_versions()
    text = str(e.value)
    assert "\n" not in text
    assert "deepspeed 0.16.4 (tested: >=0.19.8,<0.20)" in text and "ray 2.44.0 (tested: >=2.60,<3)" in text
    assert "pip install 'deepspeed>=0.19.8,<0.20' 'ray[default]>=2.60,<3'" in text
    assert "ONALIGN_ALLOW_UNTESTED_VERSIONS=1" in text
    monkeypatch.setenv("ONALIGN_ALLOW_UNTESTED_VERSIONS", "1")
    check_versions()  # the user's call


def test_a_missing_package_is_named(monkeypatch):
    monkeypatch.setattr("common.versions.installed_version", lambda name: None if name == "vllm" else "99")
    with pytest.raises(VersionError, match="vllm is not installed"):
        check_versions(["vllm"])


def test_the_driver_checks_before_anything_starts(monkeypatch, tiny_cfg, tmp_path):
    from pipeline.preflight import check_run

    monkeypatch.setattr("common.versions.installed_version", lambda name: "0.1")
    with pytest.raises(VersionError, match="installed versions onalign is not tested with"):
        check_run(tiny_cfg(tmp_path))
