"""Stage `generate`: base and +memory continuations, lambda 0 = the base LM, batched prompts of different lengths."""

import shutil

import pytest
import torch

import mlpmem.stages.generate as generate
from helpers import make_model_dir, make_texts, tiny_config, write_corpus
from mlpmem.studies import pipeline
from mlpmem.artifacts import load_memory
from mlpmem.components.capture import resolve_hook
from mlpmem.stages import extract, index as index_stage, prepare, targets, train
from mlpmem.components.joint import attach_memory
from mlpmem.components.lm import load_lm
from mlpmem.files import StageError

PROMPTS = ["A", "Doc 3: the river of the king was", "city"]  # 1 to ~30 tokens: heavy left padding
SMALL = {"data.validation_fraction": 0.1, "data.test_fraction": 0.1, "train.val_positions": 50,
         "train.batch_size": 32, "train.max_steps": 30, "train.lr": 5e-3, "generate.prompts": PROMPTS,
         "generate.max_new_tokens": 8}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    texts = make_texts(20, seed=4)
    make_model_dir(root / "model-gpt2", "gpt2", texts=texts)
    make_model_dir(root / "model-llama", "llama", seed=1, texts=texts)
    write_corpus(root / "corpus.txt", texts)
    return root


def config(assets, out, family="gpt2", **overrides):
    return tiny_config(assets, family, out_dir=str(out), **{**SMALL, **overrides})


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, assets, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(f"trained-{family}") / "run"
    cfg = config(assets, out, family)
    for stage in (prepare.run, extract.run, index_stage.run, targets.run, train.run):
        stage(cfg)
    return family, out


def test_generate_prints_base_and_memory_continuations(assets, trained, capsys):
    family, run = trained
    res = generate.run(config(assets, run, family, **{"generate.lam": 0.5}))
    out = capsys.readouterr().out
    rows = res["generations"]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert f"### {r['prompt']}" in out
        assert r["lam"] == 0.5 and r["base"] and r["memory"]
        assert f"[base]            {r['base'].strip()}" in out
        assert f"[+memory λ=0.5] {r['memory'].strip()}" in out
    assert any(r["base"] != r["memory"] for r in rows)  # at lam 0.5 the memory changes something


def test_lambda_zero_gives_the_base_continuation(assets, trained):
    family, run = trained
    rows = generate.run(config(assets, run, family, **{"generate.lam": 0.0}))["generations"]
    assert all(r["lam"] == 0.0 and r["memory"] == r["base"] for r in rows)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_batched_prompts_of_different_lengths_equal_one_by_one(assets, trained, lam):
    family, run = trained
    cfg = config(assets, run, family)
    lm = load_lm(cfg.model)
    memory, _ = load_memory(cfg.run_dir, lm, resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer))
    handle = attach_memory(lm.model, memory, lam=lam)
    try:
        batched = generate.generate_texts(lm, PROMPTS, cfg)
        single = [generate.generate_texts(lm, [p], cfg)[0] for p in PROMPTS]
        # greedy continuation by hand: full recomputation, no cache, no padding
        by_hand = []
        for p in PROMPTS:
            ids = lm.tokenizer(p, return_tensors="pt").input_ids
            n0 = ids.shape[1]
            with torch.inference_mode():
                for _ in range(cfg.generate.max_new_tokens):
                    nxt = lm.model(ids).logits[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, nxt], 1)
            by_hand.append(lm.tokenizer.decode(ids[0, n0:], skip_special_tokens=True))
    finally:
        handle.detach()
    assert batched == single == by_hand
    lens = [len(lm.tokenizer(p).input_ids) for p in PROMPTS]
    assert min(lens) == 1 and max(lens) > 20


def test_generate_refuses_a_memory_of_another_model(assets, trained):
    family, run = trained
    other = "llama" if family == "gpt2" else "gpt2"  # same tokenizer, another base model
    with pytest.raises(StageError, match="--model.name"):
        generate.run(config(assets, run, other))


def test_generate_without_a_memory(assets, tmp_path):
    cfg = config(assets, tmp_path / "run")
    with pytest.raises(StageError, match="mlpmem train"):
        generate.run(cfg)


def test_pipeline_rerun_is_a_no_op(assets, trained, tmp_path, capsys):
    family, run = trained
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    cfg = config(assets, dst, family, **{"eval.systems": ["base", "memory"], "eval.lambdas": [0.0, 0.5]})
    first = pipeline.run(cfg)  # only eval and generate have work left
    manifests = {p: p.read_bytes() for p in dst.rglob("manifest.json")}
    assert len(manifests) == 7
    timings = pipeline.run(cfg)
    assert {p: p.read_bytes() for p in dst.rglob("manifest.json")} == manifests
    # a stage found done keeps the wall time of the run that built it; stages built outside `pipeline` (here by
    # the fixture) have no recorded time rather than the time it took to find them done
    assert "extract" not in first and "train" not in first and "eval" in first
    assert timings["eval"] == first["eval"] and timings == {**first, "generate": timings["generate"]}
    assert "[+memory" in capsys.readouterr().out


def test_generate_uses_evals_gate_and_a_neutral_gate_equals_its_lambda(assets, trained, monkeypatch, capsys):
    """With no --generate.lam, generate mixes with the gate eval fitted (tuned_settings(...).gate); a gate with w = 0
    is exactly its starting λ, so its continuations equal the fixed-λ ones. An explicit --generate.lam skips it."""
    from mlpmem.artifacts import TunedSettings
    from mlpmem.components.gate import FEATURES, Gate

    family, run = trained
    fixed = generate.run(config(assets, run, family, **{"generate.lam": 0.5}))["generations"]
    n = len(FEATURES)
    gate = Gate(lam0=0.5, lam_max=0.9, T_mem=1.0, w=(0.0,) * n, b=0.0, mu=(0.0,) * n, sd=(1.0,) * n)
    seen = []

    def tuned(run_dir, out_name, lam=None, **kw):
        seen.append(lam)
        return TunedSettings(lam=0.5 if lam is None else lam, mem_T=1.0, gate=gate, source="test")

    monkeypatch.setattr(generate, "tuned_settings", tuned)
    capsys.readouterr()
    gated = generate.run(config(assets, run, family))["generations"]
    assert "[+memory λ=gate]" in capsys.readouterr().out
    assert [r["memory"] for r in gated] == [r["memory"] for r in fixed]
    explicit = generate.run(config(assets, run, family, **{"generate.lam": 0.0}))["generations"]
    assert all(r["memory"] == r["base"] for r in explicit) and seen == [None, 0.0]
