"""File conventions shared by every layer: atomic writes, strict JSON, fingerprints, memmaps, directory swaps.

- Arrays are real ``.npy`` files (dtype and shape in the header), opened as memmaps; a memmap of known size gets
  its blocks reserved up front (``posix_fallocate``), so a full disk is a clear error before any work instead of a
  SIGBUS in the middle of it; a write that fails on a full disk anyway (whatever the writer wraps the ENOSPC in) is
  a one-line :class:`DiskSpaceError` naming the path and the free space (:func:`disk_errors`).
- Anything small is written to a temporary file in the same directory and renamed (atomic on POSIX), with the
  permissions an ordinary ``open`` would give (umask), never mkstemp's 0600.
- A directory that is rewritten as a whole (a checkpoint) is a symlink to a versioned sibling, switched by one
  atomic rename: at every instant the name points to a complete version.
- Temporary names all match :func:`is_leftover`, so the leftovers of killed runs can be swept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from numpy.lib.format import open_memmap

from mlpmem.disk import TMP_MARK as _TMP_MARK
from mlpmem.disk import disk_errors, human_bytes, reserve
from mlpmem.errors import DiskSpaceError, StageError

log = logging.getLogger(__name__)

# files whose content (not only their size) a manifest vouches for: what gets loaded as a model
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_VERSION_RE = re.compile(r"^\.(?P<name>.+)\.v-[0-9a-f]{12}$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: str | Path, is_dir: bool = False) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode an ordinary open/mkdir would have."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


# ----------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Open a temporary file beside ``path`` for binary writing; on success fsync it and rename it over ``path``.

    A crash or exception leaves ``path`` as it was (old content or absent), never half written; a full disk is a
    :class:`DiskSpaceError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_MARK)
    try:
        with disk_errors(path, "free space (or choose another --out_dir) and rerun the same command; finished work "
                         "is kept", written=Path(tmp)):  # judged while the partial file still fills the disk
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _public(tmp)
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259): non-finite floats become null, numpy scalars and paths plain values."""
    return json.dumps(finite_json(obj), indent=indent, sort_keys=False, default=_json_default, allow_nan=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def atomic_save_npy(path: str | Path, arr: np.ndarray) -> None:
    """Save a whole array atomically (small arrays: token streams, offsets)."""
    with atomic_file(path) as f:
        np.save(f, arr)


def finite_json(o: Any) -> Any:
    """A copy of ``o`` with every NaN/Infinity replaced by None (strict JSON readers reject them)."""
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | Path) -> Any | None:
    """The JSON at ``path``; None when absent or unreadable (a half-written file of a killed run)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- directory versions

@contextlib.contextmanager
def swapped_directory(target: str | Path) -> Iterator[Path]:
    """Yield a new empty directory; on success ``target`` (a symlink) points to it, in one atomic rename.

    ``target`` is a symlink to a versioned sibling ``.NAME.v-XXXXXXXXXXXX``. A crash while writing leaves the old
    version in place (the half-written one is swept as a leftover); the switch is ``os.replace`` of a new symlink
    over the old one, so there is no instant without a complete ``target``. Older versions are removed after.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target)
    new = parent / f".{target.name}.v-{uuid.uuid4().hex[:12]}"
    new.mkdir()
    try:
        yield new
        link = parent / f".{target.name}.link{_TMP_MARK}-{uuid.uuid4().hex[:8]}"
        os.symlink(new.name, link)
        if target.is_dir() and not target.is_symlink():  # empty (checked above): nothing of anyone's is lost
            target.rmdir()
        os.replace(link, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    remove_old_versions(target)


def made_by_swap(target: Path) -> bool:
    """Whether ``target`` is what :func:`swapped_directory` makes: a symlink to its own ``.NAME.v-*`` sibling."""
    if not target.is_symlink():
        return False
    dest = os.readlink(target)
    m = _VERSION_RE.match(dest)
    return bool(m and m.group("name") == target.name and (target.parent / dest).is_dir())


def check_replaceable(target: Path) -> None:
    """StageError unless ``target`` is absent, an empty directory, or a directory version this module made.

    A writer replaces only what it made itself: a user's folder or file (or a run directory) given as an output path
    is refused with exit 2, never renamed away and swept."""
    target = Path(target)
    if not (target.exists() or target.is_symlink()) or made_by_swap(target):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    kind = ("a symlink" if target.is_symlink() else "a non-empty directory" if target.is_dir() else
            "a file")
    raise StageError(f"{target} already exists and was not written by mlpmem ({kind}); mlpmem replaces only "
                     "what it wrote itself: choose another path, or move it away yourself")


def remove_old_versions(target: Path) -> None:
    """Delete the versioned siblings of ``target`` that it does not point to."""
    current = os.readlink(target) if target.is_symlink() else None
    for p in target.parent.glob(f".{target.name}.v-*"):
        if p.name != current and _VERSION_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def remove_directory(target: Path) -> None:
    """Remove a (possibly versioned) directory and all its versions."""
    target = Path(target)
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    remove_old_versions(target)


def is_leftover(p: Path) -> bool:
    """A temporary file/directory of a killed writer, or a directory version no symlink points to."""
    if _TMP_MARK in p.name or (p.name.startswith(".") and p.name.endswith(".tmp")):
        return True
    m = _VERSION_RE.match(p.name)
    if m:
        link = p.parent / m.group("name")
        return not (link.is_symlink() and os.readlink(link) == p.name)
    return False


def sweep_leftovers(root: str | Path) -> int:
    """Delete the leftovers of killed runs under ``root``; call only while holding the run's lock."""
    n = 0
    root = Path(root)
    if not root.is_dir():
        return 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            p = Path(dirpath) / name
            if is_leftover(p):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    dirnames.remove(name)
                else:
                    p.unlink(missing_ok=True)
                n += 1
    if n:
        log.info("removed %d leftover temporary file(s) of an interrupted run under %s", n, root)
    return n


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


def cached_per_file(path: str | Path, what: str, compute: Any) -> Any:
    """``compute()`` (a JSON value) for the file at ``path``, cached by (path, size, mtime, inode, ``what``): a large
    file is read once, and any write to it (a replaced checkpoint, one flipped byte) changes its mtime, so it is
    computed again. The cache lives under the asset cache (``MLPMEM_CACHE``)."""
    from mlpmem.assets import cache_dir

    path = Path(path)
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
           "what": what}
    cached = cache_dir() / "digests" / f"{fingerprint(key['path'], what)}.json"
    hit = read_json(cached)
    if isinstance(hit, dict) and hit.get("key") == key:
        return hit["value"]
    value = compute()
    atomic_write_json(cached, {"key": key, "value": value})
    return value


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, hashed once per version of it (:func:`cached_per_file`)."""
    return cached_per_file(path, "sha256", lambda: file_sha256(path))


def file_listing(root: str | Path, skip: Any = lambda p: False) -> dict[str, dict]:
    """{path relative to ``root``: {"size": bytes[, "sha256": digest for weight files]}} of the files a finished
    output consists of, for a manifest to vouch for. Hidden files and directories (progress records, markers,
    temporaries, directory versions) are not part of it; a checkpoint symlink (:func:`swapped_directory`) is, under
    its own name (``best/model.safetensors``), whatever version it points to. ``skip(path)``: files and
    subdirectories that are not part of it (the manifest itself, other outputs with a manifest of their own)."""
    root = Path(root)
    out: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not skip(here / n) and
                             (made_by_swap(here / n) or not (here / n).is_symlink()))
        for n in sorted(filenames):
            p = here / n
            if n.startswith(".") or p.is_symlink() or skip(p):
                continue
            info: dict[str, Any] = {"size": p.stat().st_size}
            if p.suffix in WEIGHT_SUFFIXES:
                info["sha256"] = cached_sha256(p)
            out[p.relative_to(root).as_posix()] = info
    return out


def listing_problem(root: str | Path, listing: dict[str, dict]) -> str | None:
    """What is wrong with the files of ``listing`` under ``root`` now (missing, resized, changed weights), or None."""
    root = Path(root)
    for rel, info in listing.items():
        p = root / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != info.get("size"):
            return f"{rel} has {size} bytes where its manifest recorded {info.get('size')}"
        if info.get("sha256") and cached_sha256(p) != info["sha256"]:
            return f"{rel} was modified after it was written (its sha256 is not the one its manifest recorded)"
    return None


# ----------------------------------------------------------------------------- arrays

def create_memmap(path: str | Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """Create (or reopen for resume, if header matches) a writable .npy memmap whose blocks are reserved."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            mm = open_memmap(path, mode="r+")
            if mm.dtype == np.dtype(dtype) and mm.shape == tuple(shape):
                reserve(path, path.stat().st_size)  # a resumed file may still be sparse
                return mm
        except (ValueError, OSError):
            pass
        path.unlink()
    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize + 128  # + the .npy header
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise DiskSpaceError(f"not enough disk space for {path}: {human_bytes(needed)} needed, {human_bytes(free)} "
                             "free; free space or choose another --out_dir, then rerun (finished work is kept)")
    try:
        mm = open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))  # writes its last byte: may fail too
        reserve(path, path.stat().st_size)
    except OSError as e:
        path.unlink(missing_ok=True)  # no header-only stub left behind
        if isinstance(e, DiskSpaceError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskSpaceError(f"cannot allocate {path} ({human_bytes(needed)}): no space left on its disk or over "
                                 "a file-size limit; free space or choose another --out_dir, then rerun (finished "
                                 "work is kept)") from None
        raise
    return mm


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


def shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}-{i:05d}-of-{n:05d}.npy"


class Progress:
    """A resumable counter persisted as JSON next to partial outputs (units done, plus a config fingerprint)."""

    def __init__(self, path: str | Path, fp: str):
        self.path = Path(path)
        self.fp = fp
        self.done, self.state = 0, {}
        d = read_json(self.path)
        if isinstance(d, dict) and d.get("fingerprint") == fp:
            try:
                self.done = int(d.get("done", 0))
                self.state = dict(d.get("state") or {})
            except (TypeError, ValueError):
                self.done, self.state = 0, {}

    def update(self, done: int, state: dict | None = None) -> None:
        """Record ``done`` units (and the writer's ``state`` at that point, e.g. bytes appended so far)."""
        self.done, self.state = done, dict(state or {})
        atomic_write_json(self.path, {"fingerprint": self.fp, "done": done, "state": self.state})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class AppendableNpy:
    """A 1-D ``.npy`` file written by appending, for arrays whose length is known only at the end.

    The header is a fixed 128 bytes, rewritten with the final length by :meth:`close`; until then it says length 0,
    so a reader never takes a half-written file for a whole one (and the stage's manifest is missing anyway).
    ``keep``: reopen a killed writer's file keeping its first ``keep`` elements (the rest, written after the last
    recorded progress, is cut); :attr:`resumed` is False when the file was missing or shorter (start over).
    """

    HEADER = 128

    def __init__(self, path: str | Path, dtype: Any, keep: int = 0):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        want = self.HEADER + keep * self.dtype.itemsize
        self.resumed = keep > 0 and self.path.is_file() and self.path.stat().st_size >= want
        self.n = keep if self.resumed else 0
        self.f = open(self.path, "r+b" if self.resumed else "w+b")
        self.f.truncate(self.HEADER + self.n * self.dtype.itemsize)
        if not self.resumed:
            self._write_header(0)
        self.f.seek(0, os.SEEK_END)

    def _write_header(self, n: int) -> None:
        body = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (self.dtype.str, n)
        body = body.ljust(self.HEADER - 11) + "\n"
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1"))

    def append(self, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1)
        self.f.write(a.tobytes())
        self.n += a.size

    def flush(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        """Write the final header (length n) and close: the file is then an ordinary .npy of n elements."""
        self._write_header(self.n)
        self.flush()
        self.f.close()
