"""Stage `extract` on tiny GPT-2 / Llama models: alignment of keys and values, kill + resume, skip/refuse/force."""

import json

import numpy as np
import pytest
import torch

import mlpmem.components.extraction as extraction
import mlpmem.stages.extract as extract
from helpers import make_model_dir, make_texts, tiny_config, write_corpus
from pathlib import Path

from mlpmem.artifacts import Datastore, load_split
from mlpmem.stages import prepare
from mlpmem.components.capture import capture, resolve_hook
from mlpmem.components.data import plan_windows
from mlpmem.components.index import ConcatRows
from mlpmem.components.lm import load_lm
from mlpmem.errors import ConfigError
from mlpmem.files import StageError

SMALL = {"data.validation_fraction": 0.1, "data.test_fraction": 0.1, "train.val_positions": 40}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shared model dirs (GPT-2 and Llama, one tokenizer) and a ~2.5K-token corpus; runs go to per-test dirs."""
    root = tmp_path_factory.mktemp("assets")
    texts = make_texts(24, seed=1)
    for family in ("gpt2", "llama"):
        make_model_dir(root / f"model-{family}", family, texts=texts)
    write_corpus(root / "corpus.txt", texts)
    return root


def config(assets, out, family="gpt2", **overrides):
    return tiny_config(assets, family, out_dir=str(out), **{**SMALL, **overrides})


def files(stage_dir):
    """Every array and shard marker of a stage dir, by name -> bytes (manifests hold timings, so they are left out)."""
    return {p.relative_to(stage_dir).as_posix(): p.read_bytes() for p in sorted(stage_dir.rglob("*.npy"))}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keys_and_values_are_aligned_with_a_direct_forward(assets, tmp_path, family):
    # batch_size 3: batches mix full windows with the shorter last one (right padding inside a batch)
    cfg = config(assets, tmp_path / "run", family, **{"window.batch_size": 3})
    prepare.run(cfg)
    m = extract.run(cfg)
    lm = load_lm(cfg.model)
    hook = resolve_hook(lm.model, "auto")
    assert m["hook"] == str(hook)
    assert hook.module.endswith("ln_2" if family == "gpt2" else "post_attention_layernorm")
    assert m["key_dtype"] == "float16" and m["val_dtype"] == "int32"

    tokens, _ = load_split(cfg.run_dir, "train")
    ds = Datastore(cfg.run_dir, expect_model=lm.identity, expect_hook=str(hook))
    assert ds.n == len(tokens) - 1 == m["n_positions"]
    assert ds.vals.dtype == np.int32
    np.testing.assert_array_equal(ds.vals, tokens[1:])  # value of row t is token t + 1
    keys = ConcatRows(ds.keys)
    assert keys.dtype == np.float16 and keys.shape == (ds.n, lm.identity["hidden_size"])

    windows = plan_windows(len(tokens), cfg.window.context, cfg.window.stride)
    assert len(windows) >= 4
    checked = 0
    for w in windows[:3] + windows[-1:]:  # first, second, third and last windows
        for i in sorted({w.score_from, w.score_from + 1, (w.score_from + w.end) // 2, w.end - 1}):
            prefix = torch.from_numpy(tokens[w.begin:i + 1].astype(np.int64))[None]  # the context row i saw
            with torch.inference_mode(), capture(lm.model, hook) as cap:
                lm.model(prefix)
            ref = cap.value[0, -1].float()
            got = torch.from_numpy(keys[i].astype(np.float32))
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)  # fp16 rounding of the key only
            if i + 1 < ds.n:  # the neighbouring rows hold other states: the test would catch an off-by-one
                assert not torch.allclose(torch.from_numpy(keys[i + 1].astype(np.float32)), ref, atol=1e-2)
            checked += 1
    assert checked >= 12

    val = ds.validation()  # the memory's validation inputs: the first val_positions positions of validation
    vt, _ = load_split(cfg.run_dir, "validation")
    assert val.n == min(cfg.train.val_positions, len(vt) - 1)
    np.testing.assert_array_equal(val.vals, vt[1:val.n + 1])


@pytest.mark.parametrize("shards", [1, 2])
def test_killed_extract_resumes_byte_identical(assets, tmp_path, monkeypatch, shards):
    over = {"window.batch_size": 1, "extract.shards": shards}
    ref_cfg = config(assets, tmp_path / "ref", **over)
    prepare.run(ref_cfg)
    extract.run(ref_cfg)

    cfg = config(assets, tmp_path / "run", **over)
    prepare.run(cfg)
    n_windows = len(plan_windows(len(load_split(cfg.run_dir, "train")[0]), cfg.window.context, cfg.window.stride))
    die_after = 6 if shards == 1 else n_windows // 2 + 3  # 2 shards: shard 0 finished, shard 1 half done
    monkeypatch.setattr(extract, "FLUSH_EVERY", 1)  # save progress after every window
    real = extraction.forward_hidden
    calls = {"n": 0, "die": True}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["die"] and calls["n"] > die_after:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(extraction, "forward_hidden", dying)
    with pytest.raises(RuntimeError, match="killed"):
        extract.run(cfg)
    store = (Path(cfg.run_dir) / 'datastore')
    assert not (store / "manifest.json").exists()
    assert list(store.glob(".progress-*.json"))

    calls.update(n=0, die=False)
    extract.run(cfg)
    # the rerun only ran the unfinished train windows (+ the one validation window)
    assert calls["n"] == n_windows - die_after + 1
    assert files(store) == files((Path(ref_cfg.run_dir) / 'datastore'))
    assert not list(store.rglob(".progress-*.json"))


def test_resume_with_a_lost_key_file_restarts_the_shard(assets, tmp_path, monkeypatch):
    ref_cfg = config(assets, tmp_path / "ref", **{"window.batch_size": 2})
    prepare.run(ref_cfg)
    extract.run(ref_cfg)
    cfg = config(assets, tmp_path / "run", **{"window.batch_size": 2})
    prepare.run(cfg)
    monkeypatch.setattr(extract, "FLUSH_EVERY", 1)
    real, calls = extraction.forward_hidden, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(extraction, "forward_hidden", dying)
    with pytest.raises(RuntimeError):
        extract.run(cfg)
    store = (Path(cfg.run_dir) / 'datastore')
    (store / "keys-00000-of-00001.npy").unlink()  # progress says 3 batches are done, but their keys are gone
    extract.run(cfg)
    assert files(store) == files((Path(ref_cfg.run_dir) / 'datastore'))


def test_rerun_skips_changed_config_is_refused_force_rebuilds(assets, tmp_path):
    cfg = config(assets, tmp_path / "run")
    prepare.run(cfg)
    first = extract.run(cfg)
    store = (Path(cfg.run_dir) / 'datastore')
    before = files(store)
    assert extract.run(cfg) == first  # same config: a no-op returning the same manifest
    assert files(store) == before

    changed = config(assets, tmp_path / "run", **{"window.stride": 16})
    with pytest.raises(StageError, match="--force"):
        extract.run(changed)
    assert json.loads((store / "manifest.json").read_text())["fingerprint"] == first["fingerprint"]

    forced = config(assets, tmp_path / "run", **{"window.stride": 16, "force": True})
    m = extract.run(forced)
    assert m["fingerprint"] != first["fingerprint"] and m["window"]["stride"] == 16
    assert files(store) != before  # keys now see another context
    assert extract.run(config(assets, tmp_path / "run", **{"window.stride": 16})) == m


def test_corrupt_or_truncated_key_shard_is_reported(assets, tmp_path):
    cfg = config(assets, tmp_path / "run")
    prepare.run(cfg)
    extract.run(cfg)
    store = (Path(cfg.run_dir) / 'datastore')
    keys = store / "keys-00000-of-00001.npy"
    size = keys.stat().st_size
    with open(keys, "r+b") as f:
        f.truncate(size - 64)
    # the manifest lists the shard's size: a reader refuses it, naming the file and the rerun that repairs it
    with pytest.raises(StageError, match=r"damaged: keys-00000-of-00001.npy has \d+ bytes .*Rerun `mlpmem extract`"):
        Datastore(cfg.run_dir)
    with open(keys, "r+b") as f:
        f.truncate(40)  # not even a whole header
    with pytest.raises(StageError, match="damaged: keys-00000-of-00001.npy has 40 bytes"):
        Datastore(cfg.run_dir)
    # a plain rerun (no --force) repairs it: the shard is not whole, so it is extracted again
    extract.run(config(assets, tmp_path / "run"))
    assert keys.stat().st_size == size
    assert Datastore(cfg.run_dir).keys[0].shape[0] == Datastore(cfg.run_dir).n


def test_more_shards_than_windows_is_refused(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", **{"extract.shards": 500})
    prepare.run(cfg)
    with pytest.raises(StageError, match="--extract.shards 500"):
        extract.run(cfg)


def test_windows_longer_than_the_model_are_refused(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", **{"window.context": 1024, "window.stride": 512})  # tiny GPT-2: 512
    prepare.run(cfg)
    with pytest.raises(ConfigError, match="--window.context 1024 exceeds the 512 positions"):
        extract.run(cfg)


def test_datastore_refuses_another_model(assets, tmp_path):
    cfg = config(assets, tmp_path / "run")
    prepare.run(cfg)
    extract.run(cfg)
    other = load_lm(config(assets, tmp_path / "run", "llama").model)
    with pytest.raises(StageError, match="--model.name"):
        Datastore(cfg.run_dir, expect_model=other.identity)
    with pytest.raises(StageError, match="--extract.hook"):
        Datastore(cfg.run_dir, expect_hook="transformer.h.0.ln_2:output")
