"""On-disk conventions shared by every stage.

- Arrays are real ``.npy`` files (dtype and shape in the header), opened as memmaps.
- Anything small is written to a temporary file in the same directory and renamed (atomic on POSIX).
- Each stage directory ends with ``manifest.json``, written last; ``complete: true`` means the outputs are whole.
  A stage whose manifest exists with the same ``fingerprint`` (hash of its config and its inputs' fingerprints)
  is skipped; a different fingerprint is refused with a message saying what to rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """An artifact is missing, incomplete, corrupt or was made with other settings. The message says what to do."""


def package_version() -> str:
    from mlpmem import __version__

    return __version__


# ----------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Open a temporary file beside ``path`` for binary writing; on success fsync it and rename it over ``path``.

    A crash or exception leaves ``path`` as it was (old content or absent), never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_npy(path: str | Path, arr: np.ndarray) -> None:
    """Save a whole array atomically (small arrays: token streams, offsets)."""
    with atomic_file(path) as f:
        np.save(f, arr)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# ----------------------------------------------------------------------------- fingerprints

def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (configs, upstream fingerprints)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=_json_default).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifests

def read_manifest(stage_dir: str | Path) -> dict | None:
    """The manifest of a stage directory, or None when there is none."""
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{p} is corrupt ({e}); delete {p.parent} and rerun its stage") from None


def write_manifest(stage_dir: str | Path, stage: str, fp: str, **fields: Any) -> dict:
    """Write the stage's manifest last and atomically; returns it."""
    m = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "package_version": package_version(),
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
        "complete": True,
    }
    atomic_write_json(Path(stage_dir) / MANIFEST, m)
    return m


def require_manifest(stage_dir: str | Path, stage: str, command: str) -> dict:
    """The complete manifest of an upstream stage, or a StageError naming the command that makes it."""
    m = read_manifest(stage_dir)
    if m is None or not m.get("complete"):
        raise StageError(f"no complete {stage} output in {stage_dir}: run `{command}` first")
    if m.get("stage") != stage:
        raise StageError(f"{stage_dir} holds a {m.get('stage')!r} manifest, expected {stage!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise StageError(f"{stage_dir} was written with format {m.get('format_version')}, this mlpmem reads "
                         f"{FORMAT_VERSION}: rerun `{command}` with --force")
    return m


def should_skip(stage_dir: str | Path, stage: str, fp: str, force: bool, command: str) -> dict | None:
    """Return the existing manifest when the stage is already done with the same fingerprint.

    A complete manifest with another fingerprint means the outputs were made with other settings or inputs:
    refuse rather than silently mixing them, unless ``force``.
    """
    m = read_manifest(stage_dir)
    if m is None or not m.get("complete"):
        return None
    if m.get("fingerprint") == fp and not force:
        log.info("%s: up to date in %s (fingerprint %s), skipping", stage, stage_dir, fp)
        return m
    if force:
        return None
    raise StageError(
        f"{stage_dir} already holds {stage} output made with other settings or inputs "
        f"(fingerprint {m.get('fingerprint')} != {fp}). Rerun `{command} --force` to rebuild it "
        f"(and the stages after it), or choose another --out_dir."
    )


def invalidate(stage_dir: str | Path) -> None:
    """Mark a stage as incomplete before rewriting it, so a crash never leaves an old manifest over new files."""
    (Path(stage_dir) / MANIFEST).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- arrays

def shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}-{i:05d}-of-{n:05d}.npy"


def create_memmap(path: str | Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """Create (or reopen for resume, if header matches) a writable .npy memmap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            mm = open_memmap(path, mode="r+")
            if mm.dtype == np.dtype(dtype) and mm.shape == tuple(shape):
                return mm
        except (ValueError, OSError):
            pass
        path.unlink()
    return open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))


def load_npy(path: str | Path, dtype: Any | None = None, shape0: int | None = None, mmap: bool = True) -> np.ndarray:
    """Open a .npy file, checking it exists, is readable, and has the expected dtype / length."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"missing array {path}: rerun the stage that writes it")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise StageError(f"{path} is corrupt or truncated ({e}): delete it and rerun its stage with --force") from None
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise StageError(f"{path} has dtype {arr.dtype}, expected {np.dtype(dtype)}: rerun its stage with --force")
    if shape0 is not None and arr.shape[0] != shape0:
        raise StageError(f"{path} has {arr.shape[0]} rows, manifest says {shape0}: rerun its stage with --force")
    return arr


class Progress:
    """A resumable counter persisted as JSON next to partial outputs (units done, plus a config fingerprint)."""

    def __init__(self, path: str | Path, fp: str):
        self.path = Path(path)
        self.fp = fp
        self.done = 0
        if self.path.is_file():
            try:
                d = json.loads(self.path.read_text())
                if d.get("fingerprint") == fp:
                    self.done = int(d.get("done", 0))
            except (json.JSONDecodeError, ValueError):
                self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        atomic_write_json(self.path, {"fingerprint": self.fp, "done": done})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
