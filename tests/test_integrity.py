"""Ordinary mistakes end in a clean refusal (exit 2, one line naming the fix) or a correct result, never in exit 0
with wrong numbers: a stale upstream, replaced model weights, a diverged training run, empty or zero settings, an
--out_dir that is a file; and the outputs stay strict JSON."""

import json
import math

import numpy as np
import pytest
import yaml

from helpers import make_model_dir, tiny_config
from mlpmem.cli import main


def _cfg_file(tmp_path, **over):
    cfg = tiny_config(tmp_path, "llama", **over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def _one_line_error(capsys, stage: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mlpmem ")]
    assert len(err) == 1 and err[0].startswith(f"mlpmem {stage}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A whole tiny pipeline run (each test copies it)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = _cfg_file(tmp, **{"train.epochs": 2})
    assert main(["pipeline", "--config", cfg]) == 0
    return tmp


@pytest.fixture
def run(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path, dirs_exist_ok=True, symlinks=True)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace(str(finished), str(tmp_path)))
    return tmp_path, str(cfg)


def test_rerun_prepare_makes_downstream_stale(run, capsys):
    """The seed-7 sequence: another document split after a finished run. The datastore now holds validation and
    test documents; every consumer must refuse it, and `pipeline` must rebuild it."""
    tmp, cfg = run
    assert main(["prepare", "--config", cfg, "--data.seed", "7", "--force"]) == 0
    capsys.readouterr()
    for stage in ("eval", "train", "index", "knn-targets"):
        assert main([stage, "--config", cfg, "--force"]) == 2, stage
        line = _one_line_error(capsys, stage)
        assert "stale" in line and "mlpmem extract --force" in line and "mlpmem pipeline" in line, line
    # generate's lambda comes from an evaluation of a stale chain: refused too
    assert main(["generate", "--config", cfg]) == 2
    assert "stale" in _one_line_error(capsys, "generate")
    # pipeline rebuilds what is stale (and only refuses a stage whose own settings changed)
    assert main(["pipeline", "--config", cfg, "--data.seed", "7"]) == 0
    data_fp = json.loads((tmp / "run" / "data" / "manifest.json").read_text())["fingerprint"]
    ds = json.loads((tmp / "run" / "datastore" / "manifest.json").read_text())
    assert ds["upstream"] == {"data": data_fp}
    res = json.loads((tmp / "run" / "eval" / "results.json").read_text())
    assert res["data"]["fingerprint"] == data_fp


def test_replaced_model_weights_are_noticed(run, capsys):
    """Same config and tokenizer, other weights: the model identity hashes the weights, so the datastore, targets
    and memory made with the old weights are refused."""
    tmp, cfg = run
    model_dir = tmp / "model-llama"
    make_model_dir(model_dir, "llama", seed=1)  # new random weights, in place
    capsys.readouterr()
    for stage in ("train", "eval", "generate"):
        assert main([stage, "--config", cfg]) == 2, stage
        assert "differ" in _one_line_error(capsys, stage)


def test_diverged_training_fails_without_a_manifest(run, capsys):
    tmp, cfg = run
    assert main(["train", "--config", cfg, "--train.lr", "1e30", "--force"]) == 2
    line = _one_line_error(capsys, "train")
    assert "diverged at step" in line and "--train.lr" in line, line
    assert not (tmp / "run" / "memory" / "manifest.json").exists()
    # eval then runs without a memory (there is none), never with NaN weights
    assert main(["eval", "--config", cfg, "--force"]) == 0
    res = json.loads((tmp / "run" / "eval" / "results.json").read_text())
    assert "memory" not in res["splits"]["test"]["systems"]


def test_eval_refuses_a_memory_with_non_finite_weights(run, capsys):
    from safetensors.numpy import load_file, save_file

    tmp, cfg = run
    weights = tmp / "run" / "memory" / "best" / "model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = np.full_like(state[name], np.nan)
    save_file(state, str(weights))
    assert main(["eval", "--config", cfg, "--force"]) == 2
    assert "non-finite weights" in _one_line_error(capsys, "eval")


def test_results_are_strict_json(run):
    tmp, _ = run

    def strict(const):
        raise AssertionError(f"non-standard JSON constant {const}")

    for p in (tmp / "run").rglob("*.json"):
        json.loads(p.read_text(), parse_constant=strict)
    res = json.loads((tmp / "run" / "eval" / "results.json").read_text())
    assert math.isfinite(res["splits"]["test"]["systems"]["base"]["ppl"])


@pytest.mark.parametrize("stage, flag, value, expect", [
    ("eval", "--eval.splits", "[]", "--eval.splits: must list at least one value"),
    ("eval", "--eval.lambdas", "[]", "--eval.lambdas: must list at least one value"),
    ("generate", "--generate.prompts", "[]", "--generate.prompts: must list at least one non-empty prompt"),
    ("train", "--memory.hidden_size", "0", "--memory.hidden_size: must be >= 1 or null"),
    ("train", "--memory.intermediate_size", "-4", "--memory.intermediate_size: must be >= 1 or null"),
    ("eval", "--eval.knn_k", "0", "--eval.knn_k: must be >= 1"),
    ("prepare", "--seed", "-1", "--seed: must be >= 0"),
])
def test_empty_zero_and_negative_values_are_refused_with_the_flag(tmp_path, capsys, stage, flag, value, expect):
    assert main([stage, "--out_dir", str(tmp_path / "run"), flag, value]) == 2
    assert expect in _one_line_error(capsys, stage)
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["prepare", "--out_dir", str(tmp_path / "f")]) == 2
    assert "is a file" in _one_line_error(capsys, "prepare")


def test_only_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    """A bug (here a KeyError inside a stage) is exit 1 and says it is a bug; -v prints the traceback."""
    from mlpmem.stages import prepare

    def broken(cfg):
        raise KeyError("oops")

    monkeypatch.setattr(prepare, "run", broken)
    assert main(["prepare", "--out_dir", str(tmp_path / "run")]) == 1
    line = _one_line_error(capsys, "prepare")
    assert "internal error (KeyError" in line and "bug" in line
    assert main(["prepare", "--out_dir", str(tmp_path / "run"), "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_second_writer_refused_in_process(run, capsys):
    from mlpmem.artifacts.lock import run_lock

    tmp, cfg = run
    with run_lock(tmp / "run", "mlpmem train"):
        assert main(["eval", "--config", cfg]) == 2
    line = _one_line_error(capsys, "eval")
    assert "is being written by" in line and "`mlpmem train`" in line
    assert main(["eval", "--config", cfg]) == 0  # released


def test_leftovers_of_killed_runs_are_swept(run):
    tmp, cfg = run
    r = tmp / "run"
    junk = [r / "eval" / ".results.json.abc.mlpmem-tmp", r / "memory" / ".last.v-0123456789ab"]
    junk[0].write_text("half")
    junk[1].mkdir()
    current = r / "memory" / (r / "memory" / "last").readlink()
    assert main(["eval", "--config", cfg]) == 0
    assert not any(p.exists() for p in junk)
    assert current.is_dir()  # the version `last` points to is kept


def test_files_have_ordinary_permissions(run):
    """Atomic writes go through mkstemp (mode 0600); what they leave must look like any other file (umask)."""
    import os
    import stat

    tmp, _ = run
    umask = os.umask(0)
    os.umask(umask)
    modes = {}
    for p in (tmp / "run").rglob("*"):
        if p.is_symlink():
            continue
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        modes[p.relative_to(tmp).as_posix()] = (stat.S_IMODE(p.stat().st_mode), want)
    wrong = {k: (oct(m), oct(w)) for k, (m, w) in modes.items() if m != w}
    assert len(modes) > 20 and not wrong, wrong


def test_third_party_loggers_stay_quiet(run):
    """faiss' loader logs its failed AVX512 import at INFO, which reads like an error: not shown without -v."""
    import os
    import subprocess
    import sys

    tmp, cfg = run
    env = {**os.environ, "MLPMEM_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "mlpmem", "index", "--config", cfg], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "loader" not in r.stderr and "Could not load library" not in r.stderr, r.stderr
    assert "index: up to date" in r.stderr  # mlpmem's own INFO lines still show
