"""kNN maths against dense references, leave-one-out by id, and the resumable targets stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlpmem.components.knn as knn
from mlpmem.components.index import build_index
from mlpmem.components.knn import (compute_targets, knn_gold_logprobs, leave_one_out_mask, neighbour_weights,
                        recompute_distances, renormalise_float16, same_document_mask, sparse_knn_distribution)
from mlpmem.components.sparse import CsrRows, CsrSink, FixedWidthSink
from mlpmem.files import Progress



# ----------------------------------------------------------------------------- references

def dense_reference(D, I, vals, T, query_ids=None, V=None) -> np.ndarray:
    """(B, V) float64 p_kNN built the obvious way: softmax over valid neighbours, dense scatter_add."""
    I = np.asarray(I, np.int64)
    valid = I >= 0
    if query_ids is not None:
        valid &= I != np.asarray(query_ids)[:, None]
    logits = torch.from_numpy(-np.asarray(D, np.float64) / T).masked_fill(~torch.from_numpy(valid), -np.inf)
    w = torch.softmax(logits, 1).nan_to_num(0.0)
    tok = torch.from_numpy(np.where(valid, vals[np.where(valid, I, 0)], 0).astype(np.int64))
    return torch.zeros(I.shape[0], V, dtype=torch.float64).scatter_add_(1, tok, w).numpy()


def densify(ids: np.ndarray, probs: np.ndarray, V: int) -> np.ndarray:
    out = np.zeros((ids.shape[0], V))
    for b in range(ids.shape[0]):
        keep = ids[b] >= 0
        assert len(set(ids[b][keep].tolist())) == keep.sum(), "ids must be distinct within a row"
        out[b, ids[b][keep]] = probs[b][keep]
    return out


@pytest.fixture
def neighbours():
    """Random neighbour lists with repeated tokens, -1 ids, and the query's own id at random places."""
    rng = np.random.default_rng(0)
    B, k, N, V = 64, 32, 500, 20
    vals = rng.integers(0, V, N).astype(np.int32)
    I = rng.integers(0, N, (B, k)).astype(np.int64)
    qids = rng.integers(0, N, B)
    own = rng.random(B) < 0.7
    I[own, rng.integers(0, k, B)[own]] = qids[own]
    I[rng.random((B, k)) < 0.05] = -1
    D = np.sort(rng.random((B, k)).astype(np.float32) * 40, axis=1)
    return D, I, vals, qids, V


# ----------------------------------------------------------------------------- leave-one-out

def test_leave_one_out_drops_own_id_wherever_it_is():
    # row 5 duplicates row 17 exactly: both are hits at distance 0, in either order
    I = np.array([[5, 17, 3], [17, 5, 3], [1, 2, 3], [-1, 9, 9]])
    q = np.array([5, 5, 9, 9])
    m = leave_one_out_mask(I, q)
    np.testing.assert_array_equal(m, [[False, True, True],  # own id first: dropped, duplicate kept
                                      [True, False, True],  # own id second: still the one dropped
                                      [True, True, True],   # own id absent: nothing dropped
                                      [False, False, False]])
    np.testing.assert_array_equal(leave_one_out_mask(I, None), I >= 0)


def test_duplicate_key_is_kept_in_targets(tmp_path):
    rng = np.random.default_rng(1)
    N, d = 200, 16
    keys = (rng.standard_normal((N, d)) * 4).astype(np.float16)
    keys[17] = keys[5]
    vals = rng.integers(0, 10, N).astype(np.int32)
    vals[17], vals[5] = 99, 98  # tokens nobody else has
    index = build_index(keys, "Flat", N, N, 0, use_gpu="no", progress=False)
    out_ids, out_probs = np.zeros((N, 4), np.int32), np.zeros((N, 4), np.float16)
    stats = compute_targets(index, keys, vals, FixedWidthSink(out_ids, out_probs), k=4, temperature=1.0,
                            distances="exact", query_batch=64, progress=Progress(tmp_path / "p.json", "x"),
                            show_progress=False)
    # at distance 0 the duplicate dominates: row 5's target is its twin's token, and vice versa
    assert out_ids[5, 0] == 99 and out_probs[5, 0] > 0.99
    assert out_ids[17, 0] == 98 and out_probs[17, 0] > 0.99
    assert 98 not in out_ids[5] and 99 not in out_ids[17]  # the own token only comes via the own id: gone
    assert stats["self_found_fraction"] == 1.0


# ----------------------------------------------------------------------------- weights and distributions

def test_neighbour_weights():
    D = np.array([[1e6, 1e6 + 1, 1e6 + 2], [0.0, 1.0, 5.0], [1.0, 2.0, 3.0]], np.float32)
    valid = np.array([[True, True, True], [True, False, True], [False, False, False]])
    w = neighbour_weights(D, 1.0, valid)
    assert w.dtype == np.float32 and np.isfinite(w).all()
    np.testing.assert_allclose(w[0], torch.softmax(torch.tensor([0.0, -1.0, -2.0]), 0).numpy(), rtol=1e-6)
    assert w[1, 1] == 0 and abs(w[1].sum() - 1) < 1e-6
    np.testing.assert_array_equal(w[2], 0)
    with pytest.raises(ValueError, match="temperature"):
        neighbour_weights(D, 0.0)


def test_sparse_equals_dense_reference(neighbours):
    D, I, vals, qids, V = neighbours
    ids, probs, dropped = sparse_knn_distribution(D, I, vals, 7.0, query_ids=qids)
    assert ids.dtype == np.int32 and probs.dtype == np.float32 and dropped.dtype == np.float32
    assert ids.shape == probs.shape == I.shape
    ref = dense_reference(D, I, vals, 7.0, qids, V)
    np.testing.assert_allclose(densify(ids, probs, V), ref, atol=1e-6)
    np.testing.assert_array_equal(dropped, 0)
    assert np.all(np.diff(probs, axis=1) <= 0), "sorted by probability, descending"
    assert np.all((ids >= 0) == (probs > 0))


def test_sparse_truncation_reports_dropped_mass(neighbours):
    D, I, vals, qids, V = neighbours
    K = 3
    ids, probs, dropped = sparse_knn_distribution(D, I, vals, 7.0, query_ids=qids, max_ids=K)
    ref = dense_reference(D, I, vals, 7.0, qids, V)
    top = np.argsort(-ref, axis=1, kind="stable")[:, :K]
    top_p = np.take_along_axis(ref, top, 1)
    assert ids.shape == (len(I), K)
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(top, 1))
    np.testing.assert_allclose(dropped, 1 - top_p.sum(1), atol=1e-6)
    np.testing.assert_allclose(probs, top_p / top_p.sum(1, keepdims=True), atol=1e-6)
    # wider than k: padded with -1 / 0
    ids_w, probs_w, _ = sparse_knn_distribution(D, I, vals, 7.0, query_ids=qids, max_ids=40)
    assert ids_w.shape == (len(I), 40) and (ids_w[:, 32:] == -1).all() and (probs_w[:, 32:] == 0).all()


def test_knn_gold_logprobs_matches_dense(neighbours):
    D, I, vals, qids, V = neighbours
    gold = np.random.default_rng(2).integers(0, V, len(I))
    temps = [0.5, 4.0, 16.0]
    lp = knn_gold_logprobs(D, I, vals, gold, temps, query_ids=qids)
    assert lp.shape == (3, len(I)) and lp.dtype == np.float64
    with np.errstate(divide="ignore"):
        ref = np.stack([np.log(dense_reference(D, I, vals, T, qids, V)[np.arange(len(I)), gold]) for T in temps])
    assert np.isneginf(ref).any(), "fixture should include golds that were not retrieved"
    np.testing.assert_allclose(lp, ref, rtol=1e-9)


def test_recompute_distances():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((100, 16)).astype(np.float16)
    xq = rng.standard_normal((5, 16)).astype(np.float32)
    I = rng.integers(0, 100, (5, 7))
    I[0, 3] = -1
    D = recompute_distances([keys[:40], keys[40:]], xq, I, block_elems=50)
    ref = ((keys[np.where(I < 0, 0, I)].astype(np.float64) - xq[:, None].astype(np.float64)) ** 2).sum(-1)
    ok = I >= 0
    np.testing.assert_allclose(D[ok], ref[ok], rtol=1e-5)
    assert np.isinf(D[0, 3])
    np.testing.assert_allclose(recompute_distances(lambda ids: keys[ids], xq, I), D)


def test_renormalise_float16():
    p = np.random.default_rng(4).dirichlet(np.full(1024, 0.05), size=50).astype(np.float32)
    p16 = renormalise_float16(p)
    assert p16.dtype == np.float16
    assert np.abs(p16.astype(np.float64).sum(1) - 1).max() < 1e-3
    np.testing.assert_array_equal(renormalise_float16(np.zeros((2, 4), np.float32)), 0)


# ----------------------------------------------------------------------------- the targets stage

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 3000-row fp16 datastore in two shard memmaps, int32 values, and a flat index over it."""
    d = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(5)
    N, dim = 3000, 16
    keys = (rng.standard_normal((N, dim)) * 3).astype(np.float16)
    np.save(d / "keys-00000-of-00002.npy", keys[:1700])
    np.save(d / "keys-00001-of-00002.npy", keys[1700:])
    shards = [np.load(d / f"keys-0000{i}-of-00002.npy", mmap_mode="r") for i in range(2)]
    vals = rng.integers(0, 50, N).astype(np.int32)
    index = build_index(shards, "Flat", N, 1000, 0, use_gpu="no", progress=False)
    return shards, vals, index


def _run(store, out_dir, k=16, K=12, fail_on_call=None, monkeypatch=None, distances="index"):
    """compute_targets into a CSR set in out_dir (offsets.npy, ids.npy, probs.npy), at most K ids per row."""
    shards, vals, index = store
    N = index.ntotal
    sink = CsrSink(out_dir, "", N)
    progress = Progress(out_dir / "progress.json", fp="test")
    if fail_on_call is not None:
        calls = {"n": 0}
        real = knn.search

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == fail_on_call:
                raise KeyboardInterrupt("killed mid-run")
            return real(*a, **kw)

        monkeypatch.setattr(knn, "search", flaky)
    try:
        stats = compute_targets(index, shards, vals, sink, k=k, temperature=5.0, distances=distances,
                                query_batch=500, progress=progress, show_progress=False, max_ids=K)
        sink.close()
        return stats
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def _fixed(out_dir):
    """The CSR set in out_dir as fixed-width (N, K) arrays padded with -1 / 0."""
    rows = CsrRows([tuple(np.load(out_dir / f"{n}.npy") for n in ("offsets", "ids", "probs"))])
    return rows.rows(np.arange(len(rows)))


def test_compute_targets_resume_is_byte_identical(store, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    stats = _run(store, full)
    with pytest.raises(KeyboardInterrupt):
        _run(store, cut, fail_on_call=3, monkeypatch=monkeypatch)  # dies inside the third block
    assert Progress(cut / "progress.json", fp="test").done == 1000  # two whole blocks were recorded
    resumed = _run(store, cut)
    assert resumed["rows"] == 2000
    for name in ("offsets.npy", "ids.npy", "probs.npy"):
        assert (full / name).read_bytes() == (cut / name).read_bytes(), name

    ids, probs = _fixed(full)
    probs = probs.astype(np.float64)
    assert np.abs(probs.sum(1) - 1).max() < 1e-3, "fp16 probabilities renormalised"
    assert (probs[ids < 0] == 0).all() and (ids[:, 0] >= 0).all()
    assert stats["rows"] == 3000 and stats["queries_per_s"] > 0
    assert stats["self_found_fraction"] == 1.0  # flat search always retrieves the query itself
    assert 1 <= stats["mean_distinct_ids"] <= 12
    assert 0 <= stats["mean_dropped_mass"] < 1


def test_compute_targets_matches_dense_reference(store, tmp_path):
    """End to end for a few rows: search k+1 exactly, drop own id, dense reference, fp16 storage."""
    shards, vals, index = store
    _run(store, tmp_path, k=16, K=16, distances="exact")
    keys = np.concatenate(shards)
    rows = np.arange(0, 3000, 97)
    xq = keys[rows].astype(np.float32)
    D = ((keys[None].astype(np.float64) - xq[:, None]) ** 2).sum(-1)
    D[np.arange(len(rows)), rows] = np.inf  # leave-one-out
    I = np.argsort(D, 1, kind="stable")[:, :16]
    ref = dense_reference(np.take_along_axis(D, I, 1), I, vals, 5.0, None, 50)
    ids, probs = _fixed(tmp_path)
    got = densify(ids[rows], probs[rows].astype(np.float64), 50)
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_compute_targets_subset_rows(store, tmp_path):
    shards, vals, index = store
    rows = np.arange(100, 260)
    out_ids, out_probs = np.zeros((len(rows), 8), np.int32), np.zeros((len(rows), 8), np.float16)
    compute_targets(index, shards, vals, FixedWidthSink(out_ids, out_probs), k=8, temperature=5.0,
                    distances="exact", query_batch=64, progress=Progress(tmp_path / "p.json", "sub"), rows=rows,
                    show_progress=False)
    full_ids, full_probs = np.zeros((3000, 8), np.int32), np.zeros((3000, 8), np.float16)
    compute_targets(index, shards, vals, FixedWidthSink(full_ids, full_probs), k=8, temperature=5.0,
                    distances="exact", query_batch=1000, progress=Progress(tmp_path / "q.json", "all"),
                    show_progress=False)
    np.testing.assert_array_equal(out_ids, full_ids[rows])
    np.testing.assert_allclose(out_probs.astype(np.float32), full_probs[rows].astype(np.float32), atol=1e-3)


def test_compute_targets_k_too_large(store, tmp_path):
    shards, vals, index = store
    with pytest.raises(ValueError, match="lower --knn.k"):
        compute_targets(index, shards, vals, FixedWidthSink(np.zeros((3000, 4), np.int32),
                                                            np.zeros((3000, 4), np.float16)),
                        k=3001, temperature=1.0, distances="index", query_batch=100,
                        progress=Progress(tmp_path / "p.json", "x"), show_progress=False)


# ----------------------------------------------------------------------------- leaving out the query's document

def test_same_document_mask():
    starts = np.array([0, 3, 4, 10])  # documents [0, 3), [3, 4), [4, 10); 10 is the stream length
    I = np.array([[0, 2, 3, -1], [3, 2, 4, 9], [9, 4, 5, 3]])
    got = same_document_mask(I, np.array([1, 3, 7]), starts)
    np.testing.assert_array_equal(got, [[True, True, False, False], [True, False, False, False],
                                        [True, True, True, False]])


@pytest.fixture(scope="module")
def doc_store():
    """1200 fp16 keys in 25 documents of random lengths, each document's keys around its own centre (so many
    neighbours lie in the query's document), one far-off document of 60 rows (every neighbour of its rows within
    it: they end up with no neighbour at all), and a flat index."""
    rng = np.random.default_rng(11)
    lens = rng.integers(1, 60, 24)
    lens[3] = 60  # the far-off document
    lens = np.append(lens, 1200 - lens.sum())
    starts = np.concatenate([[0], np.cumsum(lens)])
    doc = np.repeat(np.arange(len(lens)), lens)
    centres = rng.standard_normal((len(lens), 8)) * 1.5
    keys = centres[doc] + rng.standard_normal((1200, 8))
    keys[starts[3]:starts[4]] += 200.0
    vals = rng.integers(0, 30, 1200).astype(np.int32)
    keys = keys.astype(np.float16)
    index = build_index([keys], "Flat", 1200, 1200, 0, use_gpu="no", progress=False)
    return keys, vals, index, starts


def test_document_exclusion_matches_dense_reference(doc_store, tmp_path):
    """Sparse targets with --knn.exclude document = softmax over the k + 1 nearest minus every same-document row
    (the own row included), scattered densely; stats count what the document rule took away."""
    keys, vals, index, starts = doc_store
    N, k, T, V = len(keys), 16, 3.0, 30
    sink = CsrSink(tmp_path, "", N)
    stats = compute_targets(index, [keys], vals, sink, k=k, temperature=T, distances="exact", query_batch=256,
                            progress=Progress(tmp_path / "p.json", "doc"), show_progress=False, doc_starts=starts)
    sink.close()
    ids, probs = _fixed(tmp_path)

    x = keys.astype(np.float64)
    D = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # (N, N) exact
    I = np.argsort(D, 1, kind="stable")[:, :k + 1]  # what the flat index returns
    Dk = np.take_along_axis(D, I, 1)
    doc = np.searchsorted(starts, np.arange(N), side="right") - 1
    same = doc[I] == doc[:, None]
    own = I == np.arange(N)[:, None]
    keep = ~same & (np.cumsum(~same, 1) <= k)
    ref = dense_reference(Dk, np.where(keep, I, -1), vals, T, None, V)
    np.testing.assert_allclose(densify(ids, probs.astype(np.float64), V), ref, atol=2e-3)

    # no kept neighbour shares the query's document; rows with all k + 1 hits in their document are empty
    empty = ~keep.any(1)
    assert empty.sum() >= 60 and (ids[empty] == -1).all() and (probs[empty] == 0).all()
    assert (ids[~empty, 0] >= 0).all()
    by_id = ~own & (np.cumsum(~own, 1) <= k)  # leave-one-out by id: today's neighbours
    lost = by_id & same
    assert stats["dropped_same_doc"] == pytest.approx(lost.sum(1).mean())
    w = np.exp(-(Dk - Dk.min(1, keepdims=True)) / T) * by_id
    w = w / w.sum(1, keepdims=True)
    assert stats["dropped_same_doc_mass"] == pytest.approx((w * lost).sum(1).mean(), rel=1e-4)
    assert 0.2 < stats["dropped_same_doc_mass"] < 1
    assert stats["mean_neighbours"] == pytest.approx(keep.sum(1).mean())
    assert stats["empty_fraction"] == pytest.approx(empty.mean())


def test_document_exclusion_with_one_row_documents_is_leave_one_out(store, tmp_path):
    """With every row its own document the document rule drops only the own id: the same bytes as leave-one-out
    by id, which is what --knn.exclude position (no doc_starts) still computes."""
    shards, vals, index = store
    N = index.ntotal
    out = {}
    for name, starts in (("position", None), ("document", np.arange(N + 1))):
        d = tmp_path / name
        sink = CsrSink(d, "", N)
        st = compute_targets(index, shards, vals, sink, k=16, temperature=5.0, distances="exact", query_batch=500,
                             progress=Progress(d / "p.json", name), show_progress=False, max_ids=12,
                             doc_starts=starts)
        sink.close()
        out[name] = (b"".join((d / f"{n}.npy").read_bytes() for n in ("offsets", "ids", "probs")), st)
    assert out["position"][0] == out["document"][0]
    assert "dropped_same_doc" not in out["position"][1]
    assert out["document"][1]["dropped_same_doc"] == 0 and out["document"][1]["empty_fraction"] == 0
    assert out["document"][1]["mean_neighbours"] == 16
