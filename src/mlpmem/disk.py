"""Disk space: a full disk (or quota, or file-size limit) is a one-line :class:`DiskSpaceError` naming the path, the
free space and what a rerun does, never a SIGBUS or "a bug".

- A memmap of known size gets its blocks reserved up front (:func:`reserve`), so a full disk is a clear error before
  any work.
- A write that fails on a full disk anyway is recognised whatever the writer wraps the ENOSPC in (torch.save's
  RuntimeError, safetensors' "(os error 28)"), or by a probe write when the errno was dropped (:func:`disk_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from mlpmem.errors import DiskSpaceError

TMP_MARK = ".mlpmem-tmp"  # in every temporary name (files and directories), so leftovers are recognisable


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors' I/O errors keep the errno only in their text
_PROBE_BYTES = 1 << 20


def disk_full_errno(e: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when ``e`` or an exception it was raised from (``__cause__``/``__context__``) says the
    disk is full, a quota is exceeded or a file-size limit is reached; else None.

    Writers wrap the OSError: torch.save's zip writer raises a RuntimeError ("unexpected pos ...") whose context is
    the OSError of the Python file it wrote to, safetensors a SafetensorError ending "(os error 28)"."""
    seen, ours = set(), False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e.errno
        ours = ours or isinstance(e, DiskSpaceError)
        m = _RUST_OS_ERROR.search(str(e))
        if m and int(m.group(1)) in DISK_FULL_ERRNOS:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return errno.ENOSPC if ours else None


def disk_refuses(directory: str | Path, written: str | Path | None = None) -> int | None:
    """ENOSPC/EDQUOT when ``directory``'s disk refuses a 1 MiB probe file now, EFBIG when ``written`` (the file, or a
    directory of the files, a failed writer had just written) reached this process's file-size limit; else None.

    For writers that drop the errno (torch.save to a path: "unexpected pos", numpy's tofile: "N requested and M
    written"): a write that failed for lack of space left the disk full, so a probe written before the partial
    output is removed fails too, while a failure of another cause leaves the probe room."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if written is not None and soft != resource.RLIM_INFINITY:
        written = Path(written)
        with contextlib.suppress(OSError):
            files = list(written.iterdir()) if written.is_dir() else [written]
            if any(p.is_file() and p.stat().st_size >= soft for p in files):
                return errno.EFBIG
    probe = Path(directory) / f".probe-{uuid.uuid4().hex[:8]}{TMP_MARK}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            block, left = bytes(1 << 16), _PROBE_BYTES
            while left > 0:
                left -= os.write(fd, block[:left])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # not EFBIG: a probe over a small file-size limit says nothing of the failed write
        return e.errno if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
    finally:
        probe.unlink(missing_ok=True)
    return None


def free_bytes(path: str | Path) -> int:
    """Free bytes (for an unprivileged user) on the disk of ``path`` or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_space_error(target: str | Path, code: int, then: str) -> DiskSpaceError:
    """The one-line DiskSpaceError for a write of ``target`` that failed with ``code``; ``then`` says what to do."""
    limit = ", or over the file-size limit (ulimit -f)" if code == errno.EFBIG else ""
    return DiskSpaceError(f"not enough disk space to write {target} ({human_bytes(free_bytes(target))} free on its "
                          f"disk{limit}): {then}")


@contextlib.contextmanager
def disk_errors(target: str | Path, then: str, written: str | Path | None = None) -> Iterator[None]:
    """Turn a write inside that failed for lack of disk space into a :class:`DiskSpaceError` naming ``target``, the
    free space on its disk and ``then`` (what rerunning does). A failure is of disk space when its exception chain
    holds an ENOSPC/EDQUOT/EFBIG error (:func:`disk_full_errno`) or, for an error without an errno, when the disk
    refuses a probe (:func:`disk_refuses`, looking at ``written``, the partial output, still in place). Any other
    failure passes unchanged: a bug stays a bug."""
    try:
        yield
    except Exception as e:
        code = disk_full_errno(e)
        if code is None and not (isinstance(e, OSError) and e.errno is not None):  # an errno of another cause: not ours
            code = disk_refuses(Path(target).parent if written is None else Path(written).parent, written)
        if code is None:
            raise
        raise disk_space_error(target, code, then) from e


def reserve(path: Path, nbytes: int) -> None:
    """Reserve the blocks of a file of ``nbytes`` (posix_fallocate); a full disk is a DiskSpaceError naming how much
    is needed and free, raised before anything is computed into the file."""
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = shutil.disk_usage(path.parent).free
            raise DiskSpaceError(
                f"not enough disk space for {path} ({human_bytes(nbytes)} needed, {human_bytes(free)} free on its "
                f"disk{', or a file-size limit is set' if e.errno == errno.EFBIG else ''}): free space or choose "
                "another --out_dir, then rerun; finished work is kept") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without fallocate
            raise
