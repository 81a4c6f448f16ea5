"""Sparse per-position distributions (kNN targets) on disk and in batches.

On disk a set of rows is CSR: ``offsets`` int64 (R + 1,), ``ids`` int32 (nnz,) and ``probs`` float16 (nnz,): row r
holds the distinct token ids ``ids[offsets[r]:offsets[r + 1]]`` with their probabilities, most probable first.
Every distinct neighbour token is kept (no fixed width that would cut the distribution and force a renormalisation),
and a row takes 6 bytes per distinct id plus 8: ~1.2 KB at k = 1024 where ~200 ids are distinct, against 6 KB for
a fixed 1024-wide layout. In a batch, rows are padded to the widest row of the batch with id -1 / probability 0,
which is what :func:`mlpmem.components.losses.memory_loss` takes.

Writers follow one protocol (``restore``, ``append``, ``flush``, ``state``, ``close``) so that
:func:`mlpmem.components.knn.compute_targets` can resume a killed run at its last finished block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from mlpmem.components.index import ConcatRows
from mlpmem.files import AppendableNpy, create_memmap


class TargetSink(Protocol):
    def restore(self, state: dict, rows_done: int) -> bool:
        """Continue after ``rows_done`` rows with the state saved then; False if that is impossible (start over)."""

    def append(self, first_row: int, ids: np.ndarray, probs: np.ndarray) -> None:
        """Rows first_row.. of ids (B, K) int32 (-1 pads) and probs (B, K) float16 (0 at pads)."""

    def flush(self) -> None: ...

    def state(self) -> dict: ...

    def close(self) -> None: ...


class FixedWidthSink:
    """Rows written into (R, K) arrays (row i -> line i), pads kept: for tests and small in-memory uses."""

    def __init__(self, ids: np.ndarray, probs: np.ndarray):
        if ids.shape != probs.shape or ids.dtype != np.int32 or probs.dtype != np.float16:
            raise ValueError(f"ids must be int32 (R, K) and probs float16 (R, K); got {ids.dtype} {ids.shape} and "
                             f"{probs.dtype} {probs.shape}")
        self.ids, self.probs = ids, probs

    def restore(self, state: dict, rows_done: int) -> bool:
        return True

    def append(self, first_row: int, ids: np.ndarray, probs: np.ndarray) -> None:
        K = self.ids.shape[1]
        if ids.shape[1] > K and (ids[:, K:] >= 0).any():
            raise ValueError(f"a row has more than the {K} ids this sink holds")
        self.ids[first_row:first_row + len(ids)] = ids[:, :K]
        self.probs[first_row:first_row + len(ids)] = probs[:, :K]

    def flush(self) -> None:
        for a in (self.ids, self.probs):
            if hasattr(a, "flush"):
                a.flush()

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        self.flush()


def csr_names(stem: str) -> dict[str, str]:
    """File names of one CSR set: ``{stem}offsets.npy`` etc. (stem e.g. 'validation/' or '' + a shard suffix)."""
    return {k: f"{k}{stem}.npy" for k in ("offsets", "ids", "probs")}


class CsrSink:
    """Rows appended to a CSR set in ``directory`` (offsets preallocated: the row count is known)."""

    def __init__(self, directory: Path, suffix: str, n_rows: int):
        self.dir, self.names, self.n_rows = Path(directory), csr_names(suffix), n_rows
        self.offsets = create_memmap(self.dir / self.names["offsets"], np.int64, (n_rows + 1,))
        self.ids = self.probs = None

    def restore(self, state: dict, rows_done: int) -> bool:
        nnz = int(state.get("nnz", 0)) if rows_done else 0
        self.ids = AppendableNpy(self.dir / self.names["ids"], np.int32, keep=nnz)
        self.probs = AppendableNpy(self.dir / self.names["probs"], np.float16, keep=nnz)
        ok = not nnz or (self.ids.resumed and self.probs.resumed and int(self.offsets[rows_done]) == nnz)
        if not ok:  # the killed run's files are not what its progress says: start this set over
            self.ids = AppendableNpy(self.dir / self.names["ids"], np.int32)
            self.probs = AppendableNpy(self.dir / self.names["probs"], np.float16)
        self.offsets[0] = 0
        return ok

    def append(self, first_row: int, ids: np.ndarray, probs: np.ndarray) -> None:
        valid = ids >= 0
        counts = valid.sum(1)
        self.offsets[first_row + 1:first_row + 1 + len(ids)] = self.ids.n + np.cumsum(counts)
        self.ids.append(ids[valid])  # row-major: each row's ids in order, most probable first
        self.probs.append(probs[valid])

    def flush(self) -> None:
        self.ids.flush()
        self.probs.flush()
        self.offsets.flush()

    def state(self) -> dict:
        return {"nnz": self.ids.n}

    def close(self) -> None:
        self.offsets.flush()
        self.ids.close()
        self.probs.close()


# ----------------------------------------------------------------------------- reading rows in batches

def _pad_gather(starts: np.ndarray, lens: np.ndarray, ids, probs) -> tuple[np.ndarray, np.ndarray]:
    K = int(lens.max()) if len(lens) else 0
    col = np.arange(K)[None, :]
    mask = col < lens[:, None]
    flat = (starts[:, None] + col)[mask]
    out_ids = np.full((len(lens), K), -1, dtype=np.int64)
    out_probs = np.zeros((len(lens), K), dtype=np.float32)
    out_ids[mask] = np.asarray(ids[flat], dtype=np.int64)
    out_probs[mask] = np.asarray(probs[flat], dtype=np.float32)
    return out_ids, out_probs


class CsrRows:
    """Rows of consecutive CSR sets, indexed by one global row number; ``rows(positions)`` pads a batch."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        starts, base, ids, probs = [], 0, [], []
        for off, i, p in parts:
            off = np.asarray(off, dtype=np.int64)
            if int(off[-1]) != len(i) or len(i) != len(p):
                raise ValueError(f"CSR set with {off[-1]} entries by its offsets but {len(i)} ids / {len(p)} probs")
            starts.append(off[:-1] + base)
            base += len(i)
            ids.append(i)
            probs.append(p)
        self.starts = np.concatenate(starts + [np.array([base])])  # (R + 1,) global offsets
        self.ids, self.probs = ConcatRows(ids), ConcatRows(probs)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def nnz(self) -> int:
        return int(self.starts[-1])

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids (n, K) int64 padded with -1 and probs (n, K) float32 (0 at pads); K = the widest row."""
        pos = np.asarray(positions, dtype=np.int64)
        s = self.starts[pos]
        return _pad_gather(s, self.starts[pos + 1] - s, self.ids, self.probs)


class FixedRows:
    """Rows of (N, K) arrays padded with -1 (the layout of small in-memory targets and tests)."""

    def __init__(self, ids: np.ndarray, probs: np.ndarray):
        if ids.ndim != 2 or probs.shape != ids.shape:
            raise ValueError(f"ids/probs: expected matching (N, K) arrays, got {ids.shape} and {probs.shape}")
        self.ids, self.probs = ids, probs

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.ids[positions], dtype=np.int64), np.asarray(self.probs[positions], dtype=np.float32))
