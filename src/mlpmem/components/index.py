"""FAISS over the datastore keys (squared L2), plus exact search as the accuracy reference.

Vocabulary: ``xb`` database keys (N, d), ``xq`` queries (B, d), ``D`` squared L2 distances (B, k) float32,
``I`` row ids (B, k) int64 (-1 where fewer than k hits). A row id is a train-stream position (see ``knn.py``).

Keys are stored float16 (possibly as several consecutive shard memmaps); everything handed to FAISS or torch is
converted to float32 chunk by chunk, so the whole datastore is never materialised in float32.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch

from mlpmem.errors import ConfigError, StageError
from mlpmem.files import atomic_file
from mlpmem.runtime import fault_point, progress as progress_bar

log = logging.getLogger(__name__)

AUTO_FLAT_BELOW = 200_000
MAX_NLIST = 65536


# ----------------------------------------------------------------------------- sharded keys

class ConcatRows:
    """Read-only row view over shards that cover consecutive row ranges (keys-00000-of-00002.npy, ...).

    Supports ``len``, ``shape``, ``dtype`` and row indexing by int, contiguous slice or an int array
    (returns a new ndarray in the requested order). Nothing is copied until rows are read.
    """

    def __init__(self, shards: Sequence[np.ndarray], offsets: Sequence[int] | None = None):
        if len(shards) == 0:
            raise ValueError("ConcatRows needs at least one shard")
        lengths = np.array([len(s) for s in shards], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if offsets is not None and not np.array_equal(np.asarray(offsets, dtype=np.int64), starts):
            raise ValueError(f"key shards must cover consecutive row ranges from 0: offsets {list(offsets)} != "
                             f"expected {starts.tolist()} (a shard is missing or out of order)")
        tails = {s.shape[1:] for s in shards}
        dtypes = {np.dtype(s.dtype) for s in shards}
        if len(tails) != 1 or len(dtypes) != 1:
            raise ValueError(f"key shards disagree on row shape / dtype: {tails} {dtypes}")
        self.shards = list(shards)
        self.starts = starts
        self.ends = starts + lengths
        self.dtype = dtypes.pop()
        self.shape = (int(lengths.sum()), *tails.pop())

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + n if idx < 0 else int(idx)
            s = int(np.searchsorted(self.ends, i, side="right"))
            return np.asarray(self.shards[s][i - self.starts[s]])
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            parts = []
            for s, (a, b) in enumerate(zip(self.starts, self.ends)):
                lo, hi = max(start, a), min(stop, b)
                if lo < hi:
                    parts.append(np.asarray(self.shards[s][lo - a:hi - a]))
            if not parts:
                return np.empty((0, *self.shape[1:]), dtype=self.dtype)
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        ids = np.asarray(idx)
        if ids.dtype == bool:
            ids = np.flatnonzero(ids)
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise IndexError(f"row id out of range for {n} rows")
        ids = np.where(ids < 0, ids + n, ids)
        out = np.empty((*ids.shape, *self.shape[1:]), dtype=self.dtype)
        flat_ids, flat_out = ids.reshape(-1), out.reshape(-1, *self.shape[1:])
        shard_of = np.searchsorted(self.ends, flat_ids, side="right")
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            flat_out[sel] = self.shards[s][flat_ids[sel] - self.starts[s]]
        return out


def as_rows(keys: np.ndarray | ConcatRows | Sequence[np.ndarray]) -> np.ndarray | ConcatRows:
    """One row-indexable view of the keys: an array as is, a list of consecutive shards as a ConcatRows."""
    if isinstance(keys, (np.ndarray, ConcatRows)):
        return keys
    keys = list(keys)
    return keys[0] if len(keys) == 1 else ConcatRows(keys)


def to_float32(x) -> np.ndarray:
    """Contiguous float32 array (the only layout FAISS accepts) from rows of any float dtype.

    float16 goes through torch, whose vectorised half->float cast is several times faster than numpy's here;
    read-only memmap slices are copied first (cheap: half the bytes) because torch wants writable buffers.
    """
    a = np.asarray(x)
    if a.dtype == np.float16:
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a, order="C")
        return torch.from_numpy(a).float().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def as_float32_tensor(x) -> torch.Tensor:
    """float32 torch tensor over rows (a writable copy when needed: torch refuses read-only memmaps)."""
    return torch.from_numpy(np.require(to_float32(x), requirements="W"))


# ----------------------------------------------------------------------------- factory

def resolve_factory(factory: str, n: int, d: int | None = None) -> str:
    """The FAISS factory string to build for ``n`` keys of width ``d``.

    'auto': 'Flat' below 200K keys (exact, and flat search is fast enough there), else 'IVF{nlist},PQ{m}' with
    nlist the power of two nearest 4*sqrt(n) (capped at 65536) and m = 64 sub-quantizers (64-byte codes, the
    reference setting), or the largest divisor of ``d`` below 64 when ``d`` is known and not a multiple of 64.
    Any other string is returned as is; when ``d`` is given it is checked by building an empty index, so a typo
    fails here with a ValueError naming --index.factory instead of deep inside the build.
    """
    if n < 1:
        raise ValueError(f"cannot index an empty datastore (n={n})")
    if factory == "auto":
        return "Flat" if n < AUTO_FLAT_BELOW else ivfpq_spec(n, d)
    if d is not None:
        make_index(d, factory)
    return factory


def ivfpq_spec(n: int, d: int | None, n_train: int | None = None) -> str:
    """'IVF{nlist},PQ{m}[x{bits}]' for ``n`` keys of width ``d``: nlist the power of two nearest 4*sqrt(n) (at most
    65536), m = 64 sub-quantizers (64-byte codes) or the largest divisor of ``d`` below 64. With ``n_train``
    training keys, nlist is also capped by FAISS' 39 training points per list, and codes get fewer than 8 bits
    when there are under 39 * 256 points (tiny stores)."""
    nlist = min(MAX_NLIST, 2 ** round(math.log2(4 * math.sqrt(n))))
    m = 64 if d is None or d % 64 == 0 else max(q for q in range(1, 65) if d % q == 0)
    if n_train is None:
        return f"IVF{nlist},PQ{m}"
    nlist = max(1, min(nlist, 2 ** int(math.log2(max(1, n_train // 39)))))
    nbits = max(1, min(8, int(math.log2(max(1, n_train // 39)))))
    return f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}")


def make_index(d: int, factory: str) -> faiss.Index:
    """An empty L2 index from a factory string; FAISS parse errors become a ValueError naming the flag."""
    try:
        return faiss.index_factory(int(d), factory, faiss.METRIC_L2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise ConfigError(f"--index.factory: FAISS cannot build {factory!r} for d={d} ({msg}); try 'Flat', "
                         f"'IVF4096,PQ64' (PQ m must divide d) or 'auto'") from None


# ----------------------------------------------------------------------------- build / save / load

def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _use_gpu(use_gpu: str) -> bool:
    if use_gpu not in ("auto", "yes", "no"):
        raise ConfigError(f"--index.use_gpu: must be auto, yes or no, got {use_gpu!r}")
    if use_gpu == "no":
        return False
    if _gpu_count() == 0:
        if use_gpu == "yes":
            raise ConfigError("--index.use_gpu yes: this FAISS sees no GPU (faiss-cpu installed, or no CUDA device)")
        return False
    return True


def _to_gpu(index: faiss.Index, use_gpu: str, all_gpus: bool) -> faiss.Index | None:
    """A GPU clone of ``index`` (GPU 0, or sharded over all GPUs), or None when FAISS cannot place it.

    Some CPU indexes have no GPU twin (e.g. IVFPQ with 9 dims per sub-quantizer, as d=576/PQ64 gives): with
    use_gpu 'auto' that falls back to CPU with a warning, with 'yes' it is an error naming the flag.
    """
    try:
        co = faiss.GpuMultipleClonerOptions()
        # Split inverted lists over GPUs instead of replicating the datastore; they merge back on to-CPU.
        co.shard = all_gpus
        # 64 sub-quantizers x 256 centroids of float32 lookup tables overflow shared memory; fp16 tables fit.
        # (For IVFFlat it means fp16 storage, lossless here since the keys are fp16.)
        co.useFloat16 = True
        # The wrapper keeps the GPU resources alive as long as the returned index.
        return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=-1 if all_gpus else 1)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        if use_gpu == "yes":
            raise ConfigError(f"--index.use_gpu yes: FAISS cannot put this index on GPU ({msg}); use auto or no, "
                             "or a factory whose PQ sub-vectors have a GPU-supported size") from None
        log.warning("index: GPU clone failed (%s); continuing on CPU", msg)
        return None


def _skip_polysemous_training(index: faiss.Index) -> None:
    """Turn off polysemous training, which index_factory enables for 'PQm' / 'IVFn,PQm'.

    It only permutes PQ centroids so Hamming distances between codes are meaningful for polysemous filtering,
    which we never use (search ranks by PQ distances alone), and it is by far the slowest part of PQ training
    here (x8-10 on small tests). Results of ordinary search are unaffected.
    """
    for sub in (index, faiss.try_extract_index_ivf(index)):
        if sub is None:
            continue
        sub = faiss.downcast_index(sub)
        if getattr(sub, "do_polysemous_training", False):
            sub.do_polysemous_training = False


def build_index(key_shards: np.ndarray | Sequence[np.ndarray], factory: str, train_size: int, add_chunk: int,
                seed: int, use_gpu: str = "auto", progress: bool = True) -> faiss.Index:
    """Train and fill an L2 index over the keys; returns a CPU index (ready for ``save_index``).

    key_shards: (N, d) float16 array(s), consecutive row ranges. Training uses ``min(train_size, N)`` rows drawn
    without replacement by ``numpy.random.Generator(seed)`` (sorted, so memmap reads go forward), cast to float32.
    Keys are added in order in chunks of ``add_chunk`` so a row's FAISS id is its row id (its position).
    IVF indexes train and add on GPU when allowed (``use_gpu`` auto/yes) and FAISS has GPUs; flat adds are a copy
    and stay on CPU.
    """
    xb = as_rows(key_shards)
    n, d = xb.shape
    spec = resolve_factory(factory, n, d)
    index = make_index(d, spec)
    _skip_polysemous_training(index)
    gpu = _use_gpu(use_gpu) and faiss.try_extract_index_ivf(index) is not None
    log.info("index: %s over %d keys of dim %d (%s)", spec, n, d, "GPU" if gpu else "CPU")

    if not index.is_trained:
        t0 = time.perf_counter()
        m = min(train_size, n)
        sample = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
        xt = to_float32(xb[sample])
        log.info("index: read %d training keys in %.1fs", m, time.perf_counter() - t0)
        t0 = time.perf_counter()
        gindex = _to_gpu(index, use_gpu, all_gpus=False) if gpu else None
        if gindex is not None:
            gindex.train(xt)
            index = faiss.index_gpu_to_cpu(gindex)
            del gindex
        else:
            index.train(xt)
        del xt
        log.info("index: trained on %d keys in %.1fs", m, time.perf_counter() - t0)

    gindex = _to_gpu(index, use_gpu, all_gpus=True) if gpu else None
    target = index if gindex is None else gindex
    t0 = time.perf_counter()
    with progress_bar(total=n, unit="key", unit_scale=True, desc="index add", show=progress) as bar:
        for start in range(0, n, add_chunk):
            x = to_float32(xb[start:start + add_chunk])
            target.add(x)
            bar.update(len(x))
    if gindex is not None:
        index = faiss.index_gpu_to_cpu(gindex)
        del gindex, target
    dt = time.perf_counter() - t0
    log.info("index: added %d keys in %.1fs (%.0f keys/s)", n, dt, n / max(dt, 1e-9))
    assert index.ntotal == n, (index.ntotal, n)
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write the index to a temporary file in the same directory, then rename: a crash never leaves half a file."""
    with atomic_file(path) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        fault_point("index.write")  # written to the temporary file, not yet renamed


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set nprobe on an IVF index (or one wrapped in a pre-transform etc.); a no-op for non-IVF indexes."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))


def load_index(path: str | Path, nprobe: int | None = None, mmap: bool = False) -> faiss.Index:
    """Read an index written by ``save_index``; StageError naming `mlpmem index` when missing or unreadable.

    ``nprobe`` (capped at nlist) is applied to IVF indexes; ``mmap`` maps the inverted lists instead of reading
    them into memory (large datastores).
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"no FAISS index at {path}: run `mlpmem index` first")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise StageError(f"FAISS index {path} is corrupt or truncated ({msg}): rerun `mlpmem index --force`") from None
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return index


# ----------------------------------------------------------------------------- search

def _check_k(k: int, n: int) -> None:
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1: raise --knn.k")
    if k > n:
        raise ConfigError(f"k={k} larger than the datastore ({n} keys): lower --knn.k")


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest keys of each query: D float32 (B, k) squared L2 ascending, I int64 (B, k) row ids (-1: no hit).

    xq: (B, d) any float dtype (cast to float32). With IVF, fewer than k hits in the probed lists give -1 ids and
    +inf (float max) distances; callers mask ids < 0.
    """
    _check_k(k, index.ntotal)
    D, I = index.search(to_float32(xq), k)
    return D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)


@torch.no_grad()
def exact_search(xb_shards: np.ndarray | Sequence[np.ndarray], xq: np.ndarray, k: int, chunk: int = 65536,
                 query_batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by brute force: D float32 (B, k) squared L2 ascending, I int64 (B, k).

    Uses torch (MKL) matmul + topk: on this CPU it beats faiss' flat search, whose bundled OpenBLAS is
    mis-detected. The database is read ``chunk`` rows at a time (cast to float32) and each chunk's top-k is
    merged into a running top-k, so memory stays O(query_batch * (chunk + k)) whatever N. Distances use
    |q|^2 + |x|^2 - 2 q.x in float32, like faiss, clamped at 0.
    """
    xb = as_rows(xb_shards)
    n = len(xb)
    _check_k(k, n)
    q_all = as_float32_tensor(xq)
    B = q_all.shape[0]
    D_out = np.empty((B, k), dtype=np.float32)
    I_out = np.empty((B, k), dtype=np.int64)
    # Outer loop over database chunks so each chunk is read (and converted) once for all queries.
    best_D = torch.full((B, k), float("inf"))
    best_I = torch.full((B, k), -1, dtype=torch.int64)
    q_norm = (q_all * q_all).sum(1, keepdim=True)
    for start in range(0, n, chunk):
        x = as_float32_tensor(xb[start:start + chunk])
        x_norm = (x * x).sum(1)
        kc = min(k, x.shape[0])
        for qs in range(0, B, query_batch):
            q = q_all[qs:qs + query_batch]
            dist = torch.addmm(q_norm[qs:qs + query_batch] + x_norm, q, x.T, alpha=-2.0).clamp_min_(0.0)
            d_c, i_c = torch.topk(dist, kc, dim=1, largest=False, sorted=True)
            d_m = torch.cat([best_D[qs:qs + query_batch], d_c], 1)
            i_m = torch.cat([best_I[qs:qs + query_batch], i_c + start], 1)
            d_top, pos = torch.topk(d_m, k, dim=1, largest=False, sorted=True)
            best_D[qs:qs + query_batch] = d_top
            best_I[qs:qs + query_batch] = torch.gather(i_m, 1, pos)
    D_out[:] = best_D.numpy()
    I_out[:] = best_I.numpy()
    return D_out, I_out


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean over queries of the fraction of exact neighbours (ids >= 0 in I_exact) present in I_approx's row.

    I_approx (B, k') and I_exact (B, k) int; k' may differ from k. Order within a row is ignored.
    """
    I_approx, I_exact = np.asarray(I_approx, np.int64), np.asarray(I_exact, np.int64)
    if I_approx.shape[0] != I_exact.shape[0]:
        raise ValueError(f"recall_at_k: {I_approx.shape[0]} approximate rows vs {I_exact.shape[0]} exact rows")
    B = I_exact.shape[0]
    if B == 0:
        return float("nan")
    # Offset ids by row so one vectorised membership test handles all rows at once.
    span = int(max(I_exact.max(initial=0), I_approx.max(initial=0))) + 1
    rows = np.arange(B, dtype=np.int64)[:, None] * span
    ex_valid = I_exact >= 0
    ap_keys = (I_approx + rows)[I_approx >= 0]
    found = np.isin(I_exact + rows, ap_keys) & ex_valid
    n_valid = ex_valid.sum(1)
    per_row = np.where(n_valid > 0, found.sum(1) / np.maximum(n_valid, 1), 1.0)
    return float(per_row.mean())
