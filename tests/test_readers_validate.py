"""Readers check value ranges when they open an artifact: a corrupt token id, probability or CSR offset is refused
at once with one line naming the file, the first bad position and the command that rewrites it (exit 2), instead
of an index error steps into training reported as a bug."""

import json
import shutil

import numpy as np
import pytest
import yaml

from helpers import tiny_config
from mlpmem.artifacts import Datastore, TargetStore, load_split
from mlpmem.cli import main

SHARD = "-00000-of-00001"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """prepare + extract + index + knn-targets of a tiny run, once (each test corrupts a copy)."""
    tmp = tmp_path_factory.mktemp("built")
    cfg = tiny_config(tmp, "llama", **{"train.max_steps": 2})
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for stage in ("prepare", "extract", "index", "knn-targets"):
        assert main([stage, "--config", str(tmp / "cfg.yaml")]) == 0, stage
    return tmp


@pytest.fixture
def run(built, tmp_path):
    shutil.copytree(built, tmp_path, dirs_exist_ok=True, symlinks=True)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace(str(built), str(tmp_path)))
    return tmp_path / "run", str(cfg)


def _vocab(run_dir) -> int:
    return json.loads((run_dir / "datastore" / "manifest.json").read_text())["model"]["vocab_size"]


def _set(path, pos, value):
    """Overwrite one element of a .npy file in place."""
    a = np.load(path, mmap_mode="r+")
    a[pos] = value
    a.flush()
    del a


def _one_line_error(capsys, stage: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mlpmem ")]
    assert len(err) == 1 and err[0].startswith(f"mlpmem {stage}: error: "), err
    return err[0]


def test_intact_artifacts_open(built):
    run_dir = built / "run"
    tg = TargetStore(run_dir)
    assert tg.rows.nnz > 0 and int(tg.rows.ids[np.arange(tg.rows.nnz)].max()) < _vocab(run_dir)
    Datastore(run_dir)
    for split in ("train", "validation", "test"):
        load_split(run_dir, split)


@pytest.mark.parametrize("name, pos, value, expect", [
    (f"ids{SHARD}.npy", 123, "vocab+100", "id {bad} at position 123 >= vocabulary {vocab}"),
    (f"ids{SHARD}.npy", 5, -1, "id -1 at position 5 < 0"),
    (f"probs{SHARD}.npy", 7, np.nan, "probability nan at position 7 is not in [0, 1]"),
    (f"probs{SHARD}.npy", 8, 1.5, "probability 1.5 at position 8 is not in [0, 1]"),
    (f"offsets{SHARD}.npy", 0, 1, "the offsets start at 1, not 0"),
    (f"offsets{SHARD}.npy", 3, 10**6, "the offsets decrease at row 3"),
    (f"offsets{SHARD}.npy", -1, 10**9, "the offsets end at 1000000000 but ids"),
])
def test_corrupt_targets_are_refused_naming_the_file(run, capsys, name, pos, value, expect):
    run_dir, cfg = run
    vocab = _vocab(run_dir)
    bad = vocab + 100 if value == "vocab+100" else value
    path = run_dir / "targets" / name
    _set(path, pos, bad)
    assert main(["train", "--config", cfg]) == 2
    line = _one_line_error(capsys, "train")
    assert str(path) in line and expect.format(bad=bad, vocab=vocab) in line, line
    assert "mlpmem knn-targets --force" in line, line
    assert not (run_dir / "memory" / "manifest.json").exists()


def test_corrupt_validation_targets_are_refused(run, capsys):
    run_dir, cfg = run
    path = run_dir / "targets" / "validation" / "ids.npy"
    _set(path, 0, _vocab(run_dir))
    assert main(["train", "--config", cfg]) == 2
    line = _one_line_error(capsys, "train")
    assert str(path) in line and f"id {_vocab(run_dir)} at position 0 >= vocabulary" in line, line


def test_corrupt_datastore_values_are_refused(run, capsys):
    run_dir, cfg = run
    path = run_dir / "datastore" / f"vals{SHARD}.npy"
    _set(path, 42, 70000)
    assert main(["index", "--config", cfg, "--force"]) == 2
    line = _one_line_error(capsys, "index")
    assert str(path) in line and f"id 70000 at position 42 >= vocabulary {_vocab(run_dir)}" in line, line
    assert "mlpmem extract --force" in line, line


def test_corrupt_prepared_tokens_are_refused(run, capsys):
    run_dir, cfg = run
    path = run_dir / "data" / "train" / "tokens.npy"
    _set(path, 9, 2**31 - 1)
    assert main(["extract", "--config", cfg, "--force"]) == 2
    line = _one_line_error(capsys, "extract")
    assert str(path) in line and "token 2147483647 at position 9 >= vocabulary" in line, line
    assert "mlpmem prepare --force" in line, line


def test_checks_find_the_first_bad_position_across_chunks(monkeypatch, tmp_path):
    """The passes run in chunks (bounded memory on 100M+ rows): positions are global and a decrease that straddles
    two chunks is still seen. (On files, each pass runs once per version of the file: its result is cached.)"""
    from mlpmem.artifacts import ranges
    from mlpmem.errors import StageError

    monkeypatch.setattr(ranges, "_CHUNK", 4)
    p = tmp_path / "x.npy"
    ids = np.arange(10, dtype=np.int32) % 5
    ranges._scan_ids(p, ids, 5, "cmd", "id")
    ids[6] = 9
    with pytest.raises(StageError, match="id 9 at position 6 >= vocabulary 5"):
        ranges._scan_ids(p, ids, 5, "cmd", "id")
    offsets = np.array([0, 1, 2, 5, 4, 4, 6, 7, 8], dtype=np.int64)  # 5 -> 4 is the step from chunk 0 into 1
    with pytest.raises(StageError, match=r"decrease at row 3 \(5, then 4\)"):
        ranges._scan_offsets(p, offsets, "cmd")
    probs = np.full(9, 0.5, dtype=np.float16)
    probs[8] = np.inf
    with pytest.raises(StageError, match="probability inf at position 8"):
        ranges._scan_probs(p, probs, "cmd")
