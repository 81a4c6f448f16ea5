"""`mlpmem bench` on a tiny random model with tiny datastores: every section present, every number sane."""

import json
import math

import numpy as np
import pytest

from helpers import tiny_config
from mlpmem import bench


def test_bench_smoke(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "llama", **{
        "bench.sizes": [400, 200], "bench.real_keys": 300, "bench.tokens": 96, "bench.train_steps": 1,
        "bench.ivf_train_size": 300, "index.nprobe": 2, "train.batch_size": 32})
    res = bench.run(cfg)
    saved = json.loads((tmp_path / "run" / "bench" / "bench.json").read_text())
    assert (tmp_path / "run" / "bench" / "bench.png").stat().st_size > 0
    for section in ("setup", "extraction", "inference", "index", "storage", "training", "ratios", "notes", "table"):
        assert section in saved, section
    assert [r["size"] for r in saved["inference"]] == [200, 400]
    for row in saved["inference"]:
        assert set(row["systems"]) == set(bench.SYSTEMS)
        for s in row["systems"].values():
            assert s["tokens_per_s"] > 0 and s["tokens"] == 96 and math.isfinite(s["base_ppl"])
    for row in saved["index"]:
        assert row["flat"]["factory"] == "Flat" and row["ivfpq"]["factory"].startswith("IVF")
        assert row["flat"]["build_s"] >= 0 and row["ivfpq"]["bytes"] > 0
    for st in saved["storage"]:
        assert st["datastore_bytes"] == st["size"] * (32 * 2 + 4)
        assert st["flat_index_bytes"] >= st["size"] * 32 * 4 and st["memory_bytes"] > 0
    e = saved["extraction"]
    assert e["positions"] == 300 and e["bare_tokens_per_s"] > 0 and e["extract_tokens_per_s"] > 0
    t = saved["training"]
    for name in ("sparse", "dense"):
        assert t[name]["tokens_per_s"] > 0 and t[name]["loss_only_tokens_per_s"] > 0
        for key in ("step_peak_bytes", "loss_forward_peak_bytes", "loss_peak_bytes"):
            assert t[name][key] >= 0, key
    r = saved["ratios"]
    for key in ("memory_over_base", "speedup_memory_vs_knn_flat_largest", "speedup_memory_vs_knn_ivfpq_largest",
                "extraction_over_bare", "train_speedup_sparse_vs_dense"):
        assert r[key] > 0 and math.isfinite(r[key]), key
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


@pytest.mark.parametrize("n,d,n_train,expect", [(1_000_000, 576, 65536, "IVF1024,PQ64"),
                                                 (100_000, 576, 65536, "IVF1024,PQ64"),
                                                 (10_000, 576, 10_000, "IVF256,PQ64"),
                                                 (1_000_000, 576, 1_000_000, "IVF4096,PQ64"),
                                                 (200, 32, 200, "IVF4,PQ32x2")])
def test_ivfpq_factory(n, d, n_train, expect):
    assert bench.ivfpq_factory(n, d, n_train) == expect
