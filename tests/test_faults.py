"""Fault injection with real signals to real processes: a stage SIGKILLed at its fault point (MLPMEM_FAULT), a second
writer refused by the run lock, a write over RLIMIT_FSIZE. After each, a plain rerun completes and its outputs equal
an uninterrupted run's byte for byte, with no leftovers of the killed run.

Only the process that is hurt is a subprocess (a SIGKILL, an rlimit or a lock refusal needs one); the uninterrupted
reference and the reruns call the CLI's ``main`` in this process, since each subprocess costs seconds of imports on
the shared CPUs. Both run single-threaded (conftest / OMP_NUM_THREADS=1), so their numbers are the same.
"""

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
import yaml

from helpers import metrics_untimed, spy_resumes, tiny_config
from mlpmem.cli import main

# Small enough to be fast, large enough that every fault point is reached more than once: extract flushes every 8
# batches of window.batch_size 4 (~200 train windows), knn-targets writes blocks of 128 queries (~6500 rows), train
# checkpoints every 2 of its ~100 steps.
OVERRIDES = {"train.save_every": 2, "train.eval_every": 2, "knn.query_batch": 128, "window.batch_size": 4}
STAGES = ["prepare", "extract", "index", "knn-targets", "train", "eval"]
# stage -> the reference's stage directories copied into a fresh run so that only the stage under test runs
UPSTREAM = {"prepare": [], "finetune": ["data"], "extract": ["data"], "index": ["data", "datastore"],
            "knn-targets": ["data", "datastore", "index"], "train": ["data", "datastore", "index", "targets"],
            "eval": ["data", "datastore", "index", "targets", "memory"],
            "joint": ["data", "datastore", "index", "targets", "memory", "eval"]}
# fine-tuning and joint training (off in the reference run): 6 steps of 4 windows, a checkpoint every 2 steps, so a
# kill at the second checkpoint (step 4) resumes from step 2 and trains on; the same settings serve both stages
TRAINING = {"lr": 1e-3, "batch_size": 4, "max_steps": 6, "warmup_steps": 1, "eval_every": 2, "save_every": 2,
            "val_windows": 4}
FINETUNE = {"finetune.mode": "full", **{f"finetune.{k}": v for k, v in TRAINING.items()}}
# lambda fixed so the test does not depend on what eval tuned; LoRA (seeded adapters, reseeded dropout) for variety
JOINT = {"joint.mode": "lora", "joint.lam": 0.5, **{f"joint.{k}": v for k, v in TRAINING.items()}}
TMP_MARK = ".mlpmem-tmp"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLPMEM_FAULT"}
    return {**env, "OMP_NUM_THREADS": "1", "MLPMEM_NO_PROGRESS": "1", **extra}


def run_cli(stage: str, config: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m mlpmem <stage> --config <config>`` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "mlpmem", stage, "--config", str(config)],
                          env=env if env is not None else _env(), capture_output=True, text=True, timeout=300, **kw)


def run_inproc(stage: str, config: Path) -> int:
    """The same command through the CLI's main in this process (no fault armed)."""
    assert "MLPMEM_FAULT" not in os.environ
    return main([stage, "--config", str(config)])


def write_config(base: Path, run: Path, where: Path, **extra) -> Path:
    """A config whose model and corpus are the module's (so fingerprints match the reference) and whose out_dir is
    ``run`` (``extra``: more overrides, e.g. a fine-tuning mode)."""
    cfg = tiny_config(base, "llama", out_dir=str(run), **{**OVERRIDES, **extra})
    where.write_text(yaml.safe_dump(cfg.to_dict()))
    return where


def leftovers(run: Path) -> list[str]:
    """Temporary names, and ``.NAME.v-*`` versions that the NAME symlink does not point to, under ``run``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(run):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if TMP_MARK in name:
                found.append(str(p.relative_to(run)))
            elif name.startswith(".") and ".v-" in name and p.is_dir():
                link = p.parent / name[1:].split(".v-")[0]
                if not (link.is_symlink() and os.readlink(link) == name):
                    found.append(str(p.relative_to(run)))
    return found


def assert_same_npy(run: Path, ref: Path, rel: str) -> int:
    """Every .npy under ref/rel exists under run/rel with the same bytes (and no other .npy); returns the count."""
    want = sorted(p.relative_to(ref) for p in (ref / rel).rglob("*.npy"))
    got = sorted(p.relative_to(run) for p in (run / rel).rglob("*.npy"))
    assert got == want
    assert want, f"no arrays under {ref / rel}"
    for p in want:
        assert (run / p).read_bytes() == (ref / p).read_bytes(), f"{p} differs from the uninterrupted run's"
    return len(want)


def killed(r: subprocess.CompletedProcess, point: str) -> None:
    assert r.returncode == -signal.SIGKILL, (
        f"fault point {point} did not kill the process (rc {r.returncode}); stderr:\n{r.stderr[-3000:]}")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted run, stage by stage, shared by the module's tests (and their model and corpus)."""
    base = tmp_path_factory.mktemp("faults")
    config = write_config(base, base / "ref", base / "ref.yaml")
    for stage in STAGES:
        assert run_inproc(stage, config) == 0, stage
    return SimpleNamespace(base=base, run=base / "ref")


@pytest.fixture
def fresh(ref, tmp_path, monkeypatch):
    """A new run directory holding copies of the reference's stage outputs upstream of a stage; returns
    (run dir, config path)."""
    monkeypatch.delenv("MLPMEM_FAULT", raising=False)

    def make(stage: str, **extra) -> tuple[Path, Path]:
        run = tmp_path / "run"
        run.mkdir()
        for d in UPSTREAM[stage]:
            shutil.copytree(ref.run / d, run / d, symlinks=True)
        return run, write_config(ref.base, run, tmp_path / "cfg.yaml", **extra)

    return make


def manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text())


def _reference(ref, stage: str, extra: dict) -> Path:
    """An uninterrupted run of ``stage`` (off in the module's reference run) on copies of the reference's inputs."""
    run = ref.base / f"ref-{stage}"
    run.mkdir()
    for d in UPSTREAM[stage]:
        shutil.copytree(ref.run / d, run / d, symlinks=True)
    assert run_inproc(stage, write_config(ref.base, run, ref.base / f"ref-{stage}.yaml", **extra)) == 0, stage
    return run


@pytest.fixture(scope="module")
def finetune_ref(ref):
    return _reference(ref, "finetune", FINETUNE)


@pytest.fixture(scope="module")
def joint_ref(ref):
    return _reference(ref, "joint", JOINT)


def assert_killed_inside_last_swap(run: Path, out: Path, at_step: int) -> None:
    """``out/last`` still names the complete checkpoint of ``at_step``; the next one, written but not switched in,
    is the run's one leftover."""
    import torch

    from mlpmem.components.finetune import WEIGHTS_NAME
    from mlpmem.components.trainer import STATE_NAME

    current = out / os.readlink(out / "last")
    assert {WEIGHTS_NAME, STATE_NAME} <= {p.name for p in current.iterdir()}
    assert torch.load(current / STATE_NAME, map_location="cpu", weights_only=True)["step"] == at_step
    versions = sorted(p.name for p in out.glob(".last.v-*"))
    assert len(versions) == 2 and current.name in versions
    assert leftovers(run) == [f"{out.name}/{v}" for v in versions if v != current.name]


def assert_same_training(out: Path, want: Path, weights: list[str]) -> None:
    """The resumed training's files equal the uninterrupted run's: ``weights`` (paths under the stage directory),
    both checkpoints, the log and the manifest's numbers; no stale checkpoint versions."""
    from mlpmem.components.finetune import WEIGHTS_NAME

    for rel in weights + [f"best/{WEIGHTS_NAME}", f"last/{WEIGHTS_NAME}"]:
        assert (out / rel).read_bytes() == (want / rel).read_bytes(), f"{rel} differs from the uninterrupted run's"
    assert metrics_untimed(out / "metrics.jsonl") == metrics_untimed(want / "metrics.jsonl")
    got, ref_m = manifest(out), manifest(want)
    assert got["complete"] is True
    for k in ("steps", "tokens", "best_step", "best_val_loss", "base_val_loss", "final_train_loss"):
        assert got[k] == ref_m[k], k
    for sub in ("best", "last"):
        assert [p.name for p in out.glob(f".{sub}.v-*")] == [os.readlink(out / sub)]


# ----------------------------------------------------------------------------- one test per fault point

def test_prepare_killed_between_splits_then_rerun(ref, fresh):
    run, config = fresh("prepare")
    r = run_cli("prepare", config, _env(MLPMEM_FAULT="prepare.split@2"))
    killed(r, "prepare.split@2")
    data = run / "data"
    assert not (data / "manifest.json").exists()
    # killed after the second split's files, before the third's: a partial stage, which is what must recover
    assert (data / "validation" / "tokens.npy").is_file() and not (data / "test").exists()

    assert run_inproc("prepare", config) == 0
    assert manifest(data)["complete"] is True
    assert assert_same_npy(run, ref.run, "data") == 6
    assert leftovers(run) == []


def test_extract_killed_after_a_flush_resumes(ref, fresh):
    from mlpmem.stages.extract import FLUSH_EVERY

    run, config = fresh("extract")
    r = run_cli("extract", config, _env(MLPMEM_FAULT="extract.flush@2"))
    killed(r, "extract.flush@2")
    ds = run / "datastore"
    assert not (ds / "manifest.json").exists()
    prog = json.loads((ds / ".progress-00000.json").read_text())
    assert prog["done"] == 2 * FLUSH_EVERY * OVERRIDES["window.batch_size"]  # windows flushed before the kill

    assert run_inproc("extract", config) == 0
    for d in (ds, ds / "validation"):
        assert manifest(d)["complete"] is True
    shard = json.loads((ds / ".shard-00000.json").read_text())
    rows = shard["stop"] - shard["start"]
    assert 0 < shard["computed"] < rows  # the rerun resumed: it computed only the rows the killed run had not
    assert not (ds / ".progress-00000.json").exists()
    assert assert_same_npy(run, ref.run, "datastore") == 4  # keys + vals, train and validation
    assert leftovers(run) == []


def test_knn_targets_killed_after_a_block_resumes(ref, fresh):
    run, config = fresh("knn-targets")
    r = run_cli("knn-targets", config, _env(MLPMEM_FAULT="knn-targets.block@2"))
    killed(r, "knn-targets.block@2")
    tg = run / "targets"
    assert not (tg / "manifest.json").exists()
    qb = OVERRIDES["knn.query_batch"]
    assert json.loads((tg / ".progress-00000.json").read_text())["done"] == 2 * qb

    assert run_inproc("knn-targets", config) == 0
    m = manifest(tg)
    assert m["complete"] is True
    assert m["stats"]["0"]["rows"] == m["n_positions"] - 2 * qb  # resumed after the two blocks on disk
    assert assert_same_npy(run, ref.run, "targets") == 6  # offsets + ids + probs, train and validation
    assert leftovers(run) == []


def test_index_killed_before_its_rename_rebuilds(ref, fresh):
    run, config = fresh("index")
    r = run_cli("index", config, _env(MLPMEM_FAULT="index.write"))
    killed(r, "index.write")
    ix = run / "index"
    assert not (ix / "manifest.json").exists() and not (ix / "index.faiss").exists()  # never half a file
    left = leftovers(run)
    assert len(left) == 1 and left[0].startswith("index/.index.faiss.") and left[0].endswith(TMP_MARK), left

    assert run_inproc("index", config) == 0
    m = manifest(ix)
    assert m["complete"] is True and m["ntotal"] == manifest(ref.run / "index")["ntotal"] > 0
    assert (ix / "index.faiss").read_bytes() == (ref.run / "index" / "index.faiss").read_bytes()
    assert leftovers(run) == []


def test_finetune_killed_inside_checkpoint_swap_resumes(ref, finetune_ref, fresh, monkeypatch):
    from mlpmem.components import finetune as ft

    run, config = fresh("finetune", **FINETUNE)
    r = run_cli("finetune", config, _env(MLPMEM_FAULT="finetune.checkpoint@2"))
    killed(r, "finetune.checkpoint@2")
    out = run / "finetune"
    assert not (out / "manifest.json").exists() and not (out / "model").exists()
    save_every = TRAINING["save_every"]
    assert_killed_inside_last_swap(run, out, save_every)

    resumed = spy_resumes(monkeypatch, ft)
    assert run_inproc("finetune", config) == 0
    assert resumed == [save_every]  # mid-training: steps save_every + 1 .. max_steps ran again
    assert_same_training(out, finetune_ref / "finetune", ["model/model.safetensors"])
    assert manifest(out)["steps"] == TRAINING["max_steps"]
    assert leftovers(run) == []


def test_joint_killed_inside_checkpoint_swap_resumes(ref, joint_ref, fresh, monkeypatch):
    """Joint training runs the fine-tuning loop (its fault point is the loop's), over the LM's LoRA adapters and the
    memory together: both end as the uninterrupted run's."""
    from mlpmem.components import finetune as ft

    run, config = fresh("joint", **JOINT)
    r = run_cli("joint", config, _env(MLPMEM_FAULT="finetune.checkpoint@2"))
    killed(r, "finetune.checkpoint@2")
    out = run / "joint"
    assert not (out / "manifest.json").exists() and not (out / "model").exists() and not (out / "memory").exists()
    assert_killed_inside_last_swap(run, out, TRAINING["save_every"])

    resumed = spy_resumes(monkeypatch, ft)
    assert run_inproc("joint", config) == 0
    assert resumed == [TRAINING["save_every"]]
    assert_same_training(out, joint_ref / "joint", ["model/model.safetensors", "memory/model.safetensors"])
    assert leftovers(run) == []


def test_joint_killed_between_its_two_exports_finishes_them(ref, joint_ref, fresh, monkeypatch):
    """Killed after the joint LM is exported and before its memory is: the rerun trains nothing (the final
    checkpoint is complete) and writes both, as the uninterrupted run did."""
    from mlpmem.components import finetune as ft

    run, config = fresh("joint", **JOINT)
    r = run_cli("joint", config, _env(MLPMEM_FAULT="joint.export"))
    killed(r, "joint.export")
    out = run / "joint"
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / "memory").exists() and not (out / "manifest.json").exists()
    assert leftovers(run) == []

    resumed = spy_resumes(monkeypatch, ft)
    monkeypatch.setattr(ft, "window_loss", lambda *a, **k: pytest.fail("trained or validated again"))
    assert run_inproc("joint", config) == 0
    assert resumed == [TRAINING["max_steps"]]
    assert_same_training(out, joint_ref / "joint", ["model/model.safetensors", "memory/model.safetensors"])
    assert leftovers(run) == []


def test_train_killed_inside_checkpoint_swap_resumes(ref, fresh, monkeypatch):
    import torch

    from mlpmem.components import trainer

    run, config = fresh("train")
    r = run_cli("train", config, _env(MLPMEM_FAULT="train.checkpoint@2"))
    killed(r, "train.checkpoint@2")
    mem = run / "memory"
    assert not (mem / "manifest.json").exists()
    # `last` still names the complete step-2 checkpoint; the step-4 version, written but not switched, is a leftover
    assert (mem / "last").is_symlink()
    current = mem / os.readlink(mem / "last")
    assert {"model.safetensors", "trainer_state.pt", "config.json"} <= {p.name for p in current.iterdir()}
    state = torch.load(current / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == OVERRIDES["train.save_every"]
    versions = sorted(p.name for p in mem.glob(".last.v-*"))
    assert len(versions) == 2 and current.name in versions
    assert leftovers(run) == [f"memory/{v}" for v in versions if v != current.name]
    # the next writer sweeps it when it takes the lock, and nothing else: `last` keeps its version
    from mlpmem.artifacts.lock import run_lock

    with run_lock(run, "test sweep"):
        assert leftovers(run) == []
    assert [p.name for p in mem.glob(".last.v-*")] == [current.name] == [os.readlink(mem / "last")]
    assert (current / "trainer_state.pt").is_file() and (current / "model.safetensors").is_file()

    resumed = []
    load_last = trainer._load_last

    def spy(*a, **k):
        st = load_last(*a, **k)
        resumed.append(int(st["step"]))
        return st

    monkeypatch.setattr(trainer, "_load_last", spy)
    assert run_inproc("train", config) == 0
    assert resumed == [OVERRIDES["train.save_every"]]
    assert manifest(mem)["complete"] is True
    for sub in ("best", "last"):
        assert (mem / sub / "model.safetensors").read_bytes() == \
            (ref.run / "memory" / sub / "model.safetensors").read_bytes(), sub
    assert [p.name for p in mem.glob(".last.v-*")] == [os.readlink(mem / "last")]
    assert [p.name for p in mem.glob(".best.v-*")] == [os.readlink(mem / "best")]

    assert metrics_untimed(mem / "metrics.jsonl") == metrics_untimed(ref.run / "memory" / "metrics.jsonl")
    assert leftovers(run) == []


def test_eval_killed_before_manifest_reuses_scores(ref, fresh, monkeypatch):
    from mlpmem.stages import eval as eval_stage

    run, config = fresh("eval")
    r = run_cli("eval", config, _env(MLPMEM_FAULT="eval.results"))
    killed(r, "eval.results")
    ev = run / "eval"
    assert (ev / "results.json").is_file() and not (ev / "manifest.json").exists()
    at_kill = json.loads((ev / "results.json").read_text())

    def no_scoring(*a, **k):
        raise AssertionError("scored again instead of reusing the killed run's saved scores")

    monkeypatch.setattr(eval_stage, "score_tokens", no_scoring)
    assert run_inproc("eval", config) == 0
    m = manifest(ev)
    assert m["complete"] is True
    res = json.loads((ev / "results.json").read_text())
    assert res["fingerprint"] == m["fingerprint"]
    assert res["splits"] == at_kill["splits"]  # the same saved scores, timings included

    def untimed(splits: dict) -> dict:  # each split's scoring "seconds" differ between runs; the rest must not
        return {name: {k: v for k, v in sp.items() if k != "seconds"} for name, sp in splits.items()}

    want = json.loads((ref.run / "eval" / "results.json").read_text())
    assert set(res["splits"]) == {"validation", "test"}
    assert untimed(res["splits"]) == untimed(want["splits"])
    assert leftovers(run) == []


# ----------------------------------------------------------------------------- the lock and a full disk

def test_second_writer_is_refused_with_the_holders_pid(ref, fresh):
    from mlpmem.artifacts.lock import run_lock

    run, config = fresh("extract")
    with run_lock(run, "test holder"):
        r = run_cli("extract", config)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mlpmem extract: error: ")
    assert "is being written by" in lines[0] and f"pid {os.getpid()} " in lines[0]
    assert "test holder" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (run / "datastore").exists()  # refused before writing anything


def test_extract_over_file_size_limit_fails_cleanly_then_resumes(ref, fresh):
    run, config = fresh("extract")
    keys = ref.run / "datastore" / "keys-00000-of-00001.npy"
    vals = ref.run / "datastore" / "vals-00000-of-00001.npy"
    limit = 100_000
    # the values memmap (and every small file) fits under the limit, the train keys do not
    assert vals.stat().st_size < limit < keys.stat().st_size

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    r = run_cli("extract", config, preexec_fn=limited)
    assert r.returncode == 1, f"rc {r.returncode}; stderr:\n{r.stderr[-3000:]}"  # DiskSpaceError: the machine's, exit 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mlpmem extract: error:"), r.stderr
    assert "keys-00000-of-00001.npy" in last and ("space" in last or "size limit" in last), last
    assert "Traceback" not in r.stderr and "Bus error" not in r.stderr
    assert not (run / "datastore" / "manifest.json").exists()
    assert not (run / "datastore" / "keys-00000-of-00001.npy").exists()  # no header-only stub left behind

    assert run_inproc("extract", config) == 0
    assert manifest(run / "datastore")["complete"] is True
    assert assert_same_npy(run, ref.run, "datastore") == 4
    assert leftovers(run) == []
