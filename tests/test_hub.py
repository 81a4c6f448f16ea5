"""A memory as a Hub model folder: `mlpmem export` writes it with a model card; loaded back it computes the logits
of the run's memory/best exactly; a fresh process loads it for its base model and refuses another one; Hub repo ids
resolve through the Hub (offline: a one-line error)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import make_model_dir, make_texts, tiny_config, write_corpus
from mlpmem.cli import main
from mlpmem.components.capture import forward_hidden, resolve_hook
from mlpmem.components.hub import load_memory_for
from mlpmem.components.lm import load_lm
from mlpmem.components.memory import MLPMemory
from mlpmem.config import ModelConfig

LOAD = """
import sys
from mlpmem.components.hub import MemoryMismatch, load_memory_for
from mlpmem.components.lm import load_lm
from mlpmem.config import ModelConfig
lm = load_lm(ModelConfig(name=sys.argv[2], dtype="fp32"))
try:
    m = load_memory_for(sys.argv[1], lm.identity)
    print("loaded", m.num_parameters())
except MemoryMismatch as e:
    print("refused:", e)
"""


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-c", LOAD, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_export_writes_a_hub_folder_that_loads_only_for_its_base_model(tmp_path):
    write_corpus(tmp_path / "corpus.txt", make_texts(20) * 4)
    cfg = tiny_config(tmp_path, "llama", **{"eval.systems": ["base", "memory"]})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["pipeline", "--config", str(tmp_path / "cfg.yaml")]) == 0
    out = tmp_path / "exported"
    assert main(["export", "--config", str(tmp_path / "cfg.yaml"), "--export.dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "mlpmem" and "mlp-memory" in front["tags"]
    meta = json.loads((out / "config.json").read_text())["meta"]
    data_fp = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())["fingerprint"]
    for text in (meta["base_fingerprint"], meta["hook"], data_fp, "| test | memory |"):
        assert text in card, text
    # loaded back for its base model, it is the run's memory/best: the same settings, the same logits
    lm = load_lm(ModelConfig(name=str(tmp_path / "model-llama"), dtype="fp32"))
    loaded = load_memory_for(out, lm.identity)
    best = MLPMemory.from_pretrained(tmp_path / "run" / "memory" / "best")
    assert loaded.config.to_dict() == best.config.to_dict() and not loaded.training
    ids = torch.tensor([lm.tokenizer(t)["input_ids"][:24] for t in make_texts(3, seed=7)])
    hook = resolve_hook(lm.model, meta["hook"], int(meta.get("layer", -1)))
    with torch.no_grad():
        h = forward_hidden(lm.model, hook, ids)  # the hidden states the memory reads, (3, T, d)
        got, want = loaded(h), best(h)
    assert got.shape == (*ids.shape, lm.model.config.vocab_size) and got.dtype == torch.float32
    assert torch.equal(got, want)
    # a fresh process loads it for its base model and refuses a different one with a clear message
    r = _run(out, tmp_path / "model-llama")
    assert r.returncode == 0 and r.stdout.startswith("loaded"), r.stderr
    other = make_model_dir(tmp_path / "other-llama", "llama", seed=1)
    r = _run(out, other)
    assert r.returncode == 0 and "refused: this memory was trained for base model" in r.stdout, r.stdout + r.stderr


def test_hub_ids_and_bad_paths_fail_in_one_line(tmp_path):
    make_model_dir(tmp_path / "m", "llama")
    r = _run("nobody/no-such-memory", tmp_path / "m", env={"HF_HUB_OFFLINE": "1"})
    assert "could not download it from the Hub" in r.stderr and r.stderr.strip().count("\n") < 40
    r = _run(tmp_path / "missing", tmp_path / "m")
    assert "neither a memory folder nor a Hub repo id" in r.stderr


def test_export_refuses_a_bad_repo_id(tmp_path):
    from mlpmem.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="export.push_to"):
        load_config(None, {"export.push_to": "not-a-repo-id"})
