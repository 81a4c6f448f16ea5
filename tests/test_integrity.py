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
    # as if training itself had written them: the manifest vouches for these weights (else it refuses a change)
    from mlpmem.files import file_listing

    man = tmp / "run" / "memory" / "manifest.json"
    m = json.loads(man.read_text())
    man.write_text(json.dumps({**m, "files": file_listing(man.parent, lambda p: p == man)}))
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


# ----------------------------------------------------------------------------- a writer replaces only what it made

def _tree(d):
    """{relative path: bytes} of every file under d (symlinks as their target), to show nothing was touched."""
    return {p.relative_to(d).as_posix(): (p.read_bytes() if p.is_file() else str(p.readlink()))
            for p in sorted(d.rglob("*")) if (p.is_file() or p.is_symlink()) and p.name != ".lock"}


def test_export_never_replaces_what_it_did_not_write(run, capsys):
    tmp, cfg = run
    user_dir = tmp / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    user_file = tmp / "file.bin"
    user_file.write_bytes(b"keep me too")
    before = _tree(tmp / "run")
    for dest, why in ((user_dir, "a non-empty directory"), (user_file, "a file"), (tmp / "run", "non-empty"),
                      (tmp / "run" / "memory" / "best", "holds train output"),
                      (tmp / "run" / "eval" / "new", "holds eval output")):
        assert main(["export", "--config", cfg, "--export.dir", str(dest)]) == 2, dest
        line = _one_line_error(capsys, "export")
        assert "--export.dir" in line and why in line, line
    assert (user_dir / "notes.txt").read_text() == "keep me" and [p.name for p in user_dir.iterdir()] == ["notes.txt"]
    assert user_file.read_bytes() == b"keep me too" and not user_file.is_symlink()
    assert _tree(tmp / "run") == before
    # what export made itself it replaces (twice into the same folder), and an empty folder it may take
    (tmp / "empty").mkdir()
    for dest in (tmp / "exported", tmp / "exported", tmp / "empty"):
        assert main(["export", "--config", cfg, "--export.dir", str(dest)]) == 0
        assert (dest / "model.safetensors").is_file()


@pytest.mark.parametrize("flag, value", [("--eval.out_name", "memory"), ("--eval.out_name", "data"),
                                         ("--eval.out_name", ".lock"), ("--sweep.name", "eval"),
                                         ("--sweep.name", "memory")])
def test_output_names_cannot_take_another_stages_directory(tmp_path, capsys, flag, value):
    stage = "eval" if flag.startswith("--eval") else "sweep"
    assert main([stage, "--out_dir", str(tmp_path / "run"), flag, value]) == 2
    assert flag in _one_line_error(capsys, stage)
    assert not (tmp_path / "run").exists()


def test_reserved_names_cover_every_stage_and_command_output():
    from mlpmem.studies.compare import VARIANTS
    from mlpmem.config_values import RUN_DIR_NAMES
    from mlpmem.commands import COMMANDS

    outputs = {s.output for s in COMMANDS.values() if s.output} - {"eval"}
    assert outputs | set(VARIANTS) | {"export", "bench", "compare"} <= set(RUN_DIR_NAMES)


def test_a_directory_is_written_only_by_its_own_kind_even_with_force(run, capsys):
    """Past the name check (a directory made by another stage under any name): eval refuses the memory's directory,
    --force included, and leaves its manifest alone; the message names the right owner and flag."""
    from mlpmem.artifacts.manifest import should_skip
    from mlpmem.errors import StageError

    tmp, _ = run
    mem = tmp / "run" / "memory"
    before = (mem / "manifest.json").read_bytes()
    for force in (False, True):
        with pytest.raises(StageError, match=r"holds train output .* choose another --eval.out_name"):
            should_skip(mem, "eval", "fp", force)
    assert (mem / "manifest.json").read_bytes() == before
    with pytest.raises(StageError, match="holds eval output .* --sweep.name"):
        from mlpmem.artifacts import claim

        claim(tmp / "run" / "eval", "sweep")


# ----------------------------------------------------------------------------- manifests vouch for their files

def _flip_a_weight_byte(path):
    """Change one byte of a tensor's data (past the safetensors header), keeping the size."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 100] ^= 0x01
    path.write_bytes(bytes(data))


def test_changed_memory_weights_are_refused_by_every_reader(tmp_path, capsys):
    """(Its own run, not a copy: in a copy the model's path, which the memory records, differs, so `train` there
    would be "other settings".)"""
    tmp, cfg = tmp_path, _cfg_file(tmp_path)
    assert main(["pipeline", "--config", cfg]) == 0
    weights = tmp / "run" / "memory" / "best" / "model.safetensors"
    results = (tmp / "run" / "eval" / "results.json").read_bytes()
    _flip_a_weight_byte(weights)
    for argv in (["eval"], ["eval", "--force"], ["export"], ["generate"]):
        assert main([*argv, "--config", cfg]) == 2, argv
        line = _one_line_error(capsys, argv[0])
        assert "memory is damaged: best/model.safetensors was modified" in line and "`mlpmem train`" in line, line
    assert (tmp / "run" / "eval" / "results.json").read_bytes() == results  # nothing rewritten from bad weights
    assert not (tmp / "run" / "export").exists()
    # the rerun the message names rebuilds the memory (the manifest no longer vouches for it), then eval runs
    assert main(["train", "--config", cfg]) == 0
    assert "train: best/model.safetensors was modified" in capsys.readouterr().err
    assert main(["eval", "--config", cfg]) == 0


@pytest.mark.parametrize("stage, rel", [("index", "index/index.faiss"), ("eval", "eval/results.json"),
                                        ("knn-targets", "targets/ids-00000-of-00001.npy")])
def test_up_to_date_needs_the_files_the_manifest_lists(run, capsys, stage, rel):
    tmp, cfg = run
    path = tmp / "run" / rel
    if not path.exists():  # the shard naming of this run
        path = sorted(path.parent.glob(path.name.split("-")[0] + "-*"))[0]
    def content():  # what must come back (eval's results also record timings and whether a grid was widened)
        if path.suffix != ".json":
            return path.read_bytes()
        return {s: {k: v["ppl"] for k, v in e["systems"].items()} for s, e in json.loads(path.read_text())["splits"].items()}

    before, data = content(), path.read_bytes()
    path.unlink()
    assert main([stage, "--config", cfg]) == 0
    err = capsys.readouterr().err
    assert "is missing" in err and "rebuilding it" in err, err
    assert content() == before  # rebuilt, the same
    # and a truncated file is not whole either
    path.write_bytes(data[:-8])
    assert main([stage, "--config", cfg]) == 0
    assert content() == before
    assert main(["export", "--config", cfg]) == 0


def test_eval_and_sweep_never_write_into_a_users_directory(run, capsys):
    tmp, cfg = run
    mine = tmp / "run" / "notes"
    mine.mkdir()
    (mine / "results.json").write_text("mine")
    assert main(["eval", "--config", cfg, "--eval.out_name", "notes"]) == 2
    assert "mlpmem did not write" in _one_line_error(capsys, "eval")
    assert main(["sweep", "--config", cfg, "--sweep.name", "notes", "--sweep.points", "[{}]"]) == 2
    assert "--sweep.name" in _one_line_error(capsys, "sweep")
    assert [p.name for p in mine.iterdir()] == ["results.json"] and (mine / "results.json").read_text() == "mine"
