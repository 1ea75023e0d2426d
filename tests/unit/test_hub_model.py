"""A Hub model name reaches every actor as a local directory, resolved once on the driver.

Engines run with HF_HUB_OFFLINE=1 and start before any trainer would download anything, so a Hub name in
`model.path` used to find nothing on a fresh cache. Here the local HF cache is a temporary one, laid out as
`huggingface_hub` lays it out; no network is used."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = "onalign-test/tiny-policy"


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, model_dir: str) -> Path:
    """`model_dir`'s files as the HF cache's snapshot of `repo` at COMMIT (refs/main -> COMMIT)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    shutil.copytree(model_dir, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_model_reaches_the_actors_as_its_directory(hub_cache, model_path, tiny_cfg, tmp_path):
    from pipeline.preflight import prepare

    snap = put_in_cache(hub_cache, REPO, model_path)
    prep = prepare(tiny_cfg(tmp_path / "out", f"model.path={REPO}"))
    assert Path(prep.model_path) == snap and Path(prep.model_path).is_dir()
    assert prep.cfg.model.path == REPO  # the run's config keeps what the user wrote


def test_an_uncached_hub_model_is_downloaded_once_on_the_driver(hub_cache, model_path, tiny_cfg, tmp_path, monkeypatch):
    """Not cached and the Hub reachable: the driver downloads it (weights in safetensors, tokenizer and
    config files; no pickles) before any actor starts. The Hub is stood in for by a function that fills the
    cache as `snapshot_download` would (this machine has no network)."""
    import huggingface_hub

    import pipeline.model_source as model_source
    import pipeline.preflight as preflight

    real_snapshot_download = huggingface_hub.snapshot_download
    calls = []

    def fake_hub_download(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:  # the cache, as it is
            return real_snapshot_download(repo_id, local_files_only=True, **kwargs)
        calls.append((repo_id, allow_patterns, kwargs))
        return str(put_in_cache(hub_cache, repo_id, model_path))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub_download)
    monkeypatch.setattr(model_source, "_check_hub_model", lambda name, key: None)  # "the Hub has it"
    prep = preflight.prepare(tiny_cfg(tmp_path / "out", f"model.path={REPO}"))
    assert Path(prep.model_path).is_dir() and len(calls) == 1
    repo, patterns, kwargs = calls[0]
    assert repo == REPO and "*.safetensors" in patterns and not any(p.endswith(".bin") for p in patterns)


def test_dry_run_downloads_nothing(hub_cache, model_path, tiny_cfg, tmp_path, monkeypatch):
    """--dry-run checks the Hub name (and reads the tokenizer) but downloads no weights."""
    import huggingface_hub

    import pipeline.model_source as model_source
    import pipeline.preflight as preflight

    real_load_tokenizer = preflight.load_tokenizer
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("dry run downloaded"))
    monkeypatch.setattr(model_source, "_check_hub_model", lambda name, key: None)
    monkeypatch.setattr(preflight, "load_tokenizer", lambda path, key, trc=False: real_load_tokenizer(model_path, key))
    prep = preflight.check_run(tiny_cfg(tmp_path / "out", f"model.path={REPO}"))
    assert prep.model_path == REPO
