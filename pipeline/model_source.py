"""Where the policy and the reward model come from: a built-in model (built once, cached), an HF model
directory, or a Hub name (from the local cache, else downloaded once on the driver), checked before any
actor starts: config, safetensors weights, tokenizer and chat template."""

from __future__ import annotations

import os
from pathlib import Path

from common.config import BUILTIN_MODEL, BUILTIN_REWARD_MODEL, BUILTIN_SMOLLM2, RunConfig
from common.errors import one_line
from pipeline.cache import hub_offline
from pipeline.console import Console


def resolve_model(cfg: RunConfig) -> str:
    m = cfg.model
    if m.path == BUILTIN_MODEL:
        from pipeline.tiny_model import tiny_model_path

        return str(tiny_model_path(m.tiny_hidden_size, m.tiny_layers, m.sft_steps))
    if m.path == BUILTIN_SMOLLM2:
        from pipeline.smollm2 import smollm2_path

        return str(smollm2_path())
    return model_dir(m.path, "model.path")


def resolve_reward_model(cfg: RunConfig) -> str:
    """`reward.model_path`, with `builtin:tiny-rm` built (once, cached) and replaced by its directory."""
    if cfg.reward.model_path == BUILTIN_REWARD_MODEL:
        from pipeline.tiny_reward_model import tiny_reward_model_path

        return str(tiny_reward_model_path())
    return cfg.reward.model_path or ""


def local_reward_model(cfg: RunConfig) -> str:
    """`resolve_reward_model` as a local directory (a Hub name downloaded on the driver, as the policy is)."""
    return local_model_dir(resolve_reward_model(cfg), "reward.model_path", Console(cfg.quiet).log)


def model_dir(path: str, key: str) -> str:
    """`path` when it is an HF model directory, or a Hub name whose model is in the local HF cache (or, when
    the Hub may be asked, on the Hub). A path that is neither fails at once, naming `key`: it is never sent
    to the Hub to be retried for a minute."""
    p = Path(path)
    if p.exists():
        _check_model_files(p, key)
        return str(p)
    if p.is_absolute() or path.startswith((".", "~")):
        raise FileNotFoundError(f"{key} '{p}' does not exist; set {key} to an HF model directory")
    _check_hub_model(path, key)
    return path  # a hub name: resolved by transformers/vLLM on the cluster (from its cache, or the Hub)


def _check_model_files(p: Path, key: str) -> None:
    if not p.is_dir():
        raise FileNotFoundError(f"{key} '{p}' is a file, not a directory; point it at an HF model directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key} '{p}' has no config.json; point it at an HF model directory")
    if not any(p.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{key} '{p}' has no .safetensors weights; onalign loads safetensors only "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )


def _cached_snapshot(name: str) -> str | None:
    """The local HF cache's copy of hub model `name` (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not a hub name)
        return None


def _check_hub_model(name: str, key: str) -> None:
    """A name that is no local path: found in the local HF cache, else asked of the Hub once (never when
    HF_HUB_OFFLINE is set); any miss is one line naming `key`."""
    from huggingface_hub.utils import validate_repo_id

    where = f"{key} '{name}' is not a directory (relative to {Path.cwd()})"
    try:
        validate_repo_id(name)
    except ValueError:
        raise FileNotFoundError(
            f"{where} and not a Hugging Face Hub model name; set {key} to an HF model directory"
        ) from None
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        _check_model_files(Path(snapshot), key)
        return
    fix = f"fix {key}, or download the model first (`hf download {name}`)"
    if hub_offline():
        raise FileNotFoundError(
            f"{where}, and no Hub model '{name}' is in the local Hugging Face cache (HF_HUB_OFFLINE is set, so the "
            f"Hub is not asked); {fix}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{where}, not in the local Hugging Face cache, and the Hub has no model '{name}' (a private or gated "
            f"one needs `hf auth login`); fix {key}"
        ) from None
    except Exception as e:  # no network, DNS, proxy, TLS: one try, no minute of retries
        raise FileNotFoundError(
            f"{where}, not in the local Hugging Face cache, and the Hub cannot be reached ({type(e).__name__}); "
            f"{fix}, or set HF_HUB_OFFLINE=1 to use the cache only"
        ) from None


# What a Hub model's download takes: config, tokenizer and safetensors weights (never pickles).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def local_model_dir(path: str, key: str, log=None) -> str:
    """A directory the actors load `path` from without the network: `path` itself, or a Hub model's snapshot
    in the local HF cache, downloaded here (once, on the driver) when it is not cached. The engines run with
    HF_HUB_OFFLINE=1 and start before any trainer could download anything, so a Hub name handed to them finds
    nothing on a fresh cache. On several nodes the cache must be one every node reads (HF_HOME on a shared
    filesystem); `start_workers` checks that each node sees the directory."""
    if Path(path).is_dir():
        return path
    snapshot = _cached_snapshot(path)
    if snapshot is not None:
        return snapshot
    from huggingface_hub import snapshot_download

    if log is not None:
        log(f"{key}: downloading '{path}' from the Hugging Face Hub into the local cache (once)")
    return str(snapshot_download(path, allow_patterns=HUB_MODEL_FILES))


def _local_files(path: str) -> str:
    """Where the model's files can be read without the network: the directory, or the cached snapshot."""
    return path if Path(path).is_dir() else (_cached_snapshot(path) or path)


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    """The model's config and tokenizer, checked: one line naming `key` when either cannot be loaded or the
    tokenizer has no chat template (every prompt is rendered through it)."""
    from transformers import AutoConfig, AutoTokenizer

    from common.config import ConfigError

    files = _local_files(path)
    try:
        AutoConfig.from_pretrained(files, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{key} '{path}': its config.json cannot be loaded ({one_line(e, whole=True)})") from None
    need = "the model directory needs its tokenizer files (tokenizer.json or the vocabulary, and tokenizer_config.json)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(files, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(
            f"{key} '{path}': its tokenizer cannot be loaded ({one_line(e, whole=True)}); {need}"
        ) from None
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer when the files are missing
        raise ConfigError(f"{key} '{path}' has no tokenizer (an empty vocabulary was loaded); {need}")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{key} '{path}' has no chat template, and every prompt is rendered through it: add one to the model "
            "directory (a 'chat_template' entry in tokenizer_config.json, or a chat_template.jinja file), or use "
            "the model's instruct/chat variant"
        )
    return tokenizer
