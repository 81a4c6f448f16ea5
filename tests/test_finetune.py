"""Stage `finetune` (full and LoRA) and its component: the loss falls, the saved directory is a plain Hugging Face
model whose validation loss is the manifest's, LoRA changes only the adapted modules, a killed run resumes to the
same bytes, and later stages use (and check) the fine-tuned model."""

import json
import math
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import mlpmem.components.finetune as ft
import mlpmem.stages.finetune as ft_stage
from helpers import make_texts, tiny_config, tiny_lm, write_corpus
from mlpmem.artifacts import base_model
from mlpmem.cli import main
from mlpmem.components.data import plan_windows
from mlpmem.components.trainer import BatchPlan
from mlpmem.errors import ConfigError, StageError
from mlpmem.stages import prepare

FT = {"finetune.batch_size": 4, "finetune.max_steps": 20, "finetune.warmup_steps": 2, "finetune.eval_every": 5,
      "finetune.save_every": 10, "finetune.val_windows": 8}
LR = {"full": 1e-3, "lora": 5e-3}
RUNS = [("llama", "full"), ("llama", "lora"), ("gpt2", "full"), ("gpt2", "lora")]
# the linear projections of the tiny models' decoder blocks (what --finetune.lora_targets auto adapts)
PROJ = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        "gpt2": {"c_attn", "c_proj", "c_fc"}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    # A memorisable corpus: 20 documents, each 4 times, so validation text also stands in train and fine-tuning
    # on train must lower the validation loss
    root = tmp_path_factory.mktemp("assets")
    write_corpus(root / "corpus.txt", make_texts(20) * 4)
    return root


def config(assets, out, family="llama", mode="full", **over):
    return tiny_config(assets, family, out_dir=str(out), **{**FT, "finetune.mode": mode,
                                                             "finetune.lr": LR.get(mode, 1e-3), **over})


@pytest.fixture(scope="module")
def tuned(assets, tmp_path_factory):
    """(family, mode) -> (config, manifest) of one uninterrupted fine-tuning each."""
    out = {}
    for family, mode in RUNS:
        cfg = config(assets, tmp_path_factory.mktemp(f"{family}-{mode}") / "run", family, mode)
        prepare.run(cfg)
        out[family, mode] = cfg, ft_stage.run(cfg)
    return out


def val_loss(model, run_dir, n_windows=FT["finetune.val_windows"], context=64, stride=32):
    """Mean next-token CE over the first validation windows' scored positions, one window per forward (no padding,
    no peft, no mlpmem loss code): the reference for the manifest's numbers."""
    tokens = np.load(run_dir / "data" / "validation" / "tokens.npy")
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in plan_windows(len(tokens), context, stride)[:n_windows]:
            ids = torch.from_numpy(tokens[w.begin:w.end].astype(np.int64))[None]
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            pos = np.arange(w.score_from, w.end)
            nll -= lp[pos - w.begin, torch.from_numpy(tokens[pos + 1].astype(np.int64))].sum().item()
            n += len(pos)
    return nll / n


def lines(path):
    drop = ("tokens_per_s",)
    return [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- (a) the loss falls

@pytest.mark.parametrize("family,mode", RUNS)
def test_finetuning_lowers_validation_loss(tuned, family, mode):
    cfg, m = tuned[family, mode]
    assert m["complete"] and m["mode"] == mode and m["steps"] == 20
    assert m["best_val_loss"] < m["base_val_loss"] - 0.05, (m["base_val_loss"], m["best_val_loss"])
    assert m["best_val_ppl"] == pytest.approx(math.exp(m["best_val_loss"]))
    assert m["base_val_ppl"] == pytest.approx(math.exp(m["base_val_loss"]))
    # token accounting: each step's windows' scored positions, counted once
    train = np.load(cfg.run_dir / "data" / "train" / "tokens.npy")
    wins = plan_windows(len(train), 64, 32)
    per_step = [sum(wins[i].end - wins[i].score_from for i in BatchPlan(np.arange(len(wins)), 4, cfg.seed)
                    .positions(s)) for s in range(20)]
    assert m["tokens"] == sum(per_step) and 20 * 4 * 32 <= m["tokens"] <= 20 * 4 * 64
    assert m["epochs"] == pytest.approx(m["tokens"] / (len(train) - 1))
    if mode == "full":
        assert m["trainable_params"] == m["total_params"]
    else:
        assert 0 < m["trainable_params"] < m["total_params"] / 2
    log = lines(cfg.run_dir / "finetune" / "metrics.jsonl")
    val = [ln for ln in log if ln.get("split") == "validation"]
    assert [v["step"] for v in val] == [0, 5, 10, 15, 20]
    assert val[0]["loss"] == m["base_val_loss"]
    assert min(v["loss"] for v in val[1:]) == m["best_val_loss"]
    assert [ln["step"] for ln in log if "split" not in ln] == [5, 10, 15, 20]
    assert log[-2]["tokens"] == m["tokens"]


# ----------------------------------------------------------------------------- (b) a plain Hugging Face directory

@pytest.mark.parametrize("family,mode", RUNS)
def test_saved_model_is_plain_and_scores_the_manifest_loss(tuned, family, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, m = tuned[family, mode]
    path = cfg.run_dir / "finetune" / "model"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32).eval()
    assert type(model) is type(base)
    sd, base_sd = model.state_dict(), base.state_dict()
    assert set(sd) == set(base_sd) and not any("lora" in k for k in sd)  # merged: no adapter tensors left
    assert val_loss(model, cfg.run_dir) == pytest.approx(m["best_val_loss"], rel=1e-5)
    assert val_loss(base, cfg.run_dir) == pytest.approx(m["base_val_loss"], rel=1e-5)
    changed = {k for k in sd if not torch.equal(sd[k], base_sd[k])}
    adapted = {k for k in sd if k.endswith(".weight") and k.split(".")[-2] in PROJ[family]}
    if mode == "lora":  # only the adapted projections moved (their W + B A); embeddings, norms, head did not
        assert changed == adapted
    else:
        assert adapted < changed and any("norm" in k or "ln_" in k for k in changed)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(cfg.model.name).get_vocab()
    files = sorted(p.name for p in path.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "adapter_config.json" not in files


def test_lora_targets_auto_and_named():
    for family in ("llama", "gpt2"):
        assert set(ft.lora_targets(tiny_lm(family), ["auto"])) == PROJ[family]
    assert ft.lora_targets(tiny_lm("llama"), ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="--finetune.lora_targets.*query_key_value"):
        ft.lora_targets(tiny_lm("llama"), ["q_proj", "query_key_value"])


# ----------------------------------------------------------------------------- (c) kill and resume

def test_killed_run_resumes_to_the_same_model(assets, tuned, tmp_path, monkeypatch):
    """Killed after the step-10 checkpoint (full, GPT-2 with dropout): the rerun resumes and ends byte-identical."""
    ref_cfg, ref_m = tuned["gpt2", "full"]
    cfg = config(assets, tmp_path / "run", "gpt2", "full")
    prepare.run(cfg)

    def die_at_13(step):
        if step == 13:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft_stage, "finetune_lm", partial(ft_stage.finetune_lm, on_step=die_at_13))
    with pytest.raises(KeyboardInterrupt):
        ft_stage.run(cfg)
    out = cfg.run_dir / "finetune"
    assert not (out / "manifest.json").exists() and not (out / "model").exists()
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] == 10
    monkeypatch.undo()
    m = ft_stage.run(cfg)
    _assert_same_run(out, ref_cfg.run_dir / "finetune", m, ref_m)


def test_failed_checkpoint_keeps_the_previous_one_and_resumes(assets, tuned, tmp_path, monkeypatch):
    """LoRA (Llama): the second checkpoint (step 20) dies inside its swap; last/ still holds step 10 whole, and
    the rerun resumes from it to the same bytes."""
    ref_cfg, ref_m = tuned["llama", "lora"]
    cfg = config(assets, tmp_path / "run", "llama", "lora")
    prepare.run(cfg)
    calls = []

    def fault(name):
        calls.append(name)
        if name == "finetune.checkpoint" and len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "fault_point", fault)
    with pytest.raises(KeyboardInterrupt):
        ft_stage.run(cfg)
    out = cfg.run_dir / "finetune"
    assert not (out / "manifest.json").exists()
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] == 10
    assert [p.name for p in out.glob(".last.v-*")] == [(out / "last").readlink().name]  # the half-written one gone
    assert set(load_file(out / "last" / ft.WEIGHTS_NAME)) == {n for n in load_file(out / "best" / ft.WEIGHTS_NAME)}
    assert all("lora_" in n for n in load_file(out / "last" / ft.WEIGHTS_NAME))  # adapters only, not the base
    monkeypatch.undo()
    m = ft_stage.run(cfg)
    _assert_same_run(out, ref_cfg.run_dir / "finetune", m, ref_m)


def _assert_same_run(out, ref, m, ref_m):
    for f in ("model/model.safetensors", "last/trainable.safetensors", "best/trainable.safetensors",
              "best/best.json"):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert lines(out / "metrics.jsonl") == lines(ref / "metrics.jsonl")  # lost steps not logged twice
    same = ("fingerprint", "weights", "tokens", "steps", "epochs", "best_step", "best_val_loss", "base_val_loss")
    assert {k: m[k] for k in same} == {k: ref_m[k] for k in same}


def test_resume_refuses_a_checkpoint_of_other_settings(assets, tuned, tmp_path):
    src_cfg, _ = tuned["llama", "lora"]
    cfg = config(assets, tmp_path / "run", "llama", "lora", **{"finetune.lora_r": 4})
    prepare.run(cfg)
    (cfg.run_dir / "finetune").mkdir()
    shutil.copy(src_cfg.run_dir / "finetune" / ".mlpmem-owner", cfg.run_dir / "finetune")  # finetune's directory
    shutil.copytree(src_cfg.run_dir / "finetune" / "last", cfg.run_dir / "finetune" / "last")  # r=16's adapters
    with pytest.raises(StageError, match="--force"):
        ft_stage.run(cfg)


def test_divergence_stops_before_anything_is_written(assets, tmp_path, monkeypatch):
    cfg = config(assets, tmp_path / "run", "llama", "full", **{"finetune.max_steps": 6, "finetune.eval_every": 3,
                                                               "finetune.save_every": 3})
    prepare.run(cfg)
    real, train_calls = ft.window_loss, []

    def nan_from_step_5(model, tokens, group, device):
        loss, n = real(model, tokens, group, device)
        if model.training:  # a training step (validation runs in eval mode); one forward per step here
            train_calls.append(1)
            if len(train_calls) >= 5:
                loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(ft, "window_loss", nan_from_step_5)
    with pytest.raises(StageError, match="diverged at step 5.*--finetune.lr"):
        ft_stage.run(cfg)
    out = cfg.run_dir / "finetune"
    assert not (out / "manifest.json").exists() and not (out / "model").exists()
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] == 3
    assert max(ln["step"] for ln in lines(out / "metrics.jsonl")) == 3


# ----------------------------------------------------------------------------- (d) later stages use it

def test_pipeline_builds_the_datastore_from_the_finetuned_model(assets, tmp_path, capsys):
    light = {"train.max_steps": 3, "eval.systems": ["base", "knn"], "eval.lambdas": [0.0, 0.5],
             "eval.splits": ["validation"]}
    cfg = config(assets, tmp_path / "run", "llama", "full", **light)
    y = tmp_path / "cfg.yaml"
    y.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["prepare", "--config", str(y)]) == 0
    assert main(["finetune", "--config", str(y)]) == 0
    ftm = json.loads((cfg.run_dir / "finetune" / "manifest.json").read_text())
    assert main(["pipeline", "--config", str(y)]) == 0
    assert json.loads((cfg.run_dir / "finetune" / "manifest.json").read_text()) == ftm  # skipped, not redone
    ds = json.loads((cfg.run_dir / "datastore" / "manifest.json").read_text())
    assert ds["upstream"]["finetune"] == ftm["fingerprint"]
    assert ds["model"]["weights"] == ftm["weights"]
    for stage in ("index", "targets", "memory", "eval"):
        assert json.loads((cfg.run_dir / stage / "manifest.json").read_text())["complete"], stage

    plain = config(assets, tmp_path / "plain", "llama", "none", **light)
    y0 = tmp_path / "cfg0.yaml"
    y0.write_text(yaml.safe_dump(plain.to_dict()))
    assert main(["prepare", "--config", str(y0)]) == 0 and main(["extract", "--config", str(y0)]) == 0
    ds0 = json.loads((plain.run_dir / "datastore" / "manifest.json").read_text())
    assert "finetune" not in ds0["upstream"] and ds0["model"]["weights"] != ds["model"]["weights"]
    assert ds0["model"]["fingerprint"] == ftm["base_model"]["fingerprint"] != ds["model"]["fingerprint"]

    # another fine-tuning setting: refused without --force; once forced, the datastore is stale and refused
    capsys.readouterr()
    assert main(["finetune", "--config", str(y), "--finetune.lr", "2e-3"]) == 2
    assert "mlpmem finetune --force" in capsys.readouterr().err
    assert main(["finetune", "--config", str(y), "--finetune.lr", "2e-3", "--force"]) == 0
    ftm2 = json.loads((cfg.run_dir / "finetune" / "manifest.json").read_text())
    assert ftm2["fingerprint"] != ftm["fingerprint"] and ftm2["weights"] != ftm["weights"]
    capsys.readouterr()
    assert main(["extract", "--config", str(y), "--finetune.lr", "2e-3"]) == 2
    assert "older inputs (finetune: rerun or changed since" in capsys.readouterr().err
    assert json.loads((cfg.run_dir / "datastore" / "manifest.json").read_text()) == ds  # left as it was


# ----------------------------------------------------------------------------- (e) the mode is checked

def test_base_model_refuses_another_mode(assets, tuned):
    cfg, m = tuned["llama", "full"]
    mcfg, up = base_model(cfg)
    assert up == {"finetune": m["fingerprint"]}
    assert mcfg.name == str((cfg.run_dir / "finetune" / "model").absolute())  # the link, stable across rebuilds
    lora = config(assets, cfg.run_dir, "llama", "lora")  # same run dir, --finetune.mode lora
    with pytest.raises(StageError, match="holds a 'full' fine-tuning.*mlpmem finetune --force"):
        base_model(lora)
    assert base_model(config(assets, cfg.run_dir, "llama", "none"))[1] == {}


def test_base_model_refuses_other_finetune_settings(assets, tuned):
    cfg, _ = tuned["llama", "full"]
    with pytest.raises(StageError, match="mlpmem finetune"):
        base_model(config(assets, cfg.run_dir, "llama", "full", **{"finetune.lr": 2e-3}))


def test_mode_none_does_nothing(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", "llama", "none")
    assert ft_stage.run(cfg) == {}
    assert not (cfg.run_dir / "finetune").exists()
