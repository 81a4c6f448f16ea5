"""Stage `train` (offline and online inputs, kill + resume, checkpoint selection) and the memory in `eval`."""

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch

import mlpmem.stages.train as train
from helpers import make_model_dir, make_texts, tiny_config, write_corpus
from mlpmem.artifacts import Datastore, TargetStore, load_memory
from mlpmem.stages import eval as eval_stage, extract, index as index_stage, prepare, targets
from mlpmem.components.capture import resolve_hook
from mlpmem.components.index import ConcatRows
from mlpmem.components.lm import load_lm
from mlpmem.components.memory import MLPMemory
from mlpmem.files import StageError
from mlpmem.components.trainer import ArraySource, Targets, evaluate

SMALL = {"data.validation_fraction": 0.1, "data.test_fraction": 0.1, "train.val_positions": 100,
         "train.batch_size": 32, "train.max_steps": 12, "train.eval_every": 4, "train.save_every": 5,
         "train.log_every": 2, "train.lr": 3e-3, "memory.dropout": 0.1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    texts = make_texts(24, seed=3)
    make_model_dir(root / "model-gpt2", "gpt2", texts=texts)
    make_model_dir(root / "model-llama", "llama", seed=1, texts=texts)  # same (byte-level) tokenizer
    write_corpus(root / "corpus.txt", texts)
    return root


def config(assets, out, family="gpt2", **overrides):
    return tiny_config(assets, family, out_dir=str(out), **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def base_run(assets, tmp_path_factory):
    """prepare + extract + index + knn-targets once; tests copy it before training."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = config(assets, out)
    for stage in (prepare.run, extract.run, index_stage.run, targets.run):
        stage(cfg)
    return out


@pytest.fixture(scope="module")
def trained_run(assets, base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(base_run, out)
    train.run(config(assets, out))
    return out


def copy_of(run, dst):
    shutil.copytree(run, dst)
    return dst


def rows_and_data(cfg):
    ds = Datastore(cfg.run_dir)
    val = ds.validation()
    return ds, val


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_online_and_offline_feed_identical_inputs(assets, tmp_path, family):
    cfg = config(assets, tmp_path / "run", family, **{"window.batch_size": 3})
    prepare.run(cfg)
    extract.run(cfg)
    lm = load_lm(cfg.model)
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    ds, val = rows_and_data(cfg)
    offline = ArraySource(ConcatRows(ds.keys + val.keys))
    online = train.online_source(cfg, lm, hook, ds.n, val.n)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(ds.n, 150, replace=False), ds.n + rng.choice(val.n, 30, replace=False),
                           [0, ds.n - 1, ds.n, ds.n + val.n - 1]])  # stream starts and ends included
    assert len({online.window_of(int(r)) for r in rows}) > online.cache_windows  # one request, many windows
    x_off = offline.hidden(rows)
    x_on = online.hidden(rows)
    assert x_on.shape == (len(rows), lm.identity["hidden_size"]) and x_on.dtype == torch.float32
    assert torch.equal(x_on, x_off)
    # again in small sorted batches (the training access pattern), through the window cache
    srt = np.sort(rows)
    assert torch.equal(torch.cat([online.hidden(srt[i:i + 16]) for i in range(0, len(srt), 16)]),
                       offline.hidden(srt))


def _val_loss(cfg, memory):
    """Validation loss of ``memory`` recomputed from the stored (offline) keys and targets."""
    ds, val = rows_and_data(cfg)
    tg = TargetStore(cfg.run_dir)
    n_val = tg.n_validation
    targets = Targets(tg.rows, np.concatenate([ds.vals, val.vals[:n_val]]))
    source = ArraySource(ConcatRows(ds.keys + val.keys))
    rows = np.arange(ds.n, ds.n + min(n_val, cfg.train.val_positions))
    return evaluate(memory, source, targets, rows, cfg.train)["loss"]


def test_online_training_end_to_end(assets, base_run, tmp_path):
    cfg = config(assets, copy_of(base_run, tmp_path / "run"), **{"train.input": "online"})
    m = train.run(cfg)
    assert m["complete"] and m["input"] == "online" and m["summary"]["steps"] == 12
    best = json.loads((cfg.run_dir / "memory" / "best.json").read_text())
    memory = MLPMemory.from_pretrained(cfg.run_dir / "memory" / m["checkpoint"])
    # validated online, re-scored offline: the same inputs give the same loss
    assert _val_loss(cfg, memory) == pytest.approx(best["val_loss"], rel=1e-6)
    untrained = MLPMemory(memory.config)
    torch.manual_seed(0)
    untrained.reset_parameters()
    assert best["val_loss"] < _val_loss(cfg, untrained) - 0.1  # it learned something


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_killed_train_resumes_to_the_same_weights(assets, base_run, tmp_path, monkeypatch, mode):
    over = {"train.input": mode}
    ref = config(assets, copy_of(base_run, tmp_path / "ref"), **over)
    ref_m = train.run(ref)

    cfg = config(assets, copy_of(base_run, tmp_path / "run"), **over)

    def die_at_7(step):
        if step == 7:  # after the step-5 checkpoint; steps 6-7 are lost
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_memory", partial(train.train_memory, on_step=die_at_7))
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    mem = cfg.run_dir / "memory"
    assert not (mem / "manifest.json").exists()
    assert torch.load(mem / "last" / "trainer_state.pt", weights_only=True)["step"] == 5
    monkeypatch.undo()
    m = train.run(cfg)

    refmem = ref.run_dir / "memory"
    for f in ("last/model.safetensors", "best/model.safetensors", "best.json"):
        assert (mem / f).read_bytes() == (refmem / f).read_bytes(), f
    drop = lambda d: {k: v for k, v in d.items() if k not in ("tokens_per_s", "rank_shares")}  # noqa: E731
    assert drop(m["summary"]) == drop(ref_m["summary"])
    lines = [drop(json.loads(ln)) for ln in (mem / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [drop(json.loads(ln)) for ln in (refmem / "metrics.jsonl").read_text().splitlines()]
    assert lines == ref_lines  # the killed run's lost steps were not logged twice


def test_best_checkpoint_is_selected_by_validation(assets, base_run, tmp_path):
    # a far too large learning rate diverges, so the best step is not the last one
    cfg = config(assets, copy_of(base_run, tmp_path / "run"),
                 **{"train.lr": 3.0, "train.warmup_steps": 0, "train.max_steps": 10, "train.eval_every": 2,
                    "train.save_every": 10, "memory.dropout": 0.0})
    m = train.run(cfg)
    mem = cfg.run_dir / "memory"
    vals = [json.loads(ln) for ln in (mem / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v.get("split") == "validation"]
    assert [v["step"] for v in vals] == list(range(2, 11, 2))
    best_line = min(vals, key=lambda v: v["loss"])
    best = json.loads((mem / "best.json").read_text())
    assert best["step"] == best_line["step"] == m["summary"]["best_step"] and best["val_loss"] == best_line["loss"]
    assert best["step"] != 10, "the test needs a run whose last step is not its best"
    assert m["checkpoint"] == "best"
    best_mem = MLPMemory.from_pretrained(mem / "best")
    assert _val_loss(cfg, best_mem) == pytest.approx(best["val_loss"], rel=1e-6)
    assert _val_loss(cfg, MLPMemory.from_pretrained(mem / "last")) > best["val_loss"]
    # eval and generate load the selected checkpoint
    lm = load_lm(cfg.model)
    memory, meta = load_memory(cfg.run_dir, lm, resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer))
    for a, b in zip(memory.state_dict().values(), best_mem.state_dict().values()):
        assert torch.equal(a, b)


def test_train_refuses_mismatched_inputs(assets, base_run, tmp_path):
    run = copy_of(base_run, tmp_path / "run")
    with pytest.raises(StageError, match="--extract.hook"):  # keys from another hook point
        train.run(config(assets, run, **{"extract.hook": "transformer.h.0.ln_2"}))
    with pytest.raises(StageError, match="--model.name"):  # keys from another model (same tokenizer)
        train.run(config(assets, run, "llama"))
    with pytest.raises(StageError, match="--window.stride 32"):  # online inputs over other windows than the keys
        train.run(config(assets, run, **{"train.input": "online", "window.stride": 16}))
    # targets computed before the datastore was re-extracted
    extract.run(config(assets, run, **{"window.stride": 16, "force": True}))
    with pytest.raises(StageError, match="mlpmem knn-targets --force"):
        train.run(config(assets, run, **{"window.stride": 16}))
    # a truncated key shard
    extract.run(config(assets, run, force=True))
    keys = run / "datastore" / "keys-00000-of-00001.npy"
    with open(keys, "r+b") as f:
        f.truncate(keys.stat().st_size // 2)
    with pytest.raises(StageError, match="damaged: keys-00000-of-00001.npy has .*Rerun `mlpmem extract`"):
        train.run(config(assets, run))
    assert not (run / "memory" / "manifest.json").exists()


def test_eval_with_the_memory_and_its_errors(assets, trained_run, tmp_path, capsys):
    run = copy_of(trained_run, tmp_path / "run")
    over = {"eval.systems": ["base", "memory"], "eval.lambdas": [0.0, 0.25, 1.0]}
    m = eval_stage.run(config(assets, run, **over))
    res = json.loads((run / "eval" / "results.json").read_text())
    for split in ("validation", "test"):
        rows = res["sweeps"][split]["memory"]
        assert rows[0]["lam"] == 0.0 and rows[0]["ppl"] == res["sweeps"][split]["base"][0]["ppl"]
        assert rows[1]["ppl"] != rows[0]["ppl"]
    assert "| memory |" in capsys.readouterr().out
    # rerun: a no-op returning the same manifest; changed settings are refused; --force rebuilds
    assert eval_stage.run(config(assets, run, **over)) == m
    with pytest.raises(StageError, match="--force"):
        eval_stage.run(config(assets, run, **{**over, "eval.lambdas": [0.0, 0.5]}))
    m2 = eval_stage.run(config(assets, run, **{**over, "eval.lambdas": [0.0, 0.5], "force": True}))
    assert m2["fingerprint"] != m["fingerprint"]

    out2 = {**over, "eval.out_name": "eval2"}
    with pytest.raises(StageError, match="--model.name"):  # a memory trained for another base model
        eval_stage.run(config(assets, run, "llama", **out2))
    with pytest.raises(StageError, match="--extract.hook"):  # ... or for another hook point
        eval_stage.run(config(assets, run, **out2, **{"extract.hook": "transformer.h.0.ln_2"}))
    (run / "memory" / "best" / "model.safetensors").unlink()  # an incomplete checkpoint folder
    with pytest.raises(StageError, match="best/model.safetensors is missing. Rerun `mlpmem train`"):
        eval_stage.run(config(assets, run, **out2))


def test_train_rerun_skips_changed_config_is_refused_force_rebuilds(assets, trained_run, tmp_path):
    run = copy_of(trained_run, tmp_path / "run")
    cfg = config(assets, run)
    m = json.loads((run / "memory" / "manifest.json").read_text())
    weights = (run / "memory" / "best" / "model.safetensors").read_bytes()
    assert train.run(cfg) == m
    assert (run / "memory" / "best" / "model.safetensors").read_bytes() == weights
    with pytest.raises(StageError, match="--force"):
        train.run(config(assets, run, **{"train.lr": 1e-3}))
    m2 = train.run(config(assets, run, **{"train.lr": 1e-3, "force": True}))
    assert m2["fingerprint"] != m["fingerprint"]
    assert (run / "memory" / "best" / "model.safetensors").read_bytes() != weights
    n_lines = len((run / "memory" / "metrics.jsonl").read_text().splitlines())
    assert n_lines == 6 + 3  # one forced run's log lines only: 6 training + 3 validation


def test_cli_prints_the_error_and_the_fix(assets, base_run, tmp_path, capsys):
    import yaml

    from mlpmem.cli import main

    run = copy_of(base_run, tmp_path / "run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config(assets, run).to_dict()))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--extract.hook", "transformer.h.0.ln_2"]) == 2
    err = capsys.readouterr().err
    assert "mlpmem train: error:" in err and "set --extract.hook transformer.h.1.ln_2:output" in err
    assert not (run / "memory").exists()


def test_train_seed_trains_a_new_memory_on_the_same_targets(assets, trained_run, tmp_path):
    """--train.seed seeds the memory (init, batch order, dropout): null or the top-level seed's value is the run
    already made (same fingerprint: skipped), another value a new memory on the same upstream artifacts; in a sweep
    only train and eval rerun."""
    from mlpmem.studies.sweep import plan

    run = copy_of(trained_run, tmp_path / "run")
    m = json.loads((run / "memory" / "manifest.json").read_text())
    weights = (run / "memory" / "best" / "model.safetensors").read_bytes()
    cfg = config(assets, run)
    assert cfg.train.seed is None and m["seed"] == cfg.seed
    assert train.run(config(assets, run, **{"train.seed": cfg.seed})) == m  # the seed in use is the same
    m1 = train.run(config(assets, run, **{"train.seed": 1, "force": True}))
    assert m1["seed"] == 1 and m1["fingerprint"] != m["fingerprint"]
    assert m1["upstream"] == m["upstream"]
    assert (run / "memory" / "best" / "model.safetensors").read_bytes() != weights

    swept = config(assets, run, **{"sweep.points": [{"train.seed": 1}, {"train.select_by": "ce"}]})
    for point in swept.sweep.points:
        assert [s for s, how, _ in plan(swept, point) if how == "run"] == ["train", "eval"]


def test_select_by_ce_is_recorded_in_the_manifest(assets, trained_run, tmp_path):
    run = copy_of(trained_run, tmp_path / "run")
    m = json.loads((run / "memory" / "manifest.json").read_text())
    assert m["summary"]["select_by"] == "loss"
    assert m["summary"]["best_val_criterion"] == m["summary"]["best_val_loss"]
    m2 = train.run(config(assets, run, **{"train.select_by": "ce", "force": True}))
    assert m2["fingerprint"] != m["fingerprint"]
    vals = [json.loads(ln) for ln in (run / "memory" / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v.get("split") == "validation"]
    best = min(vals, key=lambda v: v["ce"])
    s = m2["summary"]
    assert s["select_by"] == "ce" and s["best_step"] == best["step"] and s["best_val_criterion"] == best["ce"]
    assert s["best_val_ce"] == best["ce"] and s["best_val_loss"] == best["loss"]


def test_keep_last_false_prunes_the_resume_checkpoint(assets, base_run, tmp_path, caplog):
    """--train.keep_last false: memory/last (weights + optimizer state) is removed once best/ is chosen, before the
    manifest lists the files; the fingerprint is the default's, eval reads best/, and a rerun is up to date."""
    import logging

    run = copy_of(base_run, tmp_path / "run")
    cfg = config(assets, run, **{"train.keep_last": False})
    with caplog.at_level(logging.INFO, logger="mlpmem"):
        m = train.run(cfg)
    mem = run / "memory"
    assert not (mem / "last").exists() and not list(mem.glob(".last.v-*"))
    assert (mem / "best" / "model.safetensors").is_file() and m["checkpoint"] == "best"
    assert not any(name.startswith("last/") for name in m["files"]) and "best/model.safetensors" in m["files"]
    assert "freed" in caplog.text and "memory/last" in caplog.text
    # the same fingerprint as the default run (keep_last is not part of it): a rerun either way is up to date
    assert train.run(config(assets, run, **{"train.keep_last": False})) == m
    assert train.run(config(assets, run)) == m
    over = {"eval.systems": ["base", "memory"], "eval.lambdas": [0.0, 0.25], "eval.splits": ["validation"]}
    eval_stage.run(config(assets, run, **over))
    assert json.loads((run / "eval" / "results.json").read_text())["settings"]["memory"]["lam"] is not None
