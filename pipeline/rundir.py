"""The run directory: resolved config, metrics.jsonl, eval samples, and atomic per-iteration checkpoints.

Layout::

    OUTPUT_DIR/config.yaml            the resolved config
    OUTPUT_DIR/metrics.jsonl          one JSON object per iteration (0 = initial policy)
    OUTPUT_DIR/samples.jsonl          eval responses and rewards per iteration (for the report)
    OUTPUT_DIR/checkpoints/iter_K/    policy/ (HF safetensors), apo_prev.safetensors, state.json
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHECKPOINT_FORMAT = 1


class RunDirError(RuntimeError):
    pass


def is_url(path: str) -> bool:
    return "://" in str(path)


class RunDir:
    """A local run directory; for an fsspec URL (`s3://...`, `gs://...`, `file://...`) a local staging copy
    that `publish()` mirrors to the URL after every iteration (and `prepare()` pulls back to resume)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.url: str | None = None
        if is_url(str(root)):
            import hashlib

            from pipeline.tiny_model import cache_root

            self.url = str(root).rstrip("/")
            root = cache_root() / "staging" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.root = Path(root)

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

    # ------------------------------------------------------------ jsonl files
    @staticmethod
    def _read_jsonl(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: everything before it is intact
        return rows

    def read_metrics(self) -> list[dict]:
        return self._read_jsonl(self.metrics_path)

    def read_samples(self) -> list[dict]:
        return self._read_jsonl(self.samples_path)

    @staticmethod
    def _append(path: Path, row: dict) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append_metrics(self, row: dict) -> None:
        self._append(self.metrics_path, row)

    def append_samples(self, row: dict) -> None:
        self._append(self.samples_path, row)

    def truncate_to(self, iteration: int) -> None:
        """Keep only rows of iterations <= `iteration` (resume drops a half-finished iteration's rows)."""
        for path in (self.metrics_path, self.samples_path):
            rows = [r for r in self._read_jsonl(path) if r["iteration"] <= iteration]
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
            if p.name.startswith("iter_") and (p / "state.json").is_file():
                done.append(int(p.name.removeprefix("iter_")))
        return sorted(done)

    def load_state(self, iteration: int) -> dict:
        return json.loads((self.checkpoint_path(iteration) / "state.json").read_text(encoding="utf-8"))
