"""User prompt sets through HF `datasets`: local files (JSONL, JSON, CSV, Parquet, Arrow, save_to_disk
directories) or hub names, with a column mapping and the shapes TRL users already have:

- `prompt` (a string), optionally with `response`, `chosen` or `completion` (the ground-truth / SFT target);
- TRL's conversational formats: `prompt` as a message list is the conversation so far (it ends with
  the user turn to answer; earlier system, user and assistant turns are kept), and `completion` /
  `chosen` as a message list is the answer (its assistant turn). Implicit-prompt preference data
  (`chosen` / `rejected` holding whole conversations, no `prompt`) reads `chosen` as a chat;
- `messages` / `conversations` in chat format: the last assistant turn becomes the ground truth and
  the turns before it the prompt.

Rows come back as dicts {"prompt": str, "response": str | None, "messages": list | None}. Datasets stay
memory-mapped Arrow tables; only the selected rows are turned into Python objects.
"""

from __future__ import annotations

from pathlib import Path

from common.config import DataConfig
from common.errors import DataError, one_line

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


def open_dataset(source: str, cfg: DataConfig, key: str = "data.train"):
    """A `datasets.Dataset` for a local file/dir or a hub name (`key`: the setting that named it)."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(str(path))
                return _split_of(ds, cfg, path) if isinstance(ds, datasets.DatasetDict) else ds
            raise DataError(
                f"{path}: a directory, but not one written by Dataset.save_to_disk or DatasetDict.save_to_disk "
                "(no dataset_info.json, state.json or dataset_dict.json); point data.train / data.eval at such a "
                "directory or at a data file"
            )
        if path.is_file():
            fmt = FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FORMATS)}")
            if fmt in ("json", "csv"):
                _check_utf8(path)
            if path.stat().st_size == 0:
                raise DataError(f"{path}: the file is empty; it needs at least one row with a prompt")
            verbosity = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parser's log line: we say it better
            try:
                return datasets.load_dataset(fmt, data_files=str(path), split="train")
            except Exception:
                problem = _parse_problem(path, fmt)  # name the line the parser stopped at
                if problem:
                    raise DataError(problem) from None
                raise
            finally:
                datasets.logging.set_verbosity(verbosity)
        if source.startswith((".", "/")) or path.suffix.lower() in FORMATS:
            raise DataError(f"data file '{source}' does not exist; fix data.train / data.eval")
        _check_hub_dataset(source, key)
        return datasets.load_dataset(source, cfg.subset, split=cfg.split, revision=cfg.revision)
    except DataError:
        raise
    except Exception as e:  # parser errors from datasets/pyarrow: keep the file name in front
        raise DataError(
            f"{source}: could not be read as a dataset ({one_line(e, innermost=True, whole=True)})"
        ) from None


def _check_hub_dataset(name: str, key: str) -> None:
    """A name that is no local path: in the datasets cache when HF_HUB_OFFLINE is set, else asked of the Hub
    once (10 s at most, no retries). Every miss says first that no such local path exists (a typo in a path
    such as data/train looks like a Hub name)."""
    import os

    from pipeline.cache import hub_offline

    where = f"{key} '{name}' is no file or directory (relative to {Path.cwd()})"
    if hub_offline():
        import datasets

        try:
            datasets.load_dataset_builder(name)  # the local cache only, under HF_HUB_OFFLINE
        except Exception:
            raise DataError(
                f"{where}, and no Hub dataset '{name}' is in the local cache (HF_HUB_OFFLINE is set, so the Hub is "
                "not asked); fix the path, or download the dataset first"
            ) from None
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).dataset_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise DataError(f"{where}, and the Hub has no dataset '{name}' (a private one needs `hf auth login`)") from None
    except Exception as e:  # no network, DNS, proxy, TLS: one try, no minute of retries
        raise DataError(
            f"{where}, and the Hub cannot be reached ({type(e).__name__}); fix the path, or set HF_HUB_OFFLINE=1 "
            "to use the datasets cache only"
        ) from None


def _split_of(dd, cfg: DataConfig, path: Path):
    """The `data.split` split of a saved DatasetDict (one split only: that one, whatever its name)."""
    if cfg.split in dd:
        return dd[cfg.split]
    if len(dd) == 1 and cfg.split == "train":  # the default split name, and only one split to take
        return next(iter(dd.values()))
    raise DataError(
        f"{path}: a saved DatasetDict with splits {sorted(dd)}, but no split '{cfg.split}'; set data.split to one "
        "of them"
    )


def _parse_problem(path: Path, fmt: str) -> str | None:
    """After the parser failed: the first line of a JSON/JSONL/CSV file that is malformed, as a message naming
    the file and line (None when no line is at fault, e.g. a column whose type changes between rows)."""
    import csv
    import json

    if fmt == "json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):  # one JSON document (a list of rows)
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                where = f"line {e.lineno}, column {e.colno}"
                return f"{path}: could not be read: {where} is not valid JSON ({e.msg}); fix the file"
            return None
        for number, line in enumerate(text.splitlines(), 1):  # JSON lines: one object per line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return (
                    f"{path}: could not be read: line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                    "each line must hold one JSON object: fix or remove that line"
                )
            if not isinstance(row, dict):
                kind = type(row).__name__
                return f"{path}: could not be read: line {number} is a JSON {kind}, not an object of fields"
        return None
    if fmt == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f, strict=True)
            width, start = None, 1
            try:
                for record in reader:
                    if width is None:
                        width = len(record)
                    elif record and len(record) != width:
                        return (
                            f"{path}: could not be read: line {start} has {len(record)} fields, the header has "
                            f'{width}; quote fields that contain commas ("a, b") or fix that line'
                        )
                    start = reader.line_num + 1
            except csv.Error as e:
                where = f"the record starting at line {start}"
                return f"{path}: could not be read: {where} is malformed ({e}); check its quotes"
        return None
    return None


def _is_message_list(feature) -> bool:
    """A column of message lists (TRL's conversational format), from the dataset's features."""
    inner = getattr(feature, "feature", None)  # datasets.List / Sequence / LargeList
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return isinstance(inner, dict) and "role" in inner


def _columns(ds, cfg: DataConfig, source: str) -> tuple[str | None, str | None, str | None]:
    cols = set(ds.column_names)
    chat = next((c for c in (cfg.messages_column, *CHAT_ALIASES) if c in cols), None)
    prompt = cfg.prompt_column if cfg.prompt_column in cols else None
    target = next((c for c in (cfg.response_column, *TARGET_ALIASES) if c in cols), None)
    features = getattr(ds, "features", None) or {}
    if prompt is None and chat is None and target == "chosen" and _is_message_list(features.get("chosen")):
        return None, "chosen", None  # TRL implicit-prompt preferences: `chosen` is the whole conversation
    if prompt is None and chat is None:
        raise DataError(
            f"{source}: no prompt column '{cfg.prompt_column}' and no chat column "
            f"({', '.join(dict.fromkeys((cfg.messages_column, *CHAT_ALIASES)))}); columns are {sorted(cols)}. "
            "Map yours with data.prompt_column=NAME or data.messages_column=NAME"
        )
    return prompt, chat, target


def _messages(value, source: str, row: int, column: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise DataError(f"{source}: row {row}, column '{column}': expected a list of {{role, content}} messages")
    out = []
    for m in value:
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" for c in content):
            content = "".join(str(c.get("text") or "") for c in content)  # text parts: [{type: text, text}]
        if content is not None and not isinstance(content, str):
            raise DataError(
                f"{source}: row {row}, column '{column}': a {m['role']} message's content is "
                f"{type(content).__name__}, not text"
            )
        out.append({"role": m["role"], "content": content or ""})
    return out


def _text(value, source: str, row: int, column: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):  # an answer given as a conversation (TRL's completion / chosen): its assistant turn
        turns = [m for m in _messages(value, source, row, column) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{source}: row {row}, column '{column}': a message list with no assistant turn")
        if len(turns) > 1:
            raise DataError(
                f"{source}: row {row}, column '{column}': an answer of {len(turns)} assistant turns; the answer to "
                "train on must be one assistant turn (put earlier turns in the prompt's conversation)"
            )
        value = turns[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row}, column '{column}': expected a string, got {type(value).__name__}")
    return value


def _prompt_row(value, source: str, row: int, column: str) -> dict:
    """A prompt column value: a string (one user turn), or TRL's conversational prompt, a message list that
    is the conversation so far and ends with the user turn to answer."""
    if not isinstance(value, list):
        return {"prompt": _text(value, source, row, column) or "", "response": None, "messages": None}
    msgs = _messages(value, source, row, column)
    if not msgs or msgs[-1]["role"] != "user":
        last = msgs[-1]["role"] if msgs else "nothing"
        raise DataError(
            f"{source}: row {row}, column '{column}': a conversational prompt must end with the user turn to answer "
            f"(TRL's format), but it ends with {last}; put the answer in a 'completion' or 'chosen' column, or "
            "give whole conversations in a 'messages' column"
        )
    return {"prompt": msgs[-1]["content"], "response": None, "messages": msgs}


def _chat_row(messages, source: str, row: int, column: str) -> dict:
    msgs = _messages(messages, source, row, column)
    response = None
    if msgs and msgs[-1]["role"] == "assistant":
        response = msgs[-1]["content"]
        msgs = msgs[:-1]
    users = [m for m in msgs if m["role"] == "user"]
    if not users:
        raise DataError(f"{source}: row {row}, column '{column}': the conversation has no user turn")
    return {"prompt": users[-1]["content"], "response": response, "messages": msgs}


def rows_of(ds, cfg: DataConfig, source: str, indices: list[int]) -> list[dict]:
    """The rows at `indices` (dataset row numbers, 0-based; error messages quote them 1-based, as an editor
    counts the lines of a JSONL or CSV file's records)."""
    prompt_col, chat_col, target_col = _columns(ds, cfg, source)
    out = []
    for index, row in zip(indices, ds.select(indices), strict=True):
        i = index + 1
        if prompt_col is not None:
            item = _prompt_row(row[prompt_col], source, i, prompt_col)
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
        eval_ds = open_dataset(cfg.eval, cfg, "data.eval")
        eval_order = [int(i) for i in np.random.default_rng(seed).permutation(len(eval_ds))]
        eval_rows = rows_of(eval_ds, cfg, cfg.eval, eval_order[: cfg.num_eval_prompts])
    return rows_of(train, cfg, cfg.train, order[: cfg.num_train_prompts]), eval_rows
