"""Range checks a reader runs when it opens an array: token ids below the vocabulary, probabilities finite and in
[0, 1], CSR offsets from 0, monotone, ending at the entry count.

A corrupt id or probability would otherwise surface steps later as an index error deep in training ("this is a
bug"), far from the file that holds it. One vectorised pass per array (chunks bound the memory; the rows can be
100M+), run once per version of the file, and a message naming the file, the first bad position and the command
that rewrites it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem.errors import StageError
from mlpmem.files import cached_per_file

_CHUNK = 1 << 24  # elements per pass: 64 MB of int32


def corrupt(path: Path, what: str, rerun: str) -> StageError:
    return StageError(f"{path} is corrupt: {what}; rerun `{rerun}` (and the stages after it)")


def _once(path: Path, what: str, check) -> None:
    """Run ``check()`` once per version of the file (a passed check is cached by size, mtime and inode): a 100M-row
    target set is read in full on its first open only."""
    cached_per_file(path, what, lambda: check() or True)


def check_ids(path: Path, ids: np.ndarray, vocab_size: int | None, rerun: str, what: str = "id") -> None:
    """Every token id in [0, vocab_size); ``vocab_size`` None (an older manifest): nothing to check against."""
    if vocab_size is not None:
        _once(path, f"ids<{vocab_size}:{len(ids)}", lambda: _scan_ids(path, ids, vocab_size, rerun, what))


def _scan_ids(path: Path, ids: np.ndarray, vocab_size: int, rerun: str, what: str) -> None:
    for a in range(0, len(ids), _CHUNK):
        c = np.asarray(ids[a:a + _CHUNK])
        if c.min() < 0 or c.max() >= vocab_size:
            i = int(np.argmax((c < 0) | (c >= vocab_size)))
            v = int(c[i])
            raise corrupt(path, f"{what} {v} at position {a + i} "
                                 f"{'< 0' if v < 0 else f'>= vocabulary {vocab_size}'}", rerun)


def check_probs(path: Path, probs: np.ndarray, rerun: str) -> None:
    """Every probability finite and in [0, 1] (min/max compare false on NaN, so NaN fails too)."""
    _once(path, "probs", lambda: _scan_probs(path, probs, rerun))


def _scan_probs(path: Path, probs: np.ndarray, rerun: str) -> None:
    for a in range(0, len(probs), _CHUNK):
        c = np.asarray(probs[a:a + _CHUNK])
        if not (c.min() >= 0 and c.max() <= 1):
            i = int(np.argmax(~((c >= 0) & (c <= 1))))
            raise corrupt(path, f"probability {c[i]} at position {a + i} is not in [0, 1]", rerun)


def check_offsets(path: Path, offsets: np.ndarray, n_entries: int, entries: Path, rerun: str) -> None:
    """CSR offsets: start at 0, never decrease, end at the number of entries of the arrays they index."""
    if int(offsets[-1]) != n_entries:  # cheap, and about the other file too: never cached
        raise corrupt(path, f"the offsets end at {int(offsets[-1])} but {entries.name} holds {n_entries} "
                             "entries", rerun)
    _once(path, "offsets", lambda: _scan_offsets(path, offsets, rerun))


def _scan_offsets(path: Path, offsets: np.ndarray, rerun: str) -> None:
    if int(offsets[0]) != 0:
        raise corrupt(path, f"the offsets start at {int(offsets[0])}, not 0", rerun)
    for a in range(0, len(offsets) - 1, _CHUNK):
        d = np.diff(np.asarray(offsets[a:a + _CHUNK + 1]))  # one element of overlap: no step is missed
        if len(d) and d.min() < 0:
            r = a + int(np.argmax(d < 0))
            raise corrupt(path, f"the offsets decrease at row {r} ({int(offsets[r])}, then "
                                 f"{int(offsets[r + 1])})", rerun)


