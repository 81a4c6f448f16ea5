"""Index stage: factory resolution, IVF at full nprobe = flat, exact search = IndexFlatL2, recall, errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from mlpmem.components.index import (ConcatRows, build_index, exact_search, load_index, recall_at_k, resolve_factory,
                          save_index, search)
from mlpmem.files import StageError

N, DIM = 3000, 32





@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float16)


@pytest.fixture(scope="module")
def shards(keys) -> list[np.ndarray]:
    return [keys[:1100], keys[1100:]]


@pytest.fixture(scope="module")
def xq(keys) -> np.ndarray:
    return keys[::37].astype(np.float32) + 0.1 * np.random.default_rng(1).standard_normal((len(keys[::37]), DIM),
                                                                                          dtype=np.float32)


def flat_reference(keys: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ref = faiss.IndexFlatL2(keys.shape[1])
    ref.add(keys.astype(np.float32))
    return ref.search(xq, k)


def test_resolve_factory():
    assert resolve_factory("auto", 1000) == "Flat"
    assert resolve_factory("auto", 199_999) == "Flat"
    assert resolve_factory("auto", 1_000_000) == "IVF4096,PQ64"  # 4*sqrt(1M) = 4000 -> 4096
    assert resolve_factory("auto", 10**11) == "IVF65536,PQ64"  # capped
    assert resolve_factory("auto", 1_000_000, d=576) == "IVF4096,PQ64"  # 576 = 64 * 9
    assert resolve_factory("auto", 1_000_000, d=100) == "IVF4096,PQ50"  # PQ m must divide d
    assert resolve_factory("IVF16,PQ8", 500, d=32) == "IVF16,PQ8"
    with pytest.raises(ValueError, match="--index.factory"):
        resolve_factory("IVF16,Bogus", 500, d=32)
    with pytest.raises(ValueError, match="--index.factory"):
        resolve_factory("PQ7", 500, d=32)  # 7 does not divide 32


def test_concat_rows_matches_concatenate(keys, shards):
    view = ConcatRows(shards, offsets=[0, 1100])
    assert view.shape == keys.shape and len(view) == N and view.dtype == np.float16
    np.testing.assert_array_equal(view[1000:1200], keys[1000:1200])  # across the shard boundary
    np.testing.assert_array_equal(view[5:7], keys[5:7])
    ids = np.array([2999, 0, 1100, 1099, 5, 5])
    np.testing.assert_array_equal(view[ids], keys[ids])
    np.testing.assert_array_equal(view[1100], keys[1100])
    with pytest.raises(ValueError, match="consecutive"):
        ConcatRows(shards, offsets=[0, 1000])


def test_ivf_full_nprobe_equals_flat(shards, keys, xq, tmp_path):
    index = build_index(shards, "IVF16,Flat", train_size=2000, add_chunk=700, seed=0, use_gpu="no", progress=False)
    assert index.ntotal == N
    path = tmp_path / "knn.index"
    save_index(index, path)
    assert [p.name for p in tmp_path.iterdir()] == ["knn.index"]  # no temp file left behind
    index = load_index(path, nprobe=16)
    assert faiss.extract_index_ivf(index).nprobe == 16
    D, I = search(index, xq, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and I.shape == (len(xq), 10)
    D_ref, I_ref = flat_reference(keys, xq, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-4)


def test_build_is_deterministic(shards):
    a = build_index(shards, "IVF8,PQ4x4", train_size=1000, add_chunk=1000, seed=3, use_gpu="no", progress=False)
    b = build_index(shards, "IVF8,PQ4x4", train_size=1000, add_chunk=1000, seed=3, use_gpu="no", progress=False)
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b))


def test_exact_search_equals_indexflat(shards, keys, xq):
    # chunk < N and k > chunk exercise the running top-k merge across database chunks
    D, I = exact_search(shards, xq, k=300, chunk=256, query_batch=30)
    D_ref, I_ref = flat_reference(keys, xq, 300)
    assert D.dtype == np.float32 and I.dtype == np.int64
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-3)


def test_recall_at_k(shards, keys, xq):
    D_ex, I_ex = exact_search(shards, xq, k=20)
    assert recall_at_k(I_ex, I_ex) == 1.0
    assert recall_at_k(I_ex[:, ::-1], I_ex) == 1.0  # order does not matter
    pq = build_index(shards, "PQ4x4", train_size=2000, add_chunk=N, seed=0, use_gpu="no", progress=False)
    _, I_pq = search(pq, xq, 20)
    r = recall_at_k(I_pq, I_ex)
    assert 0.0 < r < 1.0
    # hand-made: row 0 finds 1 of 2, row 1 finds 2 of 2 -> 0.75; -1 never counts
    assert recall_at_k(np.array([[1, -1], [3, 4]]), np.array([[1, 2], [4, 3]])) == 0.75


def test_k_larger_than_datastore(keys, xq):
    index = faiss.IndexFlatL2(DIM)
    index.add(keys[:50].astype(np.float32))
    with pytest.raises(ValueError, match=r"k=51 larger than the datastore \(50 keys\): lower --knn.k"):
        search(index, xq, 51)
    with pytest.raises(ValueError, match="lower --knn.k"):
        exact_search(keys[:50], xq, 51)


def test_load_index_errors(tmp_path):
    with pytest.raises(StageError, match="mlpmem index"):
        load_index(tmp_path / "missing.index")
    bad = tmp_path / "bad.index"
    bad.write_bytes(b"not a faiss index at all")
    with pytest.raises(StageError, match="mlpmem index"):
        load_index(bad)


def test_use_gpu_yes_without_gpu(shards):
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="--index.use_gpu"):
        build_index(shards, "IVF8,Flat", 1000, 1000, 0, use_gpu="yes", progress=False)
