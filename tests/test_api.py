"""The public API a Hugging Face user starts from: `import mlpmem` is light and exposes load / check_memory /
MLPMemory / attach_memory / detach_memory / MemoryLM; `mlpmem.load` attaches an exported memory at its tuned
settings and refuses another base model; `check_memory` checks a model object the user loaded; the README's Python
snippets and the exported card's snippet run as written. The memory is a tiny one, exported from a tiny run whose
base model is "default": MLPMEM_CACHE points at a cache whose default model is a tiny random Llama."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import make_model, make_model_dir, make_texts, make_tokenizer, tiny_config, write_corpus
from mlpmem.cli import main

ROOT = Path(__file__).parents[1]
DEFAULT_DIR = ("models", "smollm2-135m-instruct-q4_1")  # where mlpmem.assets caches the default model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny run at <tmp>/runs/demo over the (tiny) default model, evaluated and exported to runs/demo/export
    (fp32) and runs/demo/export16 (fp16)."""
    tmp = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLPMEM_CACHE", str(tmp / "cache"))
        default = make_model_dir(tmp / "cache" / Path(*DEFAULT_DIR), "llama")
        (default / "complete").write_text("ok\n")
        write_corpus(tmp / "corpus.txt", make_texts(20) * 4)
        cfg = tiny_config(tmp, "llama", **{"model.name": "default", "out_dir": str(tmp / "runs" / "demo"),
                                           "eval.systems": ["base", "memory"]})
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        assert main(["pipeline", "--config", str(tmp / "cfg.yaml")]) == 0
        assert main(["export", "--config", str(tmp / "cfg.yaml")]) == 0
        assert main(["export", "--config", str(tmp / "cfg.yaml"), "--export.dtype", "fp16",
                     "--export.dir", str(tmp / "runs" / "demo" / "export16")]) == 0
    return tmp


@pytest.fixture
def env(demo, monkeypatch):
    """Run as a user would, from the directory that holds runs/, with the tiny default model."""
    monkeypatch.setenv("MLPMEM_CACHE", str(demo / "cache"))
    monkeypatch.chdir(demo)
    return demo


def _tuned(demo: Path) -> dict:
    return json.loads((demo / "runs" / "demo" / "eval" / "results.json").read_text())["settings"]["memory"]


def python_blocks(markdown: str) -> list[tuple[str, str]]:
    """(info string, code) of every ```python fenced block."""
    return re.findall(r"^```(python[^\n]*)\n(.*?)^```", markdown, flags=re.S | re.M)


def test_import_mlpmem_is_light_and_exposes_the_api():
    code = ("import sys, mlpmem; print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)); "
            "print(sorted(mlpmem.__all__)); print(mlpmem.load.__module__, mlpmem.MLPMemory.__module__, "
            "mlpmem.check_memory.__module__, mlpmem.MemoryLM.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded, names, modules = out.stdout.splitlines()
    assert loaded == "[]"  # nothing heavy until a name is used
    assert names == str(sorted(["__version__", "load", "check_memory", "MLPMemory", "MemoryMismatch",
                                "attach_memory", "detach_memory", "MemoryLM"]))
    assert modules == "mlpmem.api mlpmem.components.memory mlpmem.api MemoryLM"
    import mlpmem

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mlpmem.nope  # noqa: B018
    # typed package: py.typed ships in the wheel; the façade is the only module importing upwards, lazily
    assert (ROOT / "src" / "mlpmem" / "py.typed").is_file()
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["mlpmem"]
    assert any(d.startswith("huggingface_hub") for d in project["project"]["dependencies"])
    from test_layout import import_graph

    assert import_graph.facade_imports() == []
    assert import_graph.layer_of("mlpmem.api") == "entry"


def test_load_attaches_the_memory_at_its_tuned_settings_and_refuses_another_base(env):
    import mlpmem
    from mlpmem.components.joint import attached_memory

    tuned = _tuned(env)
    model, tok = mlpmem.load("default", memory="runs/demo/export", dtype="fp32")
    handle = attached_memory(model)
    assert (handle.lam, handle.mem_temperature) == (pytest.approx(tuned["lam"]), pytest.approx(tuned["T_mem"]))
    assert type(model).__name__ == "LlamaForCausalLM" and tok.padding_side == "left"
    # the logits are the mixture's: log((1 - lam) p_LM + lam p_mem), against the plain LM and the memory itself
    ids = tok(["Doc 3: the river", "Doc 7: music of the"], return_tensors="pt", padding=True)
    with torch.no_grad():
        mixed = model(**ids).logits[:, -1]
        mlpmem.detach_memory(model)
        plain = model(**ids).logits[:, -1]
    assert not torch.allclose(mixed, plain.log_softmax(-1), atol=1e-3)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids["input_ids"].shape[1] + 3)
    # an explicit lam overrides; the run's memory/best finds its tuned lam through the run directory
    model, _ = mlpmem.load("default", memory="runs/demo/memory/best", lam=0.0, dtype="fp32")
    assert attached_memory(model).lam == 0.0
    with torch.no_grad():
        assert torch.equal(model(**ids).logits[:, -1], plain)  # lam 0: the base model, bit for bit
    model, _ = mlpmem.load("default", memory="runs/demo/memory/best", dtype="fp32")
    assert attached_memory(model).lam == pytest.approx(tuned["lam"])
    # another base model: refused, naming what to do
    other = make_model_dir(env / "other", "llama", seed=1)
    with pytest.raises(mlpmem.MemoryMismatch, match="trained for base model"):
        mlpmem.load(str(other), memory="runs/demo/export", dtype="fp32")
    # the fp16 export is about half the size and loads in the model's dtype
    size = lambda d: (env / "runs" / "demo" / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("export16") < 0.55 * size("export")
    model16, _ = mlpmem.load("default", memory="runs/demo/export16", dtype="fp32")
    assert next(attached_memory(model16).memory.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(model16(**ids).logits[:, -1], mixed, atol=1e-2)


def test_check_memory_checks_a_model_object_the_user_loaded(env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mlpmem
    from mlpmem.api import identity_of
    from mlpmem.assets import default_model_dir
    from mlpmem.components.lm import load_lm
    from mlpmem.config import ModelConfig

    path = default_model_dir()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    # the same identity mlpmem's own loader computes (so a memory made by a run fits the user's object)
    assert identity_of(model, tok)["fingerprint"] == load_lm(ModelConfig(name="default", dtype="fp32")).identity[
        "fingerprint"]
    memory = mlpmem.MLPMemory.from_pretrained("runs/demo/export")
    mlpmem.check_memory(model, tok, memory)
    mlpmem.check_memory(model, tok, "runs/demo/export")  # a folder or Hub id works too
    # load() with the object attaches in place, at the tuned settings
    same, _ = mlpmem.load(model, memory=memory, tokenizer=tok)
    assert same is model and mlpmem.detach_memory(model)
    # a model with other weights, from a folder or built in this process, is refused
    other = make_model_dir(env / "other2", "llama", seed=1)
    with pytest.raises(mlpmem.MemoryMismatch):
        mlpmem.check_memory(AutoModelForCausalLM.from_pretrained(other), AutoTokenizer.from_pretrained(other), memory)
    fresh = make_model("llama", len(tok), seed=3)
    with pytest.raises(mlpmem.MemoryMismatch):
        mlpmem.check_memory(fresh, tok, memory)
    with pytest.raises(mlpmem.MemoryMismatch, match="tokenizer differs"):
        mlpmem.check_memory(model, make_tokenizer(make_texts(10, seed=5), vocab_size=280), memory)
    with pytest.raises(ValueError, match="tokenizer: required"):
        mlpmem.load(model, memory=memory)


def test_readme_python_snippets_run_as_written(env, capsys):
    """Every ```python block of the README runs, each on its own, from the directory that holds runs/demo (after
    `mlpmem export`); blocks marked ```python notest (lm-eval on a downloaded task) are only compiled."""
    blocks = python_blocks((ROOT / "README.md").read_text())
    runnable = [code for info, code in blocks if info.strip() == "python"]
    assert len(runnable) >= 3, "the README's Python snippets are gone"
    for info, code in blocks:
        assert info.strip() in ("python", "python notest"), info
        compile(code, "README.md", "exec")
    for code in runnable:
        torch.manual_seed(0)
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # the snippets print what they generate


def test_the_exported_model_card_carries_hub_metadata_and_its_snippet_runs(env):
    from huggingface_hub import ModelCard

    export = env / "runs" / "demo" / "export"
    card = ModelCard.load(export / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "mlpmem" and {"mlpmem", "mlp-memory", "model_hub_mixin"} <= set(data["tags"])
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["base_model_relation"] == "adapter"
    assert data["license"] == "apache-2.0"  # the default base model's
    assert "datasets" not in data  # a local corpus is no Hub dataset
    results = data["model-index"][0]["results"]
    res = json.loads((env / "runs" / "demo" / "eval" / "results.json").read_text())
    metrics = {(r["dataset"]["split"], m["name"]): m["value"] for r in results for m in r["metrics"]}
    assert metrics[("test", "token perplexity (memory)")] == pytest.approx(res["splits"]["test"]["systems"]["memory"]
                                                                          ["ppl"], abs=1e-4)
    # config.json: no local paths; the tuned settings travel with the memory
    text = (export / "config.json").read_text()
    assert str(env) not in text and "/" not in json.loads(text)["meta"].get("base_name_or_path", "")
    assert json.loads(text)["meta"]["tuned"]["lam"] == pytest.approx(_tuned(env)["lam"])
    # the usage snippet runs as written next to the folder ("export" names it; a Hub id once pushed)
    (snippet,) = [code for info, code in python_blocks(card.text) if info.strip() == "python"]
    assert "mlpmem.load('default', memory='export')" in snippet
    import os

    os.chdir(env / "runs" / "demo")
    exec(compile(snippet, "README.md", "exec"), {"__name__": "__card__"})


def _gated_export(env: Path) -> tuple[Path, "object"]:
    """A copy of runs/demo/export whose config records a per-token gate (as `mlpmem export` writes one that eval
    kept), with weights that make λ differ between positions."""
    import shutil

    from mlpmem.components.gate import FEATURES, Gate

    dst = env / "runs" / "demo" / "export-gated"
    if not dst.exists():
        shutil.copytree(env / "runs" / "demo" / "export", dst)
    gate = Gate(lam0=0.3, lam_max=0.9, T_mem=1.5, w=tuple(0.1 * (-1) ** i for i in range(len(FEATURES))), b=-1.0,
                mu=(0.0,) * len(FEATURES), sd=(1.0,) * len(FEATURES))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["meta"]["tuned"]["gate"] = gate.to_dict()
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst, gate


def test_a_recorded_gate_mixes_per_token_by_default_and_a_fixed_lambda_on_request(env):
    """The gate travels with an exported memory: mlpmem.load and lm-eval's MemoryLM mix with it per token (the
    mixture checked against the gate's formula), and use the fixed λ when gate=False, lam= or mem_temperature= is
    given; gate=True without a recorded gate says how to get one."""
    import mlpmem
    from mlpmem.components.gate import features
    from mlpmem.components.interpolate import mix_logprobs_per_token
    from mlpmem.components.joint import attached_memory

    gated, gate = _gated_export(env)
    model, tok = mlpmem.load("default", memory=str(gated), dtype="fp32")
    handle = attached_memory(model)
    assert handle.gate == gate and handle.mem_temperature == gate.T_mem
    ids = tok(["Doc 3: the river", "Doc 7: music of the"], return_tensors="pt", padding=True)
    with torch.no_grad():
        mixed = model(**ids).logits
        mlpmem.detach_memory(model)
        lm_lp = model(**ids).logits.float().log_softmax(-1)
        # the memory's own distribution at the gate's temperature: the fixed mixture at λ = 1
        mlpmem.load(model, memory=str(gated), tokenizer=tok, lam=1.0, mem_temperature=gate.T_mem)
        mem_lp = model(**ids).logits.float()
        mlpmem.detach_memory(model)
        lam = gate.lam(features(lm_lp, mem_lp))
    assert lam.std() > 1e-4 and lam.max() < 0.85  # λ differs between positions, unsaturated
    assert torch.allclose(mixed, mix_logprobs_per_token(lm_lp, mem_lp, lam).float(), atol=1e-5)
    # a fixed mixture on request: gate=False, or an explicit lam or temperature
    tuned = json.loads((gated / "config.json").read_text())["meta"]["tuned"]
    for kw, lam_want in (({"gate": False}, tuned["lam"]), ({"lam": 0.2}, 0.2), ({"mem_temperature": 1.0}, tuned["lam"])):
        model, _ = mlpmem.load("default", memory=str(gated), dtype="fp32", **kw)
        h = attached_memory(model)
        assert h.gate is None and h.lam == pytest.approx(lam_want), kw
    with pytest.raises(ValueError, match="fitted with the memory at temperature 1.5"):
        mlpmem.load("default", memory=str(gated), dtype="fp32", gate=True, mem_temperature=1.0)
    with pytest.raises(ValueError, match="gate: no per-token gate is recorded .* memory\\+gate in --eval.systems"):
        mlpmem.load("default", memory="runs/demo/export", dtype="fp32", gate=True)
    # lm-eval's model: the same rule through model_args strings, and the gate in the results' model info
    pytest.importorskip("lm_eval")
    from mlpmem.harness import MemoryLM

    lm = MemoryLM(pretrained="default", memory=str(gated), dtype="float32", batch_size=1, device="cpu")
    assert lm.handle.gate == gate and lm.get_model_info()["memory_gate"] == gate.to_dict()
    lm = MemoryLM(pretrained="default", memory=str(gated), dtype="float32", batch_size=1, device="cpu", gate="false")
    assert lm.handle.gate is None and lm.get_model_info()["memory_gate"] is None
    with pytest.raises(ValueError, match="model_args: gate=: no per-token gate"):
        MemoryLM(pretrained="default", memory="runs/demo/export", dtype="float32", batch_size=1, device="cpu", gate="true")
    with pytest.raises(ValueError, match="model_args: gate=: expected true, false or auto"):
        MemoryLM(pretrained="default", memory=str(gated), dtype="float32", batch_size=1, device="cpu", gate="maybe")


def test_export_records_the_gate_eval_kept_and_the_card_says_so():
    from mlpmem.components.gate import FEATURES, Gate
    from mlpmem.components.hub import model_card, tuned
    from mlpmem.components.memory import MLPMemory, MLPMemoryConfig

    gate = Gate.start(0.25, 1.0, (0.0,) * len(FEATURES), (1.0,) * len(FEATURES))
    results = {"settings": {"memory": {"lam": 0.25, "T_mem": 1.0}, "memory+gate": {"gate": gate.to_dict()}}}
    mem = MLPMemory(MLPMemoryConfig(family="llama", input_size=8, hidden_size=8, intermediate_size=16, num_blocks=1,
                                    vocab_size=32))
    assert tuned(mem, results) == {"lam": 0.25, "mem_temperature": 1.0, "gate": gate.to_dict()}
    assert "gate" not in tuned(mem, {"settings": {"memory": {"lam": 0.25, "T_mem": 1.0}, "memory+gate": {}}})
    assert "| per-token gate" in model_card(mem, results, memory_ref="x")
    assert "per-token gate" not in model_card(mem, {"settings": {"memory": {"lam": 0.25}}}, memory_ref="x")
