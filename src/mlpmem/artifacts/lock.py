"""One writer per run directory: an exclusive ``flock`` on ``<run>/.lock``, taken by every command that writes.

A second writer is refused at once with the holder's pid, command and start time. The kernel drops the lock
when its process dies (SIGKILL included), so there is nothing stale to clean. Under torchrun rank 0 holds it
for the whole job and tells the other ranks whether it got it. While holding it, the leftovers of killed runs
(temporary files, unswitched checkpoint versions) are swept: nobody else can be writing them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from mlpmem.errors import ConfigError, RunLockedError
from mlpmem.files import sweep_leftovers
from mlpmem.runtime import broadcast_from_main, dist_info

LOCK_NAME = ".lock"


def _open_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out_dir {run_dir}: is a file, not a directory; choose a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--out_dir {run_dir}: a part of the path is a file; choose a directory") from None


def acquire(run_dir: Path, command: str) -> int:
    """Take the lock of ``run_dir`` (created if needed) and return its file descriptor; RunLockedError if held."""
    _open_run_dir(run_dir)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        try:
            h = json.loads(path.read_text())
            who = f"pid {h['pid']} on {h['host']} (`{h['command']}`, since {h['started']})"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise RunLockedError(f"{run_dir} is being written by {who}: wait for it to finish or stop it, or use "
                             "another --out_dir") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold the run directory's lock for the block (rank 0 under torchrun; the others learn if it failed)."""
    run_dir = Path(run_dir)
    fd, err = None, None
    if dist_info().is_main:
        try:
            fd = acquire(run_dir, command)
            sweep_leftovers(run_dir)
        except (RunLockedError, ConfigError) as e:
            err = e
    err = broadcast_from_main(err)
    if err is not None:
        raise err
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
