"""End to end: the whole pipeline on a tiny random model through the CLI, asserting the artifact tree and metrics."""

import json

import pytest
import yaml

from helpers import make_texts, tiny_config, write_corpus
from mlpmem.cli import main


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pipeline_end_to_end(tmp_path, family, capsys):
    # A memorisable corpus: 20 documents, each 4 times, so validation and test text also stands in train. There
    # kNN-LM and a trained memory must beat the untrained base LM, and any broken link shows as no gain.
    write_corpus(tmp_path / "corpus.txt", make_texts(20) * 4)
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
    for split in ("validation", "test"):
        ppl = {k: v["ppl"] for k, v in res["splits"][split]["systems"].items()}
        assert all(1.0 < p < 1e4 for p in ppl.values()), ppl
        for system in ("knn", "memory", "memory+knn"):
            assert ppl[system] < 0.9 * ppl["base"], (split, system, ppl)
    out = capsys.readouterr().out
    assert "| base |" in out and "test PPL" in out
    # a second run skips every stage (manifests match) and prints the same table
    assert main(args) == 0
    assert "| base |" in capsys.readouterr().out



def test_eval_resumes_from_saved_scores(tmp_path, monkeypatch, capsys):
    """A crash after scoring loses nothing: a rerun reuses each split's saved scores; another config rescores."""
    from mlpmem.stages import eval as eval_stage

    cfg = tiny_config(tmp_path, "llama", **{"eval.systems": ["base", "memory"]})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["pipeline", "--config", str(tmp_path / "cfg.yaml")]) == 0
    ev = tmp_path / "run" / "eval"
    first = json.loads((ev / "results.json").read_text())
    (ev / "manifest.json").unlink()  # as if the stage died after scoring, before its manifest

    def no_scoring(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(eval_stage, "score_tokens", no_scoring)
    assert main(["eval", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert json.loads((ev / "results.json").read_text())["splits"] == first["splits"]
    # a changed setting changes the fingerprint: the saved scores are not reused
    (ev / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["eval", "--config", str(tmp_path / "cfg.yaml"), "--eval.memory_temperatures", "1.0,2.0"]) == 1
    assert "internal error (AssertionError: scored again)" in capsys.readouterr().err
