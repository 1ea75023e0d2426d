"""The run directory: resolved config, metrics.jsonl, eval samples, and atomic per-iteration checkpoints.

Layout::

    OUTPUT_DIR/config.yaml            the resolved config
    OUTPUT_DIR/config_changes.jsonl   settings changed on resume, with the first iteration they applied to
    OUTPUT_DIR/metrics.jsonl          one JSON object per iteration (0 = initial policy)
    OUTPUT_DIR/samples.jsonl          eval responses and rewards per iteration (for the report)
    OUTPUT_DIR/checkpoints/iter_K/    policy/ (HF safetensors), apo_prev.safetensors, state.json
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from common.errors import OnalignError

CHECKPOINT_FORMAT = 1


class RunDirError(OnalignError, RuntimeError):
    """A missing, damaged or foreign run directory: the message names the file (and line) and the fix."""


def is_url(path: str) -> bool:
    return "://" in str(path)


class RunDir:
    """A local run directory; for an fsspec URL (`s3://...`, `gs://...`, `file://...`) a local staging copy
    that `publish()` mirrors to the URL after every iteration (and `prepare()` pulls back to resume)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.url: str | None = None
        if is_url(str(root)):
            import hashlib

            from pipeline.cache import cache_root

            self.url = str(root).rstrip("/")
            root = cache_root() / "staging" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.root = Path(root)
        # Set by `preflight.prepare` on resume: the checkpoint iteration to load, 0 to start the run over.
        self.resume_from: int | None = None

    @property
    def where(self) -> str:
        """How the user named the directory (the URL for a remote run)."""
        return self.url or str(self.root)

    def _remote(self):
        import fsspec

        return fsspec.core.url_to_fs(self.url)

    def pull(self) -> None:
        """Fetch a remote run into the staging directory (resume, and the 'already holds a run' check)."""
        if self.url is None:
            return
        fs, path = self._remote()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        if fs.exists(path):
            fs.get(path.rstrip("/") + "/", str(self.root) + "/", recursive=True)

    def publish(self) -> None:
        """Mirror the staging directory to the URL: files first, then drop remote checkpoints pruned here.
        A checkpoint is complete remotely once its state.json is there (it is written last locally)."""
        if self.url is None:
            return
        fs, path = self._remote()
        fs.makedirs(path, exist_ok=True)
        for local in sorted(self.root.rglob("*"), key=lambda p: p.name == "state.json"):
            rel = local.relative_to(self.root)
            if local.is_file() and not any(part.startswith(".") for part in rel.parts):  # skip temp dirs
                fs.makedirs(f"{path}/{rel.parent.as_posix()}", exist_ok=True)
                fs.put_file(str(local), f"{path}/{rel.as_posix()}")
        remote_ckpts = f"{path}/checkpoints"
        if fs.exists(remote_ckpts):
            keep = {f"iter_{i}" for i in self.complete_checkpoints()}
            for entry in fs.ls(remote_ckpts, detail=False):
                if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
                    fs.rm(entry, recursive=True)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def config_changes_path(self) -> Path:
        return self.root / "config_changes.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def prepare(self) -> None:
        """Create the directory and prove it is writable, before any actor starts."""
        if self.url is not None:
            try:
                self.pull()
                self.publish()  # proves the remote is writable
            except Exception as e:
                raise RunDirError(
                    f"output_dir '{self.url}' cannot be read or written ({type(e).__name__}: {e})"
                ) from None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(
                f"output_dir '{self.root}' is not writable ({e.strerror}); choose another with output_dir=PATH"
            ) from None

    # ------------------------------------------------------------ config.yaml
    def read_config(self) -> dict | None:
        """The run's saved resolved config (None when it has none); a damaged file is an error naming it."""
        import yaml

        path = self.config_path
        if not path.exists():
            return None
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            detail = " ".join(str(e).split())
            raise RunDirError(
                f"{path} cannot be read as YAML ({detail}); restore it or start a new output_dir"
            ) from None
        if not isinstance(tree, dict):
            raise RunDirError(
                f"{path} does not hold a mapping of settings (got {type(tree).__name__}); restore it or start a "
                "new output_dir"
            )
        from pydantic import BaseModel

        from common.config import RunConfig

        for key, field in RunConfig.model_fields.items():
            section = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            if section and key in tree and not isinstance(tree[key], dict):
                raise RunDirError(
                    f"{path}: '{key}' should be a section of settings, got {tree[key]!r}; restore the file or start "
                    "a new output_dir"
                )
        return tree

    def read_config_changes(self) -> list[dict]:
        return self._read_jsonl(self.config_changes_path)

    def append_config_change(self, row: dict) -> None:
        self._append(self.config_changes_path, row)

    # ------------------------------------------------------------ jsonl files
    @staticmethod
    def _read_jsonl(path: Path) -> list[dict]:
        """Rows of a JSONL file, each a JSON object with an integer 'iteration'. Only a torn final line (no
        newline after it: a crash mid-write) is dropped; any other bad line is an error naming the file and
        line, so no reader (and no `truncate_to`) ever silently cuts the rows after it."""
        if not path.exists():
            return []
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RunDirError(f"{path} cannot be read ({e.strerror})") from None
        lines = data.split(b"\n")  # a file that ends with a newline ends with b""
        rows = []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                if number == len(lines):
                    break  # the torn last line of a crash: everything before it is intact
                reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
                problem = f"is not valid JSON ({reason})"
            else:
                if not isinstance(row, dict):
                    problem = f"is not a JSON object (got {type(row).__name__})"
                elif not isinstance(row.get("iteration"), int) or isinstance(row.get("iteration"), bool):
                    problem = "has no integer 'iteration'"
                else:
                    rows.append(row)
                    continue
            raise RunDirError(
                f"{path} line {number} {problem}: the file is damaged. Repair or delete that line (only a torn "
                "last line, from a crash mid-write, is skipped on its own); nothing was changed"
            )
        return rows

    def read_metrics(self) -> list[dict]:
        return self._read_jsonl(self.metrics_path)

    def read_samples(self) -> list[dict]:
        return self._read_jsonl(self.samples_path)

    @staticmethod
    def _end_last_line(path: Path) -> None:
        """Before an append: cut a torn last line (a crash mid-write), or end a complete one with its newline,
        so the new row starts a line of its own."""
        if not path.is_file():
            return
        with path.open("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            start = data.rfind(b"\n") + 1
            try:
                json.loads(data[start:])
            except ValueError:
                f.truncate(start)
            else:
                f.seek(size)
                f.write(b"\n")

    @staticmethod
    def _append(path: Path, row: dict) -> None:
        RunDir._end_last_line(path)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append_metrics(self, row: dict) -> None:
        self._append(self.metrics_path, row)

    def append_samples(self, row: dict) -> None:
        self._append(self.samples_path, row)

    def truncate_to(self, iteration: int) -> None:
        """Keep only rows of iterations <= `iteration` (resume drops a half-finished iteration's rows).
        Both files are read (and a damaged one refused) before either is rewritten."""
        paths = (self.metrics_path, self.samples_path)
        kept = [[r for r in self._read_jsonl(p) if r["iteration"] <= iteration] for p in paths]
        for path, rows in zip(paths, kept, strict=True):
            if not path.exists() and not rows:
                continue
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, path)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_path(self, iteration: int) -> Path:
        return self.checkpoints / f"iter_{iteration}"

    def begin_checkpoint(self, iteration: int) -> Path:
        tmp = self.checkpoints / f".iter_{iteration}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, iteration: int, state: dict, keep: int) -> Path:
        """Write state.json last, then rename the whole directory into place (atomic on one filesystem)."""
        state = {"format": CHECKPOINT_FORMAT, "iteration": iteration, **state}
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
        final = self.checkpoint_path(iteration)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.complete_checkpoints()[:-keep]:
            shutil.rmtree(self.checkpoint_path(old), ignore_errors=True)
        return final

    def complete_checkpoints(self) -> list[int]:
        """Iterations with a complete checkpoint (renamed into place with its state.json), ascending."""
        if not self.checkpoints.is_dir():
            return []
        done = []
        for p in self.checkpoints.iterdir():
            number = p.name.removeprefix("iter_")
            if p.name.startswith("iter_") and number.isdigit() and (p / "state.json").is_file():
                done.append(int(number))
        return sorted(done)

    def partial_checkpoints(self) -> list[Path]:
        """Checkpoint directories whose write never finished (a stop or a crash while writing): never loaded."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.name.startswith(".iter_") and p.name.endswith(".tmp"))

    def remove_checkpoints(self) -> None:
        """Drop every checkpoint (a run that starts over replaces them)."""
        for it in self.complete_checkpoints():
            shutil.rmtree(self.checkpoint_path(it), ignore_errors=True)

    def load_state(self, iteration: int) -> dict:
        path = self.checkpoint_path(iteration) / "state.json"
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RunDirError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise RunDirError(f"{path} is not a JSON object (got {type(state).__name__})")
        return state
