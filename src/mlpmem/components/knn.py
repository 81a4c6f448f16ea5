"""kNN-LM maths on retrieved neighbours (pure, vectorised) and the core of the kNN-targets stage.

The datastore is row-aligned with the train token stream: row t holds key_t (float16, the hidden state at position
t) and vals[t] = token t+1 (int32). So a FAISS id IS a position, and leave-one-out means dropping the neighbour
whose id equals the query's own row id, wherever it appears in the list. (The authors' release drops the first hit
instead, which removes a legitimate duplicate and keeps the query itself whenever PQ error or a tie puts another
row first.)

Shapes: D (B, k) float32 squared L2, I (B, k) int64 row ids (-1: no hit), vals (N,) int32 next tokens.
Sparse targets: ids (B, K) int32 padded with -1, probs (B, K) sorted descending, summing to 1 over valid ids.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import faiss
import numpy as np
import torch
from mlpmem.components.index import ConcatRows, as_float32_tensor, as_rows, search, to_float32
from mlpmem.errors import ConfigError
from mlpmem.files import Progress
from mlpmem.runtime import fault_point, progress as progress_bar

log = logging.getLogger(__name__)

_NO_TOKEN = torch.iinfo(torch.int64).max  # sorts after every real token id
KeysLike = np.ndarray | ConcatRows | Sequence[np.ndarray] | Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- neighbours -> weights

def leave_one_out_mask(I: np.ndarray, query_ids: np.ndarray | None) -> np.ndarray:
    """bool (B, k): True for neighbours to keep. False where I < 0 (no hit) or I equals the query's own row id.

    Only the query's own id is removed (wherever it sits in the list); exact duplicates of the query stored at
    other positions are genuine evidence and stay. If the own id is not among the hits, nothing is removed.
    ``query_ids`` None: only the I < 0 rule (queries that are not datastore rows, e.g. evaluation text).
    """
    I = np.asarray(I)
    mask = I >= 0
    if query_ids is not None:
        q = np.asarray(query_ids, dtype=np.int64).reshape(-1, 1)
        if q.shape[0] != I.shape[0]:
            raise ValueError(f"query_ids has {q.shape[0]} entries for {I.shape[0]} queries")
        mask &= I != q
    return mask


def same_document_mask(I: np.ndarray, query_ids: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """bool (B, k): True where neighbour I lies in the same document as its query (False where I < 0).

    Datastore rows are positions of the train token stream, so a row's document is the last document start at or
    before it: ``searchsorted(doc_starts, row, side="right") - 1``. doc_starts: int64 (n_docs [+ 1],) ascending
    start positions (the prepared split's offsets; a trailing stream length is harmless).
    """
    I = np.asarray(I, dtype=np.int64)
    starts = np.asarray(doc_starts, dtype=np.int64)
    q = np.asarray(query_ids, dtype=np.int64).reshape(-1, 1)
    if q.shape[0] != I.shape[0]:
        raise ValueError(f"query_ids has {q.shape[0]} entries for {I.shape[0]} queries")
    q_doc = np.searchsorted(starts, q, side="right") - 1
    nbr_doc = np.searchsorted(starts, I, side="right") - 1
    return (I >= 0) & (nbr_doc == q_doc)


def _log_weights(D, temperature: float, valid: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """log softmax(-D / T) over the valid neighbours of each row; -inf for invalid ones and for empty rows."""
    if not temperature > 0:
        raise ConfigError(f"--knn.temperature: must be > 0, got {temperature}")
    valid_t = torch.from_numpy(np.asarray(valid, dtype=bool))
    logits = torch.tensor(np.asarray(D), dtype=dtype).neg() / temperature  # a copy: D may be read-only
    logits = logits.masked_fill(~valid_t, float("-inf"))
    # Subtracting the row max keeps exp() in range: hidden-state distances run to 1e4+.
    m = logits.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = logits - m
    lse = torch.logsumexp(z, 1, keepdim=True)
    out = z - lse
    return out.masked_fill(~valid_t | ~torch.isfinite(lse), float("-inf"))


def neighbour_weights(D: np.ndarray, temperature: float, valid_mask: np.ndarray | None = None) -> np.ndarray:
    """float32 (B, k): softmax(-D / T) over the neighbours where ``valid_mask`` is True (default: all).

    Invalid neighbours get weight 0; a row with no valid neighbour is all zeros.
    """
    D = np.asarray(D)
    valid = np.ones(D.shape, dtype=bool) if valid_mask is None else np.asarray(valid_mask, dtype=bool)
    return _log_weights(D, temperature, valid, torch.float32).exp().numpy()


def _lookup_vals(vals, I: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """int64 (B, k): vals[I] where valid, -1 elsewhere (vals may be a memmap or consecutive shards)."""
    v = as_rows(vals)
    safe = np.where(valid, I, 0)
    return np.where(valid, v[safe.reshape(-1)].reshape(I.shape).astype(np.int64), -1)


def recompute_distances(keys: KeysLike, xq: np.ndarray, I: np.ndarray, block_elems: int = 1 << 23) -> np.ndarray:
    """Exact squared L2 (B, k) float32 between each query and its retrieved keys; +inf where I < 0.

    keys: (N, d) float16 array/memmap, consecutive shards, or a callable ``rows(ids) -> (len(ids), d)`` given
    sorted unique ids. The stored fp16 keys are cast to float32 and the difference is taken directly (no
    |q|^2 + |x|^2 - 2q.x expansion), so these are the datastore's true distances, unlike PQ-approximate ones.
    Each distinct id is read once, in increasing order (memmap locality); work is blocked to ``block_elems``.
    """
    I = np.asarray(I, dtype=np.int64)
    B, k = I.shape
    valid = I >= 0
    uniq, inv = np.unique(I[valid], return_inverse=True)
    getter = keys if callable(keys) else as_rows(keys).__getitem__
    rows = as_float32_tensor(getter(uniq))
    q = as_float32_tensor(xq)
    d = q.shape[1]
    if len(uniq) and rows.shape[1] != d:
        raise ValueError(f"queries have dim {d} but keys have dim {rows.shape[1]}")
    pos = np.zeros((B, k), dtype=np.int64)
    pos[valid] = inv
    pos_t = torch.from_numpy(pos)
    out = torch.full((B, k), float("inf"))
    if len(uniq):
        step = max(1, block_elems // max(1, k * d))
        for s in range(0, B, step):
            diff = rows[pos_t[s:s + step]] - q[s:s + step, None, :]
            out[s:s + step] = (diff * diff).sum(-1)
    out[~torch.from_numpy(valid)] = float("inf")
    return out.numpy()


# ----------------------------------------------------------------------------- sparse distribution

def sparse_knn_distribution(D: np.ndarray, I: np.ndarray, vals, temperature: float,
                            query_ids: np.ndarray | None = None, max_ids: int | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p_kNN(y) = sum_i w_i [vals[I_i] = y], w = softmax(-D/T) over kept neighbours, as a fixed-width sparse row.

    Returns ids int32 (B, K) padded with -1, probs float32 (B, K) sorted descending (ties: ascending token id),
    and dropped_mass float32 (B,): the probability of the distinct tokens beyond the K most probable, after which
    the kept probabilities are renormalised to sum 1. K = ``max_ids`` (default k). Tokens whose total weight
    underflows to exactly 0 are out of the support and not listed. A row without valid neighbours is all -1 / 0.
    Vectorised: tokens are sorted within each row and equal runs summed with scatter_add; nothing (B, V).
    """
    I = np.asarray(I, dtype=np.int64)
    B, k = I.shape
    K = k if max_ids is None else int(max_ids)
    if K < 1:
        raise ValueError(f"max_ids must be >= 1, got {K}")
    valid = leave_one_out_mask(I, query_ids)
    # float64 accumulation: many near-equal tiny weights summed per token.
    w = _log_weights(D, temperature, valid, torch.float64).exp()
    tok = torch.from_numpy(_lookup_vals(vals, I, valid))
    tok = torch.where((tok >= 0) & (w > 0), tok, torch.full_like(tok, _NO_TOKEN))

    tok_s, order = torch.sort(tok, dim=1, stable=True)
    w_s = torch.gather(w, 1, order)
    starts = torch.ones((B, k), dtype=torch.bool)
    starts[:, 1:] = tok_s[:, 1:] != tok_s[:, :-1]
    seg = starts.to(torch.int64).cumsum(1) - 1  # compact per-row index of each distinct token
    p = torch.zeros((B, k), dtype=torch.float64).scatter_add_(1, seg, w_s)
    seg_tok = torch.full((B, k), _NO_TOKEN, dtype=torch.int64).scatter_(1, seg, tok_s)
    p = p.masked_fill(seg_tok == _NO_TOKEN, 0.0)

    # Stable descending sort: segments are in ascending token order, so equal probabilities stay id-ordered.
    p, o2 = torch.sort(p, dim=1, descending=True, stable=True)
    seg_tok = torch.gather(seg_tok, 1, o2)
    if K < k:
        dropped = p[:, K:].sum(1)
        p, seg_tok = p[:, :K], seg_tok[:, :K]
    else:
        dropped = torch.zeros(B, dtype=torch.float64)
        p = torch.cat([p, p.new_zeros((B, K - k))], 1)
        seg_tok = torch.cat([seg_tok, seg_tok.new_full((B, K - k), _NO_TOKEN)], 1)
    kept = p.sum(1, keepdim=True)
    p = torch.where(kept > 0, p / kept.clamp_min(1e-300), p)
    ids = torch.where(seg_tok == _NO_TOKEN, torch.full_like(seg_tok, -1), seg_tok)
    return ids.to(torch.int32).numpy(), p.to(torch.float32).numpy(), dropped.to(torch.float32).numpy()


def renormalise_float16(probs: np.ndarray) -> np.ndarray:
    """(B, K) float32 probabilities -> float16 rows that sum to 1 as closely as float16 allows.

    Down-casting alone biases the sum (e.g. hundreds of tiny probabilities all rounding the same way). We cast,
    divide by the float32 sum of the float16 values, and cast again. Residual: the second cast rounds each value
    by at most 2^-11 of itself (plus <= 3e-8 absolute for float16 subnormals below 6.1e-5), so
    |sum - 1| <= 2^-11 + K * 3e-8 (about 5e-4 for K = 1024). Rounding errors mostly cancel: on random Dirichlet
    rows with K = 1024 the measured |sum - 1| is ~1e-5 on average, ~1e-4 at worst; there the rescale rarely moves
    a value by a whole ulp, so it only matters when the first cast's bias is larger. Consumers that need an exact
    1 can renormalise again in float32 on read. All-zero rows stay zero.
    """
    p16 = np.asarray(probs, dtype=np.float32).astype(np.float16)
    s = p16.astype(np.float32).sum(1, keepdims=True)
    safe = np.where(s > 0, s, np.float32(1.0))
    return (p16.astype(np.float32) / safe).astype(np.float16)


def knn_gold_logprobs(D: np.ndarray, I: np.ndarray, vals, gold: np.ndarray, temperatures: Sequence[float],
                      query_ids: np.ndarray | None = None) -> np.ndarray:
    """float64 (len(temperatures), B): log p_kNN(gold_b) per temperature; -inf where gold was not retrieved.

    Computed as logsumexp of the log weights of neighbours whose value is the gold token, in float64, so the
    kNN-LM perplexity sweep over temperatures needs one search only.
    """
    I = np.asarray(I, dtype=np.int64)
    gold = np.asarray(gold, dtype=np.int64).reshape(-1)
    if gold.shape[0] != I.shape[0]:
        raise ValueError(f"gold has {gold.shape[0]} tokens for {I.shape[0]} queries")
    valid = leave_one_out_mask(I, query_ids)
    hit = torch.from_numpy(valid & (_lookup_vals(vals, I, valid) == gold[:, None]))
    out = np.empty((len(temperatures), I.shape[0]), dtype=np.float64)
    for j, T in enumerate(temperatures):
        logw = _log_weights(D, float(T), valid, torch.float64)
        out[j] = torch.logsumexp(logw.masked_fill(~hit, float("-inf")), 1).numpy()
    return out


# ----------------------------------------------------------------------------- the targets stage core

def compute_targets(index: faiss.Index, key_shards, vals, sink, k: int, temperature: float, distances: str,
                    query_batch: int, progress: Progress, rows: np.ndarray | None = None, show_progress: bool = True,
                    queries=None, max_ids: int | None = None, doc_starts: np.ndarray | None = None) -> dict:
    """Write the sparse kNN targets of the datastore rows ``rows`` (default all N, in order) to ``sink``, resumably.

    index: FAISS index over the same keys (ids = row ids). key_shards: (N, d) float16 keys (array or consecutive
    shards); query t is key_t itself. vals: (N,) int32. sink: a :class:`mlpmem.components.sparse.TargetSink`
    (CSR files, or fixed-width arrays); the i-th requested row is its row i. ``max_ids``: keep only the K most
    probable distinct ids per row (the dropped mass is reported and the rest renormalised); None keeps them all.

    Per block of ``query_batch`` rows: search k + 1 neighbours (the query itself is usually a hit), drop the own
    id (leave-one-out, by id), keep the first k remaining, optionally recompute exact distances
    (``distances='exact'``; 'index' keeps the index's, PQ-approximate for IVFPQ), build the sparse distribution
    (truncated to K if asked), store probs as renormalised float16, flush, then advance ``progress`` (rows done and
    the sink's state). A killed run resumes at the last finished block and ends byte-identical to an uninterrupted
    one, provided ``progress``'s fingerprint covers everything that changes results (k, T, distances,
    query_batch, index, K).

    ``queries``: (M, d) keys that are not datastore rows (validation positions); then ``rows`` index them, k
    neighbours are searched and nothing is left out.

    ``doc_starts`` (``--knn.exclude document``): int64 document start positions of the stream the rows index (the
    prepared train split's offsets). Then every neighbour in the query's own document is left out too, not only
    the query itself: kNN-LM at test time never retrieves from the document it is scoring. Still k + 1 are
    searched, so a position keeps k minus its same-document hits; one whose hits all lie in its own document gets
    an empty row (its loss is then the CE term alone, see :class:`mlpmem.components.trainer.Targets`).

    Returns stats over the rows processed in this call: rows, seconds, queries_per_s, mean_distinct_ids,
    mean_dropped_mass, self_found_fraction (queries whose own id was among the k + 1 hits; < 1 flags PQ error).
    With ``doc_starts`` also: dropped_same_doc (mean count per position of the neighbours that leave-one-out by id
    would have kept, and that lie in the query's document), dropped_same_doc_mass (the weight they carried in that
    distribution, mean per position), mean_neighbours (kept per position) and empty_fraction (positions left with
    no neighbour).
    """
    if distances not in ("index", "exact"):
        raise ConfigError(f"--knn.distances: must be 'index' or 'exact', got {distances!r}")
    if query_batch < 1:
        raise ConfigError(f"--knn.query_batch: must be >= 1, got {query_batch}")
    keys = as_rows(key_shards)
    N = len(keys)
    own = queries is None  # queries are datastore rows: leave each one's own id out
    qsrc = keys if own else as_rows(queries)
    rows = np.arange(len(qsrc), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(as_rows(vals)) != N or index.ntotal != N:
        raise ValueError(f"datastore mismatch: {N} keys, {len(as_rows(vals))} values, index of {index.ntotal}: "
                         "rerun `mlpmem index` on these keys")
    if k > index.ntotal:
        raise ConfigError(f"k={k} larger than the datastore ({index.ntotal} keys): lower --knn.k")
    k_search = min(k + 1, index.ntotal) if own else k

    start = progress.done
    if not 0 <= start <= len(rows):
        raise ValueError(f"progress says {start} rows done of {len(rows)}: delete {progress.path} and rerun")
    if not sink.restore(progress.state, start):
        log.warning("knn targets: the partial outputs of an earlier run do not match its progress; starting over")
        start = 0
    by_doc = own and doc_starts is not None  # validation queries are other documents: nothing more to leave out
    if by_doc:
        doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if len(doc_starts) == 0 or doc_starts[0] != 0 or (np.diff(doc_starts) < 0).any():
            raise ValueError("doc_starts: expected ascending document starts beginning at 0 (the split's offsets)")
    n_done, distinct, dropped_sum, self_found = 0, 0, 0.0, 0
    same_n, same_mass, kept_n, empty_n = 0, 0.0, 0, 0
    t0 = time.perf_counter()
    with progress_bar(total=len(rows), initial=start, unit="q", unit_scale=True, desc="knn targets",
                      show=show_progress) as bar:
        # Blocks are fixed by query_batch from row 0, so a resumed run sees exactly the same blocks.
        for b0 in range(start, len(rows), query_batch):
            qids = rows[b0:b0 + query_batch]
            xq = to_float32(qsrc[qids[0]:qids[-1] + 1] if _is_range(qids) else qsrc[qids])
            D, I = search(index, xq, k_search)
            self_found += int((I == qids[:, None]).any(1).sum()) if own else 0
            keep = leave_one_out_mask(I, qids if own else None)
            if by_doc:
                # today's neighbours (leave-one-out by id), to measure what the document rule takes away
                by_id = keep & (np.cumsum(keep, axis=1) <= k)
                same = same_document_mask(I, qids, doc_starts) & keep
                keep &= ~same
                keep &= np.cumsum(keep, axis=1) <= k
                # distances of both neighbour sets (<= k + 1 distinct hits, as many as without the rule)
                I_all = np.where(by_id | keep, I, -1)
                if distances == "exact":
                    D = recompute_distances(keys, xq, I_all)
                lost = same & by_id
                same_n += int(lost.sum())
                same_mass += float((neighbour_weights(D, temperature, by_id).astype(np.float64) * lost).sum())
                kept_n += int(keep.sum())
                empty_n += int((~keep.any(1)).sum())
                I = np.where(keep, I, -1)
            else:
                # At most k neighbours: when the own id was not retrieved, the (k+1)-th is surplus.
                keep &= np.cumsum(keep, axis=1) <= k
                I = np.where(keep, I, -1)
                if distances == "exact":
                    D = recompute_distances(keys, xq, I)
            ids, probs, dropped = sparse_knn_distribution(D, I, vals, temperature, max_ids=max_ids)
            sink.append(b0, ids, renormalise_float16(probs))
            sink.flush()
            progress.update(b0 + len(qids), sink.state())  # only after the block is on disk
            fault_point("knn-targets.block")
            n_done += len(qids)
            distinct += int((ids >= 0).sum())
            dropped_sum += float(dropped.astype(np.float64).sum())
            bar.update(len(qids))
    dt = time.perf_counter() - t0
    stats = {
        "rows": n_done,
        "seconds": dt,
        "queries_per_s": n_done / dt if dt > 0 else float("nan"),
        "mean_distinct_ids": distinct / n_done if n_done else float("nan"),
        "mean_dropped_mass": dropped_sum / n_done if n_done else float("nan"),
        "self_found_fraction": self_found / n_done if n_done and own else float("nan"),
    }
    if by_doc:
        nan = float("nan")
        stats.update({"dropped_same_doc": same_n / n_done if n_done else nan,
                      "dropped_same_doc_mass": same_mass / n_done if n_done else nan,
                      "mean_neighbours": kept_n / n_done if n_done else nan,
                      "empty_fraction": empty_n / n_done if n_done else nan})
        log.info("knn targets: same-document neighbours left out: %.1f per position (%.1f%% of the mass), %.1f "
                 "neighbours kept, %.2e of positions left without any", stats["dropped_same_doc"],
                 100 * stats["dropped_same_doc_mass"], stats["mean_neighbours"], stats["empty_fraction"])
    log.info("knn targets: %d queries in %.1fs (%.0f q/s), %.1f distinct ids/row, dropped mass %.2e, own id "
             "found for %.4f", n_done, dt, stats["queries_per_s"], stats["mean_distinct_ids"],
             stats["mean_dropped_mass"], stats["self_found_fraction"])
    return stats


def _is_range(ids: np.ndarray) -> bool:
    return len(ids) > 0 and ids[-1] - ids[0] + 1 == len(ids) and bool(np.all(np.diff(ids) == 1))


# ----------------------------------------------------------------------------- kNN-LM scoring

def knn_scorer(index: faiss.Index, keys: KeysLike, vals, k: int, temperatures: Sequence[float], exact: bool
               ) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    """The kNN-LM term of evaluation: ``scorer(hidden (M, d), gold (M,)) -> log p_kNN(gold)`` float64
    (len(temperatures), M), from one search per batch (optionally re-ranked by exact distances from ``keys``)."""
    temps = [float(t) for t in temperatures]

    def scorer(hidden: torch.Tensor, gold: torch.Tensor) -> np.ndarray:
        xq = hidden.float().cpu().numpy()
        D, I = search(index, xq, k)
        if exact:
            D = recompute_distances(keys, xq, I)
        return knn_gold_logprobs(D, I, vals, gold.cpu().numpy(), temps)

    scorer.temperatures = temps  # the rows of what it returns, in order
    return scorer


def knn_logprobs(index: faiss.Index, keys: KeysLike, vals, k: int, temperature: float, exact: bool,
                 hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """kNN-LM's whole next-token distribution for (B, d) queries: log p_kNN, float32 (B, V), -inf off its support
    (for decoding, where every token's probability is needed; scoring needs only the gold's, knn_scorer)."""
    xq = hidden.float().cpu().numpy()
    D, I = search(index, xq, k)
    if exact:
        D = recompute_distances(keys, xq, I)
    ids, probs, _ = sparse_knn_distribution(D, I, vals, temperature)  # K = k: nothing is dropped
    out = torch.full((ids.shape[0], vocab_size), float("-inf"))
    rows, cols = np.nonzero(ids >= 0)
    with np.errstate(divide="ignore"):
        out[torch.from_numpy(rows), torch.from_numpy(ids[rows, cols].astype(np.int64))] = \
            torch.from_numpy(np.log(probs[rows, cols]))
    return out
