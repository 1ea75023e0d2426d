"""User prompt sets through HF `datasets`: local files (JSONL, JSON, CSV, Parquet, Arrow, save_to_disk
directories) or hub names, with a column mapping and the shapes TRL users already have:

- `prompt` (a string), optionally with `response` or `chosen` (the ground-truth / SFT target);
- `messages` / `conversations` in chat format: the last assistant turn becomes the ground truth and
  the turns before it the prompt.

Rows come back as dicts {"prompt": str, "response": str | None, "messages": list | None}. Datasets stay
memory-mapped Arrow tables; only the selected rows are turned into Python objects.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
CHAT_ALIASES = ("messages", "conversations")
TARGET_ALIASES = ("response", "chosen", "completion")


def _check_utf8(path: Path) -> None:
    """Name the first bad byte of a text file instead of letting a parser fail somewhere inside."""
    with path.open("rb") as f:
        line_no, offset = 1, 0
        for line in f:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {line_no} is not valid UTF-8 (byte {offset + e.start}); re-save the file as UTF-8"
                ) from None
            line_no += 1
            offset += len(line)


def open_dataset(source: str, cfg: DataConfig):
    """A `datasets.Dataset` for a local file/dir or a hub name."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
                return ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
            raise DataError(f"{path}: a directory, but not one written by Dataset.save_to_disk")
        if path.is_file():
            fmt = FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FORMATS)}")
            if fmt in ("json", "csv"):
                _check_utf8(path)
            if path.stat().st_size == 0:
                raise DataError(f"{path}: the file is empty; it needs at least one row with a prompt")
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        if source.startswith((".", "/")) or path.suffix.lower() in FORMATS:
            raise DataError(f"data file '{source}' does not exist; fix data.train / data.eval")
        return datasets.load_dataset(source, cfg.subset, split=cfg.split, revision=cfg.revision)
    except DataError:
        raise
    except Exception as e:  # parser errors from datasets/pyarrow: keep the file name in front
        raise DataError(f"{source}: could not be read as a dataset ({type(e).__name__}: {e})") from None


def _columns(ds, cfg: DataConfig, source: str) -> tuple[str | None, str | None, str | None]:
    cols = set(ds.column_names)
    chat = next((c for c in (cfg.messages_column, *CHAT_ALIASES) if c in cols), None)
    prompt = cfg.prompt_column if cfg.prompt_column in cols else None
    target = next((c for c in (cfg.response_column, *TARGET_ALIASES) if c in cols), None)
    if prompt is None and chat is None:
        raise DataError(
            f"{source}: no prompt column '{cfg.prompt_column}' and no chat column "
            f"({', '.join((cfg.messages_column, *CHAT_ALIASES))}); columns are {sorted(cols)}. "
            "Map yours with data.prompt_column=NAME or data.messages_column=NAME"
        )
    return prompt, chat, target


def _text(value, source: str, row: int, column: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):  # chosen given as a conversation: its last assistant turn
        turns = [m for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        if not turns:
            raise DataError(f"{source}: row {row}, column '{column}': a message list with no assistant turn")
        value = turns[-1].get("content")
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row}, column '{column}': expected a string, got {type(value).__name__}")
    return value


def _chat_row(messages, source: str, row: int, column: str) -> dict:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f"{source}: row {row}, column '{column}': expected a list of {{role, content}} messages")
    msgs = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    response = None
    if msgs and msgs[-1]["role"] == "assistant":
        response = msgs[-1]["content"]
        msgs = msgs[:-1]
    users = [m for m in msgs if m["role"] == "user"]
    if not users:
        raise DataError(f"{source}: row {row}, column '{column}': the conversation has no user turn")
    return {"prompt": users[-1]["content"], "response": response, "messages": msgs}


def rows_of(ds, cfg: DataConfig, source: str, indices: list[int]) -> list[dict]:
    """The rows at `indices` (dataset row numbers, 0-based, which error messages quote)."""
    prompt_col, chat_col, target_col = _columns(ds, cfg, source)
    out = []
    for i, row in zip(indices, ds.select(indices), strict=True):
        if prompt_col is not None:
            item = {"prompt": _text(row[prompt_col], source, i, prompt_col) or "", "response": None, "messages": None}
        else:
            item = _chat_row(row[chat_col], source, i, chat_col)
        if target_col is not None and row.get(target_col) is not None:
            item["response"] = _text(row[target_col], source, i, target_col)
        out.append(item)
    return out


def load_rows(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows, in an order shuffled deterministically from the seed; the eval split is carved
    from train when `data.eval` is not given."""
    import numpy as np

    train = open_dataset(cfg.train, cfg)
    _columns(train, cfg, cfg.train)  # name a missing column before anything else
    n = min(len(train), cfg.max_samples or len(train))
    if n == 0:
        raise DataError(f"{cfg.train}: the dataset has no rows")
    order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    if cfg.eval is None:
        if n < 2:
            raise DataError(f"{cfg.train}: needs at least 2 rows to carve an eval split (or set data.eval)")
        n_eval = min(cfg.num_eval_prompts, max(n // 5, 1))
        eval_rows = rows_of(train, cfg, cfg.train, order[:n_eval])
        order = order[n_eval:]
    else:
        eval_ds = open_dataset(cfg.eval, cfg)
        eval_order = [int(i) for i in np.random.default_rng(seed).permutation(len(eval_ds))]
        eval_rows = rows_of(eval_ds, cfg, cfg.eval, eval_order[: cfg.num_eval_prompts])
    return rows_of(train, cfg, cfg.train, order[: cfg.num_train_prompts]), eval_rows
