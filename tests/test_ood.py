"""Out-of-domain scoring (--eval.ood_source) on a tiny run: an extra split `ood` scored at the settings tuned on
validation, prepared once into <run>/ood/ outside prepare's fingerprint, and compare's out-of-domain columns."""

import json

import numpy as np
import pytest
import yaml

from helpers import make_texts, tiny_config, write_corpus
from mlpmem.cli import main

UPSTREAM = ("data", "datastore", "index", "targets", "memory")


def _stamps(run, dirs):
    return {d: (json.loads((run / d / "manifest.json").read_text())["fingerprint"],
                (run / d / "manifest.json").stat().st_mtime_ns) for d in dirs}


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory):
    """A tiny pipeline laid out as compare's vanilla variant, run without and then with an out-of-domain corpus."""
    tmp = tmp_path_factory.mktemp("ood")
    write_corpus(tmp / "corpus.txt", make_texts(20) * 4)
    ood = write_corpus(tmp / "other.txt", [t.upper() for t in make_texts(40, seed=7)])  # unseen byte pairs
    cfg = tiny_config(tmp, "llama", out_dir=str(tmp / "cmp" / "vanilla"))
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    args = ["pipeline", "--config", str(tmp / "cfg.yaml")]
    assert main(args) == 0
    run = cfg.run_dir
    before = json.loads((run / "eval" / "results.json").read_text())
    stamps = _stamps(run, UPSTREAM)
    ood_args = ["--eval.ood_source", str(ood), "--eval.ood_tokens", "1200"]
    assert main(args + ood_args) == 0  # only eval reruns (its inputs now include the ood corpus)
    return tmp, run, ood, before, stamps, ood_args


def test_ood_split_is_scored_at_the_settings_tuned_on_validation(ood_run):
    tmp, run, ood, before, stamps, _ = ood_run
    res = json.loads((run / "eval" / "results.json").read_text())
    assert list(res["splits"]) == ["validation", "test", "ood"] and res["tuned_on"] == "validation"
    # validation scored the same tokens with the same model: the same lambdas and temperatures as without ood
    assert res["settings"] == before["settings"]
    systems = res["splits"]["ood"]["systems"]
    assert set(systems) >= {"base", "knn", "memory", "memory+knn"}
    for name, s in systems.items():
        assert {k: v for k, v in s.items() if k not in ("ppl", "vs_base")} == res["settings"][name]
        if name != "base":
            lo, hi = s["vs_base"]["ci95"]
            assert lo <= s["vs_base"]["change"] <= hi and s["vs_base"]["documents"] >= 2
            assert s["vs_base"]["change"] == pytest.approx(s["ppl"] / systems["base"]["ppl"] - 1, rel=1e-9)
    assert res["ood"]["source"] == str(ood) and res["ood"]["tokens"] == res["splits"]["ood"]["tokens"] + 1
    assert "ood PPL" in (run / "eval" / "results.md").read_text()
    # adding the ood corpus made no upstream stage stale: prepare, extract, index, knn-targets, train untouched
    assert _stamps(run, UPSTREAM) == stamps


def test_ood_artifact_is_a_seeded_sample_with_its_own_manifest(ood_run):
    from mlpmem.components.data import shuffle_documents, tokenize_split
    from mlpmem.components.lm import load_tokenizer

    tmp, run, ood, *_ = ood_run
    m = json.loads((run / "ood" / "manifest.json").read_text())
    assert m["stage"] == "ood" and m["complete"] and m["upstream"] == {}
    data = json.loads((run / "data" / "manifest.json").read_text())
    assert m["tokenizer_hash"] == data["tokenizer_hash"] and m["separator"] == data["separator"]
    ev = json.loads((run / "eval" / "manifest.json").read_text())
    assert ev["upstream"]["ood"] == m["fingerprint"]
    # documents shuffled by --data.seed, whole documents up to --eval.ood_tokens, laid out as a prepared split
    docs = [d for d in ood.read_text().split("\n") if d.strip()]
    order = shuffle_documents(docs, 42, "ood")
    assert order != docs and sorted(order) == sorted(docs)
    tok = load_tokenizer(tiny_config(tmp, "llama").model)
    tokens, offsets = tokenize_split(tok, order, data["separator"], 1200)
    assert np.array_equal(np.load(run / "ood" / "tokens.npy"), tokens)
    assert np.array_equal(np.load(run / "ood" / "offsets.npy"), offsets)
    assert m["counts"]["ood"] == {"tokens": len(tokens), "documents": len(offsets) - 1} and len(tokens) <= 1200


def test_ood_is_prepared_once_and_off_leaves_fingerprints_alone(ood_run, capsys):
    tmp, run, ood, _, stamps, ood_args = ood_run
    files = {p: p.stat().st_mtime_ns for p in (run / "ood").iterdir()}
    cfg = ["eval", "--config", str(tmp / "cfg.yaml")]
    assert main(cfg + ood_args) == 0  # up to date: skipped
    assert main(cfg + ood_args + ["--force"]) == 0  # scored again, on the same prepared corpus
    assert {p: p.stat().st_mtime_ns for p in (run / "ood").iterdir()} == files
    # another cap is other settings: refused without --force, like any eval setting
    assert main(cfg + ["--eval.ood_source", str(ood), "--eval.ood_tokens", "600"]) == 2
    assert "--force" in capsys.readouterr().err
    # off again: the ood options do not enter eval's fingerprint, whatever --eval.ood_tokens says
    assert main(["pipeline", "--config", str(tmp / "cfg.yaml")]) == 0
    fp = json.loads((run / "eval" / "manifest.json").read_text())["fingerprint"]
    assert main(cfg + ["--eval.ood_tokens", "999"]) == 0
    assert json.loads((run / "eval" / "manifest.json").read_text())["fingerprint"] == fp
    assert "ood" not in json.loads((run / "eval" / "results.json").read_text())["splits"]
    assert _stamps(run, UPSTREAM) == stamps


def test_compare_table_has_out_of_domain_columns(ood_run):
    from mlpmem.studies.compare import table
    from mlpmem.config import load_config

    tmp, run, ood, _, _, ood_args = ood_run
    assert main(["pipeline", "--config", str(tmp / "cfg.yaml")] + ood_args) == 0
    cfg = load_config(tmp / "cfg.yaml", {"out_dir": str(tmp / "cmp"), "compare.variants": ["vanilla"],
                                         "eval.ood_source": str(ood), "eval.ood_tokens": 1200})
    res = table(cfg)
    rows = {r["row"]: r for r in res["rows"]}
    base = rows["base LM"]["ood_ppl"]
    assert res["ood"]["tokens"] > 0 and res["ood"]["documents"] >= 2
    for label in ("base + kNN-LM", "base + memory", "base + memory + kNN-LM"):
        vs = rows[label]["ood_vs_base"]
        assert vs["change"] == pytest.approx(rows[label]["ood_ppl"] / base - 1, rel=1e-9)
        assert vs["ci95"][0] <= vs["change"] <= vs["ci95"][1]
        assert rows[label]["vs_base"] is not None  # the in-domain change beside it
    assert "| ood PPL | ood vs base LM (95% CI) |" in res["table"] and "Out of domain" in res["table"]


def test_ood_options_are_checked():
    from mlpmem.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="--eval.splits.*ood_source"):
        load_config(None, {"eval.splits": ["validation", "ood"]})
    with pytest.raises(ConfigError, match="--eval.splits"):
        load_config(None, {"eval.splits": ["ood"], "eval.ood_source": "x"})
    with pytest.raises(ConfigError, match="--eval.ood_tokens"):
        load_config(None, {"eval.ood_tokens": 1})
    with pytest.raises(ConfigError, match="--eval.out_name"):
        load_config(None, {"eval.out_name": "ood"})
