"""The `mlpmem` command line: help, option precedence, clear errors (exit code 2) and no half-made artifacts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import make_model, make_model_dir, make_texts, make_tokenizer, write_corpus
from mlpmem.cli import TOP_LEVEL, main
from mlpmem.commands import COMMANDS as STAGES
from mlpmem.config import iter_options


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two tiny models with different tokenizers (A: Llama, B: GPT-2) and a corpus."""
    root = tmp_path_factory.mktemp("cli")
    texts = make_texts(40, seed=0)
    a = make_model_dir(root / "model-a", "llama", texts=texts)
    # B: a tokenizer with BPE merges (the helpers' default vocab of 200 is below the 257-symbol byte alphabet,
    # so it learns no merges and every such tokenizer is the same)
    tok_b = make_tokenizer(texts, vocab_size=320)
    b = root / "model-b"
    make_model("gpt2", len(tok_b)).save_pretrained(b)
    tok_b.save_pretrained(b)
    corpus = write_corpus(root / "corpus.txt", texts)
    return {"a": str(a), "b": str(b), "corpus": str(corpus)}


def _args(run: Path, assets: dict, model: str = "a") -> list[str]:
    return ["--out_dir", str(run), "--model.name", assets[model], "--model.dtype", "fp32",
            "--data.source", assets["corpus"], "--data.validation_fraction", "0.2", "--data.test_fraction", "0.2"]


def _no_complete_manifest(run: Path) -> bool:
    for m in run.rglob("manifest.json") if run.exists() else []:
        if json.loads(m.read_text()).get("complete"):
            return False
    return True


# ----------------------------------------------------------------------------- help

def test_console_script_help():
    exe = Path(sys.executable).parent / "mlpmem"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlpmem.cli"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for stage in STAGES:
        assert stage in r.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_lists_its_options(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    sections = STAGES[stage].sections
    for name, _f, _tp in iter_options():
        section = name.split(".")[0] if "." in name else ""
        if section in sections or name in TOP_LEVEL:
            assert f"--{name}" in out, (stage, name)
        elif section:
            assert f"--{name} " not in out, (stage, name)


def test_knn_targets_help_has_knn_k(capsys):
    with pytest.raises(SystemExit):
        main(["knn-targets", "--help"])
    out = capsys.readouterr().out
    assert "--knn.k" in out and "Neighbours retrieved per query" in out and "[default: 1024]" in out


def test_no_stage_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: mlpmem" in capsys.readouterr().out


def test_version(capsys):
    from mlpmem import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


# ----------------------------------------------------------------------------- bad options

def test_unknown_option_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--out_dir", str(tmp_path / "run"), "--data.nonsense", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --data.nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a real option, but not one this stage reads
        main(["index", "--train.lr", "1"])
    assert e.value.code == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,match", [
    ("--window.context", "abc", "expected an integer"),
    ("--window.stride", "0", "must be in [1, context"),
    ("--data.test_fraction", "1.5", "must be in [0, 1)"),
    ("--model.dtype", "fp8", "must be one of"),
    ("--eval.systems", "base,oracle", "unknown system"),
])
def test_bad_value_exits_2_naming_the_flag(capsys, tmp_path, flag, value, match):
    assert main(["eval", "--out_dir", str(tmp_path / "run"), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag}:" in err and match in err
    assert not (tmp_path / "run").exists()


def test_yaml_config_and_flag_precedence(tmp_path, assets, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run"),
                                 "model": {"name": assets["a"]},
                                 "data": {"source": assets["corpus"], "seed": 1, "test_fraction": 0.3,
                                          "validation_fraction": 0.1}}))
    assert main(["prepare", "--config", str(y), "--data.seed", "7"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "data" / "config.yaml").read_text())
    assert saved["data"]["seed"] == 7             # flag beats YAML
    assert saved["data"]["test_fraction"] == 0.3  # YAML beats default
    assert saved["data"]["separator"] == "auto"   # default
    m = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert m["counts"]["test"]["documents"] == 12 and m["counts"]["validation"]["documents"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("knn:\n  k: many\n")
    assert main(["knn-targets", "--config", str(bad)]) == 2
    assert "--knn.k: expected an integer" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs leave nothing complete

@pytest.mark.parametrize("stage", ["prepare", "eval"])
def test_missing_model(tmp_path, assets, capsys, stage):
    run = tmp_path / "run"
    args = _args(run, assets)
    args[args.index("--model.name") + 1] = "/nonexistent"
    assert main([stage] + args) == 2
    err = capsys.readouterr().err
    assert "--model.name /nonexistent" in err and "no such directory" in err
    assert _no_complete_manifest(run)


def test_path_like_model_name_fails_fast(tmp_path, assets, capsys):
    # more than one '/' cannot be a hub id: no network round trip (which retries for ~50 s offline)
    args = _args(tmp_path / "run", assets)
    args[args.index("--model.name") + 1] = "models/not/here"
    assert main(["prepare"] + args) == 2
    assert "--model.name models/not/here: no such directory" in capsys.readouterr().err


def test_directory_that_is_not_a_model(tmp_path, assets, capsys):
    (tmp_path / "empty").mkdir()
    args = _args(tmp_path / "run", assets)
    args[args.index("--model.name") + 1] = str(tmp_path / "empty")
    assert main(["prepare"] + args) == 2
    assert "config.json" in capsys.readouterr().err
    assert _no_complete_manifest(tmp_path / "run")


@pytest.mark.parametrize("content,match", [(b"", "no non-empty documents"), (b"\n \n\t\n", "no non-empty documents"),
                                           ("na\u00efve caf\u00e9\n".encode("latin-1"), "not UTF-8")])
def test_bad_corpus(tmp_path, assets, capsys, content, match):
    f = tmp_path / "corpus.txt"
    f.write_bytes(content)
    args = _args(tmp_path / "run", assets)
    args[args.index("--data.source") + 1] = str(f)
    assert main(["prepare"] + args) == 2
    err = capsys.readouterr().err
    assert match in err and "--data.source" in err
    assert _no_complete_manifest(tmp_path / "run")


def test_eval_before_prepare(tmp_path, assets, capsys):
    assert main(["eval", "--eval.systems", "base"] + _args(tmp_path / "run", assets)) == 2
    assert "mlpmem prepare" in capsys.readouterr().err
    assert _no_complete_manifest(tmp_path / "run")


def test_corpus_prepared_with_another_tokenizer(tmp_path, assets, capsys):
    from mlpmem.config import ModelConfig
    from mlpmem.components.lm import load_tokenizer, tokenizer_hash

    assert tokenizer_hash(load_tokenizer(ModelConfig(name=assets["a"]))) != \
        tokenizer_hash(load_tokenizer(ModelConfig(name=assets["b"])))
    run = tmp_path / "run"
    assert main(["prepare"] + _args(run, assets, "a")) == 0
    capsys.readouterr()
    assert main(["eval", "--eval.systems", "base"] + _args(run, assets, "b")) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "mlpmem prepare" in err
    assert not (run / "eval" / "manifest.json").exists()


# ----------------------------------------------------------------------------- a working eval

def test_eval_base_prints_table_and_writes_results(tmp_path, assets, capsys):
    run = tmp_path / "run"
    assert main(["prepare"] + _args(run, assets)) == 0
    common = _args(run, assets) + ["--window.context", "32", "--window.stride", "16", "--window.batch_size", "3"]
    assert main(["eval", "--eval.systems", "base"] + common) == 0
    out = capsys.readouterr().out
    assert "| system |" in out and "| base |" in out and "validation PPL" in out and "test PPL" in out
    res = json.loads((run / "eval" / "results.json").read_text())
    assert {"tuned_on", "settings", "splits", "sweeps", "systems_meta", "model", "data", "window", "dtype"} <= set(res)
    assert res["settings"] == {"base": {}}
    assert res["window"] == {"context": 32, "stride": 16, "batch_size": 3}
    data_m = json.loads((run / "data" / "manifest.json").read_text())
    for split in ("validation", "test"):
        s = res["splits"][split]
        assert s["tokens"] == data_m["counts"][split]["tokens"] - 1
        assert set(s["systems"]) == {"base"}
        p = s["systems"]["base"]["ppl"]
        assert np.isfinite(p) and 1.0 < p < 10 * res["model"]["vocab_size"]
        assert f"{p:.3f}" in out
    assert res["model"]["tokenizer_hash"] == data_m["tokenizer_hash"]
    for f in ("results.md", "ppl_vs_lambda.png", "config.yaml", "manifest.json"):
        assert (run / "eval" / f).is_file(), f
    assert json.loads((run / "eval" / "manifest.json").read_text())["complete"] is True
    # rerun: skipped, same table printed
    mtime = (run / "eval" / "results.json").stat().st_mtime_ns
    assert main(["eval", "--eval.systems", "base"] + common) == 0
    assert "| base |" in capsys.readouterr().out
    assert (run / "eval" / "results.json").stat().st_mtime_ns == mtime


def test_help_shows_declared_defaults_and_the_stages_own_sections_first(capsys):
    """`auto`/null defaults are shown as declared, not as this machine resolves them; train's help opens with its
    own sections."""
    from mlpmem.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.dtype STR" in text and "[default: auto]" in text
    assert "bf16 natively, as --model.dtype auto). [default: None]" in text
    groups = [g for g in ("train (this stage's own settings)", "memory (this stage's own settings)",
                          "model (read from the model section)") if g in text]
    assert len(groups) == 3 and [text.index(g) for g in groups] == sorted(text.index(g) for g in groups)


def test_threads_default_to_every_usable_core_unless_omp_says_otherwise(monkeypatch):
    import torch

    from mlpmem.runtime import set_threads

    old = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_threads(None)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads(None)
        assert torch.get_num_threads() == 1
        set_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- packaging: the core install

ROOT = Path(__file__).parents[1]
EXTRA_ONLY = ("faiss", "datasets", "matplotlib", "peft", "lm_eval", "gguf", "bm25s", "accelerate")
# what mlpmem.load imports when called (api.load's function-level imports) besides mlpmem.api itself
LOAD_MODULES = ("mlpmem.api", "mlpmem.components.hub", "mlpmem.components.joint", "mlpmem.components.lm",
                "mlpmem.components.memory", "mlpmem.config")


def _dist_name(requirement: str) -> str:
    import re

    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def _module_level_imports(module: str, src: Path) -> set[str]:
    """Absolute names a module imports at module level (not inside functions, not under TYPE_CHECKING)."""
    import ast

    path = src / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = src / module.replace(".", "/") / "__init__.py"
    found: set[str] = set()
    if not path.is_file():  # a namespace package (mlpmem.components): nothing runs
        return found

    def visit(stmts):
        for s in stmts:
            if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test):
                visit(s.orelse)
            elif isinstance(s, (ast.If, ast.Try, ast.With)):
                for block in (s.body, getattr(s, "orelse", []), getattr(s, "finalbody", []),
                              *[h.body for h in getattr(s, "handlers", [])]):
                    visit(block)
            elif isinstance(s, ast.Import):
                found.update(a.name for a in s.names)
            elif isinstance(s, ast.ImportFrom) and s.level == 0 and s.module:
                found.add(s.module)
                found.update(f"{s.module}.{a.name}" for a in s.names)
            elif isinstance(s, ast.ImportFrom):  # relative
                pkg = module.rsplit(".", s.level)[0] if path.name != "__init__.py" else module
                found.add(f"{pkg}.{s.module}" if s.module else pkg)

    visit(ast.parse(path.read_text()).body)
    return found


def test_core_install_loads_a_memory_without_the_pipeline_extras():
    """pyproject: the core dependencies hold none of the extras' packages, every third-party package imported at
    module level by mlpmem.load's modules (and what they import of mlpmem, transitively) is a core dependency, and
    `all` (what scripts/setup.sh installs for the demo and the tests) holds every extra but the GPU one."""
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_dist_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not core & {"faiss-cpu", "faiss-gpu-cu12", "datasets", "matplotlib", "peft", "lm-eval", "bm25s", "gguf"}
    assert {"torch", "transformers", "safetensors", "huggingface-hub", "numpy", "pyyaml", "tqdm"} <= core
    assert {"faiss-cpu", "datasets", "matplotlib", "bm25s"} <= {_dist_name(r) for r in extras["pipeline"]}
    assert {_dist_name(r) for r in extras["lora"]} == {"peft"} and "lm-eval" in map(_dist_name, extras["eval"])
    assert extras["faiss-gpu"] == ["faiss-gpu-cu12>=1.8"]
    def resolve(names: list[str]) -> set[str]:  # an extra's distributions, self-references ("mlpmem[a,b]") expanded
        out: set[str] = set()
        for n in names:
            for r in extras[n]:
                out |= resolve(r.split("[")[1].rstrip("]").split(",")) if _dist_name(r) == "mlpmem" else {_dist_name(r)}
        return out

    everything = resolve([n for n in extras if n not in ("all", "faiss-gpu")])
    assert resolve(["all"]) == everything
    import re

    setup = re.search(r'pip install -q -e "\.\[([a-z,-]+)\]"', (ROOT / "scripts" / "setup.sh").read_text())
    assert setup and resolve(setup.group(1).split(",")) == everything  # the demo and the tests get everything

    src, todo, seen, third = ROOT / "src", list(LOAD_MODULES), set(), set()
    exists = lambda m: (src / (m.replace(".", "/") + ".py")).is_file() or (src / m.replace(".", "/")).is_dir()  # noqa: E731
    while todo:
        mod = todo.pop()
        if mod in seen or not exists(mod):
            continue
        seen.add(mod)
        todo += [".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)]  # parent packages run first
        for name in _module_level_imports(mod, src):
            top = name.split(".")[0]
            if top == "mlpmem":
                todo.append(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    assert "mlpmem.components.memory" in seen and "mlpmem.runtime" in seen
    dists = md.packages_distributions()
    needed = {_dist_name(dists[t][0]) for t in third}
    assert needed and needed <= core, f"imported at module level by mlpmem.load's modules but not core: {needed - core}"


def test_load_and_generate_run_with_the_extras_missing(tmp_path):
    """A user with the core install: the extras' packages cannot be imported (as when not installed), and
    mlpmem.load attaches a memory folder to a model folder and generates."""
    code = f"""
import sys
for name in {EXTRA_ONLY!r}:
    sys.modules[name] = None  # `import name` raises ImportError, find_spec says not installed
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from helpers import make_model_dir
import mlpmem
from mlpmem.components.memory import MLPMemory, memory_config_for
model_dir = make_model_dir(Path({str(tmp_path)!r}) / "model", "llama")
from transformers import AutoConfig
mem = MLPMemory(memory_config_for(AutoConfig.from_pretrained(model_dir), num_blocks=1))
mem.save_pretrained(Path({str(tmp_path)!r}) / "memory")
model, tok = mlpmem.load(str(model_dir), memory=str(Path({str(tmp_path)!r}) / "memory"), lam=0.3, dtype="fp32",
                         device="cpu")
out = model.generate(**tok(["Doc 1: the"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
print(out.shape[1], sorted(n for n in {EXTRA_ONLY!r} if sys.modules.get(n) is not None))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLPMEM_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    n, loaded = r.stdout.split(maxsplit=1)
    assert int(n) > 3 and loaded.strip() == "[]"


# ----------------------------------------------------------------------------- progress bars

def test_progress_labels_bars_and_keeps_one_rate(monkeypatch, capsys):
    """runtime.progress: a label tells bars with the same description apart; a postfix restating the bar's own
    rate (tok_s on a "tok" bar) is dropped, other postfix fields are kept; MLPMEM_NO_PROGRESS and ranks > 0 draw
    nothing."""
    from mlpmem.runtime import progress

    monkeypatch.delenv("MLPMEM_NO_PROGRESS", raising=False)
    bar = progress(total=10, desc="extract shard 0", label="validation", unit="tok", file=sys.stderr)
    assert bar.desc.startswith("extract shard 0 (validation)")
    bar.update(5)
    bar.set_postfix(tok_s="123", loss="0.5")
    bar.set_postfix({"tok_s": "1", "lr": "1e-3"}, lr2="x")
    assert "tok_s" not in bar.postfix and "lr=1e-3" in bar.postfix and "lr2=x" in bar.postfix
    bar.close()
    assert "tok/s" in capsys.readouterr().err  # the bar's own rate
    item = progress(total=3, unit="item", file=sys.stderr)
    item.set_postfix(items_s="2.0", em="0.5")
    assert item.postfix == "em=0.5"
    item.close()
    assert progress(total=3, label="train").desc.startswith("train")
    monkeypatch.setenv("MLPMEM_NO_PROGRESS", "1")
    assert progress(total=3).disable
    monkeypatch.delenv("MLPMEM_NO_PROGRESS")
    monkeypatch.setenv("RANK", "1")
    assert progress(total=3).disable


def test_transformers_loading_bars_follow_mlpmem_progress(tmp_path, monkeypatch):
    """load_lm: transformers' "Loading weights" bar (and the Hub's download bars) drawn only where mlpmem draws
    its own; the caller's transformers setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    from mlpmem.components import lm as lm_mod
    from mlpmem.config import ModelConfig
    from mlpmem.runtime import library_progress

    model_dir = make_model_dir(tmp_path / "model", "llama")
    seen = []
    real = lm_mod.library_progress

    def spy(*a, **kw):
        cm = real(*a, **kw)

        class Watch:
            def __enter__(self):
                cm.__enter__()
                seen.append(hf_logging.is_progress_bar_enabled())

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Watch()

    monkeypatch.setattr(lm_mod, "library_progress", spy)
    hf_logging.enable_progress_bar()
    try:
        monkeypatch.setenv("MLPMEM_NO_PROGRESS", "1")
        lm_mod.load_lm(ModelConfig(name=str(model_dir), dtype="fp32", device="cpu"))
        assert seen and not any(seen) and hf_logging.is_progress_bar_enabled()  # off inside, restored after
        seen.clear()
        monkeypatch.delenv("MLPMEM_NO_PROGRESS")
        monkeypatch.setenv("RANK", "1")
        lm_mod.load_lm(ModelConfig(name=str(model_dir), dtype="fp32", device="cpu"))
        assert seen and not any(seen)
        seen.clear()
        monkeypatch.delenv("RANK")
        with library_progress():
            assert hf_logging.is_progress_bar_enabled()  # mlpmem draws bars: transformers' are left on
        hf_logging.disable_progress_bar()  # ... and a user's "off" is left off
        with library_progress():
            assert not hf_logging.is_progress_bar_enabled()
        monkeypatch.setenv("MLPMEM_NO_PROGRESS", "1")
        with library_progress():
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
