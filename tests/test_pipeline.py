"""End to end: the whole pipeline on a tiny random model through the CLI, asserting the artifact tree and metrics."""

import json

import pytest
import yaml

from helpers import tiny_config
from mlpmem.cli import main


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pipeline_end_to_end(tmp_path, family, capsys):
    cfg = tiny_config(tmp_path, family)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    args = ["pipeline", "--config", str(tmp_path / "cfg.yaml"), "--train.epochs", "2"]
    assert main(args) == 0
    run = tmp_path / "run"
    for stage in ("data", "datastore", "datastore/validation", "index", "targets", "memory", "eval"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["complete"] is True, stage
    res = json.loads((run / "eval" / "results.json").read_text())
    systems = res["splits"]["test"]["systems"]
    assert set(systems) >= {"base", "knn", "memory", "memory alone", "memory+knn"}
    for s in systems.values():
        assert s["ppl"] > 1.0
    out = capsys.readouterr().out
    assert "| base |" in out and "test PPL" in out
    # a second run skips every stage (manifests match) and prints the same table
    assert main(args) == 0
    assert "| base |" in capsys.readouterr().out

