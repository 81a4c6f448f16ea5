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
from mlpmem.components.memory import MLPMemory, shareable_meta
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
    # a base model from a local folder: no Hub base_model, the license a documented placeholder
    assert "base_model" not in front and "datasets" not in front
    assert (front["license"], front["license_name"]) == ("other", "base-model-license-unknown")
    assert [r["metrics"][0]["type"] for r in front["model-index"][0]["results"]] == ["perplexity", "perplexity"]
    config_text = (out / "config.json").read_text()
    meta = json.loads(config_text)["meta"]
    assert str(tmp_path) not in config_text and str(tmp_path) not in card  # no local paths leave the machine
    assert meta["base_model"] == "model-llama"  # the folder's name; the fingerprint identifies it
    data_fp = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())["fingerprint"]
    for text in (meta["base_fingerprint"], meta["hook"], data_fp, "| test | memory |"):
        assert text in card, text
    # the card's snippet runs as written from the folder's parent (where the base model's folder is, here)
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "mlpmem.load('model-llama', memory='exported')" in snippet
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
    # loaded back for its base model, it is the run's memory/best: the same settings, the same logits
    lm = load_lm(ModelConfig(name=str(tmp_path / "model-llama"), dtype="fp32"))
    loaded = load_memory_for(out, lm.identity)
    best = MLPMemory.from_pretrained(tmp_path / "run" / "memory" / "best")
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "meta"}  # noqa: E731
    assert strip(loaded.config) == strip(best.config) and not loaded.training
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["settings"]["memory"]
    tuned = {"lam": res["lam"], "mem_temperature": res["T_mem"], "on": "eval: validation PPL"}
    assert loaded.config.meta == {**shareable_meta(best.config.meta), "tuned": tuned}  # what mlpmem.load uses
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


def test_memory_is_a_hub_model_and_resolves_hub_ids_through_the_hub_cache(tmp_path):
    """save_pretrained writes config, weights and a card; from_pretrained takes a Hub id, resolved through
    huggingface_hub's cache (here an offline cache filled by hand, as a download would), and checks it strictly."""
    from helpers import tiny_lm
    from mlpmem.components.memory import memory_config_for

    memory = MLPMemory(memory_config_for(tiny_lm("llama").config, num_blocks=1,
                                         meta={"base_model": str(tmp_path / "m"), "base_fingerprint": "f"})).eval()
    memory.save_pretrained(tmp_path / "mem")
    assert {p.name for p in (tmp_path / "mem").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    assert json.loads((tmp_path / "mem" / "config.json").read_text())["meta"]["base_model"] == "m"
    assert "memory='mem', lam=0.25" in (tmp_path / "mem" / "README.md").read_text()  # no tuned lam: an explicit one
    snap = tmp_path / "hub" / "models--someone--tiny-memory" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((tmp_path / "mem" / f).read_bytes())
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    loaded = MLPMemory.from_pretrained("someone/tiny-memory", cache_dir=tmp_path / "hub", local_files_only=True)
    assert loaded.source == "someone/tiny-memory" and not loaded.training
    x = torch.randn(3, loaded.config.input_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), memory(x))


def test_card_metadata_names_hub_bases_datasets_and_licenses(tmp_path):
    """A Hub base model is the card's base_model (an adapter of it); a Hub corpus is its dataset; an explicit license
    replaces the placeholder; a local corpus or model is named without its path."""
    from huggingface_hub import ModelCard

    from helpers import tiny_lm
    from mlpmem.components.hub import model_card
    from mlpmem.components.memory import is_hub_id, memory_config_for
    from mlpmem.stages.export import _corpus

    assert _corpus("hf:wikitext:wikitext-103-raw-v1") == {"name": "wikitext:wikitext-103-raw-v1",
                                                          "hub_dataset": "wikitext"}
    assert _corpus(str(tmp_path / "my_corpus.jsonl")) == {"name": "my_corpus.jsonl"}
    assert is_hub_id("gpt2/large") and not is_hub_id("/abs/path") and not is_hub_id("./rel/x")
    memory = MLPMemory(memory_config_for(tiny_lm("llama").config, num_blocks=1,
                                         meta={"base_model": "HuggingFaceTB/SmolLM2-135M", "base_fingerprint": "f"}))
    card = ModelCard(model_card(memory, corpus={**_corpus("hf:wikitext:wikitext-103-raw-v1"), "fingerprint": "c"},
                                memory_ref="me/smollm2-memory", license="mit"))
    data = card.data.to_dict()
    assert (data["base_model"], data["base_model_relation"]) == ("HuggingFaceTB/SmolLM2-135M", "adapter")
    assert data["datasets"] == ["wikitext"] and data["license"] == "mit" and "license_name" not in data
    assert "mlpmem.load('HuggingFaceTB/SmolLM2-135M', memory='me/smollm2-memory', lam=0.25)" in card.text


def test_export_refuses_a_bad_repo_id(tmp_path):
    from mlpmem.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="export.push_to"):
        load_config(None, {"export.push_to": "not-a-repo-id"})
