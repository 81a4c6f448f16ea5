"""Joint training of the LM and its memory (`mlpmem joint`) and the evaluation of the pair (`eval --eval.joint`)."""

import json
import math

import pytest
import torch
import yaml

from helpers import make_texts, tiny_config, tiny_lm, write_corpus
from mlpmem.cli import main
from mlpmem.components.joint import MemoryAttached, attached_memory
from mlpmem.components.memory import MLPMemory, memory_config_for


def test_memory_attached_trains_both_through_the_mixture():
    model = tiny_lm("llama")
    torch.manual_seed(0)
    memory = MLPMemory(memory_config_for(model.config, num_blocks=1, dropout=0.0))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        lm_lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    pair = MemoryAttached(model.requires_grad_(True), memory.requires_grad_(True), lam=0.3)
    out = pair(input_ids=ids).logits
    # the logits are the mixture's log-probs: normalised, and between the LM's and the memory's
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 12), atol=1e-4)
    assert not torch.allclose(out, lm_lp, atol=1e-3)
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    names = {n for n, p in pair.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("memory.") for n in names)
    # the LM learns through the hidden state the memory reads, not only through its own head: the last layer's
    # MLP feeds only the head and the memory; the norm before it (the hook point) also reaches the memory
    assert any(n.startswith("lm.") and "layers" in n for n in names)
    lm = pair.detach()
    assert attached_memory(lm) is None
    with torch.no_grad():
        assert torch.allclose(torch.log_softmax(lm(input_ids=ids).logits.float(), -1), lm_lp, atol=1e-5)


@pytest.fixture
def tiny_run(tmp_path):
    write_corpus(tmp_path / "corpus.txt", make_texts(20) * 4)
    cfg = tiny_config(tmp_path, "llama", **{"train.epochs": 2, "eval.systems": ["base", "memory"],
                                            "joint.max_steps": 8, "joint.batch_size": 4, "joint.lr": 1e-3,
                                            "joint.eval_every": 4, "joint.save_every": 4, "joint.val_windows": 8})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return tmp_path, path


def test_joint_stage_trains_exports_and_evaluates_the_pair(tiny_run):
    tmp_path, path = tiny_run
    run = tmp_path / "run"
    # before eval there is no tuned lambda: a clear error, exit 2
    assert main(["prepare", "--config", str(path)]) == 0
    assert main(["joint", "--config", str(path), "--joint.mode", "lora"]) == 2
    assert main(["pipeline", "--config", str(path)]) == 0
    assert not (run / "joint").exists()  # --joint.mode none: the pipeline's joint step does nothing
    lam = json.loads((run / "eval" / "results.json").read_text())["settings"]["memory"]["lam"]
    assert main(["joint", "--config", str(path), "--joint.mode", "lora"]) == 0
    m = json.loads((run / "joint" / "manifest.json").read_text())
    assert m["complete"] and m["mode"] == "lora" and m["lam"] == pytest.approx(lam)
    assert m["trainable_memory_params"] > 0 and 0 < m["trainable_lm_params"] < m["base_model"]["n_params"]
    assert m["steps"] == 8 and m["best_val_loss"] <= m["base_val_loss"]  # step 0 is the separately trained pair
    assert (run / "joint" / "model" / "config.json").is_file()
    assert not list((run / "joint" / "model").glob("adapter_*"))  # LoRA merged: a plain model directory
    meta = json.loads((run / "joint" / "memory" / "config.json").read_text())["meta"]
    assert meta["base_fingerprint"] == m["joint_model"]["fingerprint"] != m["base_model"]["fingerprint"]
    assert meta["joint"]["lam"] == pytest.approx(lam)
    # eval of the pair needs its own results directory and no kNN-LM
    assert main(["eval", "--config", str(path), "--eval.joint", "true"]) == 2
    assert main(["eval", "--config", str(path), "--eval.joint", "true", "--eval.out_name", "eval-joint",
                 "--eval.systems", "base,knn"]) == 2
    assert main(["eval", "--config", str(path), "--eval.joint", "true", "--eval.out_name", "eval-joint",
                 "--eval.systems", "base,memory,memory+gate"]) == 0
    ej = json.loads((run / "eval-joint" / "results.json").read_text())
    ev = json.loads((run / "eval" / "results.json").read_text())
    # the pair gets its own per-token gate (fitted on its validation scores), which loading the joint memory uses
    assert "memory+gate" in ej["settings"] and math.isfinite(ej["splits"]["test"]["systems"]["memory+gate"]["ppl"])
    from mlpmem.api import run_tuned_settings

    tuned = run_tuned_settings(run / "joint" / "memory")
    assert tuned["lam"] == pytest.approx(ej["settings"]["memory"]["lam"])
    assert tuned.get("gate") == ej["settings"]["memory+gate"].get("gate")
    em = json.loads((run / "eval-joint" / "manifest.json").read_text())
    assert em["upstream"]["joint"] == m["fingerprint"]
    # the joint LM alone differs from the base LM; on this memorisable corpus the pair still beats the base
    v, v0 = ej["splits"]["validation"]["systems"], ev["splits"]["validation"]["systems"]
    assert v["base"]["ppl"] != pytest.approx(v0["base"]["ppl"], rel=1e-6)
    assert v["memory"]["ppl"] < v0["base"]["ppl"]
    assert all(math.isfinite(s["ppl"]) for s in v.values())
    # a rerun skips; a changed memory makes the joint output stale
    assert main(["joint", "--config", str(path), "--joint.mode", "lora"]) == 0
    assert json.loads((run / "joint" / "manifest.json").read_text())["created"] == m["created"]
    assert main(["train", "--config", str(path), "--train.lr", "1e-3", "--force"]) == 0
    assert main(["eval", "--config", str(path), "--eval.joint", "true", "--eval.out_name", "eval-joint"]) == 2


def test_joint_refuses_a_useless_mixture(tiny_run):
    tmp_path, path = tiny_run
    assert main(["joint", "--config", str(path), "--joint.lam", "0"]) == 2  # config: lam in (0, 1]
    assert main(["joint", "--config", str(path), "--joint.lam", "1.5"]) == 2


def test_pipeline_with_joint_mode_evaluates_the_pair(tiny_run):
    tmp_path, path = tiny_run
    assert main(["pipeline", "--config", str(path), "--joint.mode", "full", "--joint.lam", "0.5"]) == 0
    run = tmp_path / "run"
    m = json.loads((run / "joint" / "manifest.json").read_text())
    assert m["mode"] == "full" and m["lam"] == 0.5
    ej = json.loads((run / "eval-joint" / "results.json").read_text())
    assert set(ej["settings"]) == {"base", "memory", "memory alone"}
    assert json.loads((run / "eval-joint" / "manifest.json").read_text())["upstream"]["joint"] == m["fingerprint"]
