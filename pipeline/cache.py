"""Where onalign keeps what it builds (the built-in models, staging copies of remote run dirs), and the
atomic build-once helper every built-in model uses."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """`$ONALIGN_CACHE`, default `~/.cache/onalign`."""
    return Path(os.environ.get("ONALIGN_CACHE", Path.home() / ".cache" / "onalign"))


def cached_build(final: Path, build) -> Path:
    """`final` if a complete build is there, else `build(tmp_dir)` then an atomic rename into place.

    A build is complete once its `onalign_build.json` exists; concurrent builders race harmlessly (the
    loser's identical copy is discarded)."""
    if (final / "onalign_build.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            if not (final / "onalign_build.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def hub_offline() -> bool:
    """Whether the Hugging Face Hub must not be asked (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)
