"""`mlpmem bench` on a tiny random model with tiny datastores: every section present, every number sane."""

import json
import math

import numpy as np
import pytest

from helpers import tiny_config
from mlpmem import bench
from mlpmem.components.index import ivfpq_spec


def test_bench_streams_sizes_above_flat_max(tmp_path):
    """Above --bench.flat_max a size is IVFPQ only and its keys are streamed; ratios use each index's largest size."""
    cfg = tiny_config(tmp_path, "llama", **{
        "bench.sizes": [200, 450], "bench.flat_max": 300, "bench.real_keys": 150, "bench.tokens": 40,
        "bench.train_steps": 1, "bench.repeats": 1, "bench.ivf_train_size": 300, "index.nprobe": 2,
        "train.batch_size": 16, "bench.memory_blocks": [1]})
    res = bench.run(cfg)
    big = res["inference"][1]
    assert big["size"] == 450 and "base+knn-flat" not in big["systems"] and "base+knn-ivfpq" in big["systems"]
    assert res["storage"][1]["flat_index_bytes"] is None and "flat" not in res["index"][1]
    assert res["index"][1]["ivfpq"]["bytes"] > res["index"][0]["ivfpq"]["bytes"]
    r = res["ratios"]
    assert r["largest_size_flat"] == 200 and r["largest_size_ivfpq"] == 450
    assert r["component_us_per_token"]["base+knn-flat"][1] is None
    assert "| 450 | " in res["table"] and " - |" in res["table"]
    # beyond --bench.flat_max the keys are not held: kNN-LM there uses the index's distances, and says so
    assert res["index"][0]["ivfpq"]["distances"] == res["index"][0]["flat"]["distances"] == "exact"
    assert res["index"][1]["ivfpq"]["distances"] == "index"


def test_bench_smoke(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "llama", **{
        "bench.sizes": [400, 200], "bench.real_keys": 300, "bench.tokens": 96, "bench.train_steps": 1,
        "bench.ivf_train_size": 300, "index.nprobe": 2, "train.batch_size": 32, "bench.memory_blocks": [1, 0]})
    res = bench.run(cfg)
    saved = json.loads((tmp_path / "run" / "bench" / "bench.json").read_text())
    assert (tmp_path / "run" / "bench" / "bench.png").stat().st_size > 0
    for section in ("setup", "extraction", "inference", "index", "storage", "training", "ratios", "notes", "table"):
        assert section in saved, section
    assert [r["size"] for r in saved["inference"]] == [200, 400]
    for row in saved["inference"]:
        # the tiny LM has 2 layers: 1 block, then the depth rule's 3 (1.5 x 2 layers)
        assert list(row["systems"]) == ["base", "base+memory-1b", "base+memory-3b", "base+knn-flat",
                                        "base+knn-ivfpq"]
        for s in row["systems"].values():
            assert s["tokens_per_s"] > 0 and s["tokens"] == 96 and math.isfinite(s["base_ppl"])
    for row in saved["index"]:
        assert row["flat"]["factory"] == "Flat" and row["ivfpq"]["factory"].startswith("IVF")
        assert row["flat"]["build_s"] >= 0 and row["ivfpq"]["bytes"] > 0
    for st in saved["storage"]:
        assert st["datastore_bytes"] == st["size"] * (32 * 2 + 4)
        assert st["flat_index_bytes"] >= st["size"] * 32 * 4
        assert 0 < st["memory_bytes"]["base+memory-1b"] < st["memory_bytes"]["base+memory-3b"]
    e = saved["extraction"]
    assert e["positions"] == 300 and e["bare_tokens_per_s"] > 0 and e["extract_tokens_per_s"] > 0
    t = saved["training"]
    assert t["memory"] == "memory-1b"
    for name in ("sparse", "sparse-autograd", "dense", "dense-loop"):
        assert t[name]["tokens_per_s"] > 0 and t[name]["loss_only_tokens_per_s"] > 0
        for key in ("step_peak_bytes", "loss_forward_peak_bytes", "loss_peak_bytes"):
            assert t[name][key] >= 0, key
    r = saved["ratios"]
    for key in ("memory_over_base", "speedup_memory_vs_knn_flat_largest", "speedup_memory_vs_knn_ivfpq_largest",
                "component_speedup_memory_vs_knn_ivfpq_largest"):
        assert set(r[key]) == {"base+memory-1b", "base+memory-3b"}, key
        assert all(v > 0 and math.isfinite(v) for v in r[key].values()), key
    assert r["extraction_over_bare"] > 0
    assert set(r["train_sparse_vs"]) == {"sparse-autograd", "dense", "dense-loop"}
    for v in r["train_sparse_vs"].values():
        assert all(x > 0 and math.isfinite(x) for x in v.values())
    assert res["ratios"] == saved["ratios"]
    out = capsys.readouterr().out
    assert "Inference tokens/s" in out and "Ratios:" in out


def test_synth_datastore_tiles_real_keys_with_noise():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 8)).astype(np.float16)
    vals = np.arange(50, dtype=np.int32)
    k, v = bench.synth_datastore(keys, vals, 30, 0.05, 0)
    assert k.shape == (30, 8) and (k == keys[:30]).all() and (v == vals[:30]).all()
    k, v = bench.synth_datastore(keys, vals, 175, 0.05, 0)
    assert k.shape == (175, 8) and k.dtype == np.float16 and (k[:50] == keys).all()
    assert (v == np.resize(vals, 175)).all()
    diff = k[50:].astype(np.float32) - keys[np.arange(50, 175) % 50].astype(np.float32)
    assert 0 < np.abs(diff).mean() < 0.2  # distinct but close copies
    assert len({r.tobytes() for r in k}) == 175
    # any row range streams out the same rows as the prefix held in RAM (chunk c's noise is seeded by c)
    monkey = bench.SYNTH_CHUNK
    try:
        bench.SYNTH_CHUNK = 16
        k, v = bench.synth_datastore(keys, vals, 175, 0.05, 0)
        parts = list(bench.synth_chunks(keys, vals, 37, 175, 0.05, 0))
        assert parts[0][0] == 37 and sum(len(p[1]) for p in parts) == 175 - 37
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), k[37:])
        np.testing.assert_array_equal(np.concatenate([p[2] for p in parts]), v[37:])
        later = list(bench.synth_chunks(keys, vals, 90, 120, 0.05, 0))
        np.testing.assert_array_equal(np.concatenate([p[1] for p in later]), k[90:120])
    finally:
        bench.SYNTH_CHUNK = monkey


@pytest.mark.parametrize("n,d,n_train,expect", [(1_000_000, 576, 65536, "IVF1024,PQ64"),
                                                 (100_000, 576, 65536, "IVF1024,PQ64"),
                                                 (10_000, 576, 10_000, "IVF256,PQ64"),
                                                 (1_000_000, 576, 1_000_000, "IVF4096,PQ64"),
                                                 (200, 32, 200, "IVF4,PQ32x2")])
def test_ivfpq_factory(n, d, n_train, expect):
    assert ivfpq_spec(n, d, n_train) == expect


def test_bench_losses_agree():
    """Every loss the bench times computes the same loss and gradient (they differ only in how)."""
    import torch

    from mlpmem.bench.train import _fake_targets, loss_fns

    gen = torch.Generator().manual_seed(0)
    ids, probs, labels = _fake_targets(6, 8, 50, gen)
    base = torch.randn(6, 50, generator=gen)
    out = {}
    for name, fn in loss_fns().items():
        z = base.clone().requires_grad_(True)
        loss = fn(z, ids, probs, labels, 0.4).loss
        loss.backward()
        out[name] = (loss.item(), z.grad)
    ref_loss, ref_grad = out["dense"]
    for name, (loss, grad) in out.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=name)
