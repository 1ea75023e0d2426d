"""The policy as an HF state dict on CPU: copies, APO's extrapolation, what a sync sends, what a checkpoint
keeps of the model it started from."""

from __future__ import annotations

import os

import torch

StateDict = dict[str, torch.Tensor]


def clone_weights(weights: StateDict) -> StateDict:
    """A detached copy of `weights` in which tensors that share storage (tied embeddings) stay one tensor."""
    copies: dict[tuple, torch.Tensor] = {}
    out: StateDict = {}
    for name, w in weights.items():
        key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
        if key not in copies:
            copies[key] = w.detach().clone()
        out[name] = copies[key]
    return out


def apo_extrapolate(trained: StateDict, trained_prev: StateDict, alpha: float) -> tuple[StateDict, float]:
    """APO's Nesterov step (arXiv 2410.06293): theta = theta_hat + alpha (theta_hat - theta_hat_prev).

    Returns the new weights and the step's L2 norm. Tensors that share storage (tied embeddings) stay
    tied and are counted once."""
    new: StateDict = {}
    done: dict[int, torch.Tensor] = {}
    step_sq = 0.0
    for name, w in trained.items():
        key = w.untyped_storage().data_ptr()
        if key in done:
            new[name] = done[key]
            continue
        step = alpha * (w - trained_prev[name])
        step_sq += float(step.pow(2).sum())
        new[name] = done[key] = w + step
    return new, step_sq**0.5


def sync_state_dict(weights: StateDict, hf_config) -> StateDict:
    """`weights` less the output projection when it is tied to the input embeddings (sent once)."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return weights
    return {k: v for k, v in weights.items() if k != "lm_head.weight"}


# What a checkpoint keeps byte for byte from the model the run started from: the tokenizer's files and
# the generation config (stop tokens such as Llama-3's end of turn live only there).
MODEL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def copy_model_files(model_dir: str, out_dir: str) -> None:
    """Copy the user's tokenizer files and generation config unchanged into a checkpoint's model dir."""
    import shutil

    for name in MODEL_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))


def as_os_error(error: Exception, path: str) -> Exception:
    """safetensors' Rust writer reports an I/O failure (a full disk, a quota) as `SafetensorError("... (os error
    N)")`: the OSError it stands for, naming `path`, so the driver can say what ran out; others unchanged."""
    import re

    found = None if isinstance(error, OSError) else re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), path)
