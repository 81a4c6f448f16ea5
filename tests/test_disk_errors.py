"""A full disk is the machine's one-line error (exit 1, never "a bug"), whichever writer meets it, and the rerun after
space is freed resumes from the last checkpoint with one metrics line per logged step; an interrupted ``--force`` run
says how to resume it, and resuming it works.

The disk fills up for real where it can be done cheaply (a subprocess under RLIMIT_FSIZE, as tests/test_faults.py
does for extract) and otherwise at the lowest write: the checkpoint's file refuses its bytes with ENOSPC, once, and
torch's real writer turns that into whatever it raises.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from helpers import metrics_untimed, spy_resumes, tiny_config
from mlpmem.cli import main
from mlpmem.components import finetune as ft
from mlpmem.components import trainer

# train checkpoints every 2 of its ~100 steps (as in test_faults); fine-tuning every 10 of 20
OVERRIDES = {"train.save_every": 2, "train.eval_every": 2, "knn.query_batch": 128, "window.batch_size": 4}
FT = {"finetune.mode": "full", "finetune.batch_size": 4, "finetune.max_steps": 20, "finetune.warmup_steps": 2,
      "finetune.eval_every": 5, "finetune.save_every": 10, "finetune.val_windows": 8, "finetune.lr": 1e-3}
UPSTREAM = ["data", "datastore", "index", "targets"]


def write_config(base: Path, run: Path, where: Path, **over) -> Path:
    cfg = tiny_config(base, "llama", out_dir=str(run), **{**OVERRIDES, **over})
    where.write_text(yaml.safe_dump(cfg.to_dict()))
    return where


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted run up to train (a few seconds), shared by the module's tests."""
    base = tmp_path_factory.mktemp("disk")
    config = write_config(base, base / "ref", base / "ref.yaml")
    for stage in ["prepare", "extract", "index", "knn-targets", "train"]:
        assert main([stage, "--config", str(config)]) == 0, stage
    return SimpleNamespace(base=base, run=base / "ref")


@pytest.fixture
def fresh(ref, tmp_path, monkeypatch):
    """A new run directory with copies of the reference's given stage directories; returns (run dir, config)."""
    monkeypatch.delenv("MLPMEM_FAULT", raising=False)

    def make(dirs=UPSTREAM, **over) -> tuple[Path, Path]:
        run = tmp_path / "run"
        run.mkdir()
        for d in dirs:
            shutil.copytree(ref.run / d, run / d, symlinks=True)
        return run, write_config(ref.base, run, tmp_path / "cfg.yaml", **over)

    return make


def error_line(err: str, stage: str) -> str:
    """The error line of a failed command: exactly one, the last one on stderr, no traceback, not "a bug"."""
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith(f"mlpmem {stage}: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert "Traceback" not in err and "bug" not in errors[0], err[-3000:]
    return errors[0]


def metric_keys(path: Path) -> list[tuple]:
    """(step, split) of every metrics line; each logged step once, in order."""
    keys = [(r["step"], r.get("split", "train")) for r in map(json.loads, path.read_text().splitlines())]
    assert len(keys) == len(set(keys)), f"duplicate metrics lines: {[k for k in keys if keys.count(k) > 1]}"
    assert [k[0] for k in keys] == sorted(k[0] for k in keys)
    return keys


class FullDisk:
    """A writable file that takes ``room`` bytes, then refuses the rest with ENOSPC (what write(2) does)."""

    def __init__(self, f, room: int = 100):
        self.f, self.room = f, room

    def write(self, b) -> int:
        b = bytes(b)
        if len(b) > self.room:
            self.f.write(b[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def fail_nth_state_save(monkeypatch, n: int) -> None:
    """The n-th trainer_state.pt written runs out of disk space: written to a file, torch's real writer is fed a full
    disk; to a path (mlpmem before it wrote through a file), torch's C++ writer would fail with the errno lost, as
    it does on a full disk: a RuntimeError "unexpected pos"."""
    calls, real = [], torch.save

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) != n:
            return real(obj, f, *a, **k)
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, FullDisk(f), *a, **k)

    monkeypatch.setattr(torch, "save", save)


# ----------------------------------------------------------------------------- train

def test_train_checkpoint_on_a_full_disk_is_one_line_then_resumes(ref, fresh, monkeypatch, capsys):
    run, config = fresh()
    fail_nth_state_save(monkeypatch, 2)  # the step-4 checkpoint; step 2's is on disk
    assert main(["train", "--config", str(config)]) == 1
    line = error_line(capsys.readouterr().err, "train")
    mem = run / "memory"
    assert "not enough disk space" in line and str(mem / "last") in line and "free on its disk" in line, line
    assert line.endswith("free space and rerun the same command: training resumes from the last checkpoint"), line
    assert torch.load(mem / "last" / trainer.STATE_NAME, weights_only=True)["step"] == 2
    assert [p.name for p in mem.glob(".last.v-*")] == [os.readlink(mem / "last")]  # the failed version is gone
    assert max(k[0] for k in metric_keys(mem / "metrics.jsonl")) == 4  # step 4 was logged before its checkpoint

    monkeypatch.undo()
    resumed = spy_resumes(monkeypatch, trainer)
    assert main(["train", "--config", str(config)]) == 0
    assert resumed == [2]
    metric_keys(mem / "metrics.jsonl")
    assert metrics_untimed(mem / "metrics.jsonl") == metrics_untimed(ref.run / "memory" / "metrics.jsonl")
    for sub in ("best", "last"):
        assert (mem / sub / "model.safetensors").read_bytes() == \
            (ref.run / "memory" / sub / "model.safetensors").read_bytes(), sub


def test_train_over_a_file_size_limit_is_one_line_then_reruns_without_duplicate_metrics(ref, fresh):
    """A real write failure: the checkpoint's optimizer state (~2x the weights) is over RLIMIT_FSIZE, the weights and
    the metrics are not. Before the fix: "internal error (RuntimeError: ... unexpected pos ...); this is a bug"."""
    run, config = fresh()
    last = ref.run / "memory" / "last"
    weights, state = (last / "model.safetensors").stat().st_size, (last / trainer.STATE_NAME).stat().st_size
    limit = (weights + state) // 2
    assert (ref.run / "memory" / "metrics.jsonl").stat().st_size < weights < limit < state

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLPMEM_NO_PROGRESS": "1"}
    env.pop("MLPMEM_FAULT", None)
    r = subprocess.run([sys.executable, "-m", "mlpmem", "train", "--config", str(config)], env=env,
                       capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert r.returncode == 1, f"rc {r.returncode}; stderr:\n{r.stderr[-3000:]}"
    line = error_line(r.stderr, "train")
    assert "disk space" in line and "file-size limit" in line and "training resumes" in line, line
    mem = run / "memory"
    assert not (mem / "last").exists()  # the very first checkpoint failed
    assert metric_keys(mem / "metrics.jsonl")  # ... after its step had been logged

    assert main(["train", "--config", str(config)]) == 0  # space freed: starts over, logging each step once
    metric_keys(mem / "metrics.jsonl")
    assert metrics_untimed(mem / "metrics.jsonl") == metrics_untimed(ref.run / "memory" / "metrics.jsonl")


# ----------------------------------------------------------------------------- fine-tuning

def test_finetune_checkpoint_on_a_full_disk_is_one_line_then_resumes(ref, fresh, monkeypatch, capsys):
    run, config = fresh(["data"], **FT)
    fail_nth_state_save(monkeypatch, 2)  # the step-20 checkpoint; step 10's is on disk
    assert main(["finetune", "--config", str(config)]) == 1
    line = error_line(capsys.readouterr().err, "finetune")
    out = run / "finetune"
    assert "not enough disk space" in line and str(out / "last") in line, line
    assert line.endswith("fine-tuning resumes from the last checkpoint"), line
    assert torch.load(out / "last" / trainer.STATE_NAME, weights_only=True)["step"] == 10
    assert max(k[0] for k in metric_keys(out / "metrics.jsonl")) == 20

    monkeypatch.undo()
    resumed = spy_resumes(monkeypatch, ft)
    assert main(["finetune", "--config", str(config)]) == 0
    assert resumed == [10]
    keys = metric_keys(out / "metrics.jsonl")
    assert keys == [(0, "validation"), (5, "train"), (5, "validation"), (10, "train"), (10, "validation"),
                    (15, "train"), (15, "validation"), (20, "train"), (20, "validation")]


# ----------------------------------------------------------------------------- exit codes and the last resort

def test_disk_space_error_exits_1_like_every_machine_error(ref, fresh, monkeypatch, capsys):
    """create_memmap's up-front check (a DiskSpaceError) exits 1, as README says of disk errors (it exited 2)."""
    from mlpmem import files

    run, config = fresh(["data"])
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert main(["extract", "--config", str(config)]) == 1
    line = error_line(capsys.readouterr().err, "extract")
    assert "not enough disk space" in line and "1000 B free" in line, line


def test_a_wrapped_full_disk_is_the_disk_message_not_a_bug(tmp_path, monkeypatch, capsys):
    """Any exception with an ENOSPC OSError in its chain (a writer's own wrapper around it) is the disk message."""
    import mlpmem.cli as cli

    target = tmp_path / "run" / "memory" / "last" / "trainer_state.pt"

    def wrapped(stage, cfg):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from e

    monkeypatch.setattr(cli, "run_stage", wrapped)
    args = ["prepare", "--out_dir", str(tmp_path / "run")]
    assert main(args) == 1
    line = error_line(capsys.readouterr().err, "prepare")
    assert "no space left" in line and str(target) in line and "resumes" in line, line

    def bug(stage, cfg):  # the control: a RuntimeError of another cause, with room on the disk, is still a bug
        raise RuntimeError("unexpected pos 704 vs 598")

    monkeypatch.setattr(cli, "run_stage", bug)
    assert main(args) == 1
    assert "this is a bug in mlpmem" in capsys.readouterr().err


def test_writers_that_drop_the_errno_are_judged_by_the_disk(tmp_path):
    """torch.save to a path ("unexpected pos") and numpy's tofile ("N requested and M written") lose the errno; under a
    real file-size limit both become a DiskSpaceError naming the path; the same RuntimeError with room is unchanged."""
    script = f"""
import json, resource, signal, sys
from pathlib import Path
import numpy as np, torch
from mlpmem.disk import disk_errors
from mlpmem.files import atomic_save_npy
d = Path({str(tmp_path)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
out = {{}}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except Exception as e:
        out[name] = type(e).__name__ + ": " + str(e)
def torch_by_path():
    with disk_errors(d / "state.pt", "rerun", written=d / "state.pt"):
        torch.save({{"x": torch.zeros(100_000)}}, d / "state.pt")
def a_bug():
    with disk_errors(d / "state.pt", "rerun"):
        raise RuntimeError("unexpected pos 1 vs 2")
attempt("torch", torch_by_path)
attempt("numpy", lambda: atomic_save_npy(d / "big.npy", np.zeros(100_000)))
attempt("bug", a_bug)
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for name, path in (("torch", "state.pt"), ("numpy", "big.npy")):
        assert got[name].startswith("DiskSpaceError: not enough disk space to write "), got[name]
        assert str(tmp_path / path) in got[name] and "file-size limit" in got[name], got[name]
    assert got["bug"] == "RuntimeError: unexpected pos 1 vs 2"
    assert not list(tmp_path.glob("*.mlpmem-tmp"))  # no temporary left by the failed atomic write


# ----------------------------------------------------------------------------- an interrupted --force run

def test_interrupted_force_run_says_to_rerun_without_force_and_that_resumes(ref, fresh, monkeypatch, capsys):
    """`train --force` over a finished memory, interrupted after its step-2 checkpoint: the message says to rerun
    without --force, and that rerun resumes at step 2 and ends as the uninterrupted run did."""
    run, config = fresh(UPSTREAM + ["memory"])
    calls = []

    def interrupt(name):
        calls.append(name)
        if name == "train.checkpoint" and len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "fault_point", interrupt)
    assert main(["train", "--config", str(config), "--force"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("mlpmem train: interrupted; rerun without --force to resume where it stopped (with --force it "
                   "starts over)")
    mem = run / "memory"
    assert not (mem / "manifest.json").exists()
    assert torch.load(mem / "last" / trainer.STATE_NAME, weights_only=True)["step"] == 2

    monkeypatch.undo()
    resumed = spy_resumes(monkeypatch, trainer)
    assert main(["train", "--config", str(config)]) == 0
    assert resumed == [2]
    assert json.loads((mem / "manifest.json").read_text())["complete"] is True
    assert metrics_untimed(mem / "metrics.jsonl") == metrics_untimed(ref.run / "memory" / "metrics.jsonl")
    for sub in ("best", "last"):
        assert (mem / sub / "model.safetensors").read_bytes() == \
            (ref.run / "memory" / sub / "model.safetensors").read_bytes(), sub
