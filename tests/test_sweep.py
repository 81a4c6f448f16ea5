"""`mlpmem sweep` on a tiny random model: points link what they share with the base run and run the rest, the
table and JSON cover every point with intervals, an interrupted sweep resumes, and configs can include presets."""

import json

import pytest
import yaml

from helpers import make_texts, tiny_config, write_corpus
from mlpmem.cli import main
from mlpmem.config import ConfigError, load_config, point_name
from mlpmem.studies.sweep import plan


def _cfg_file(tmp_path, **over):
    write_corpus(tmp_path / "corpus.txt", make_texts(20) * 4)
    cfg = tiny_config(tmp_path, "llama", **over)
    d = cfg.to_dict()
    d["sweep"] = {"points": [{}, {"memory.num_blocks": 2}, {"train.epochs": 2}], "name": "study"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    return tmp_path / "cfg.yaml"


def test_sweep_links_shared_stages_and_reports_every_point(tmp_path, capsys):
    path = _cfg_file(tmp_path)
    assert main(["sweep", "--config", str(path)]) == 0
    root, study = tmp_path / "run", tmp_path / "run" / "study"
    for name in ("base", "memory.num_blocks=2", "train.epochs=2"):
        for d in ("data", "datastore", "index", "targets"):
            assert (study / name / d).is_symlink() and (study / name / d).resolve() == (root / d).resolve(), (name, d)
        assert (study / name / "eval" / "manifest.json").is_file()
    # the base point shares the base run's memory; the others trained their own
    assert (study / "base" / "memory").resolve() == (root / "memory").resolve()
    for name in ("memory.num_blocks=2", "train.epochs=2"):
        assert not (study / name / "memory").is_symlink()
    m2 = json.loads((study / "memory.num_blocks=2" / "memory" / "manifest.json").read_text())
    assert m2["memory_config"]["num_blocks"] == 2
    steps = {p: json.loads((study / p / "memory" / "manifest.json").read_text())["summary"]["steps"]
             for p in ("memory.num_blocks=2", "train.epochs=2")}
    assert steps["train.epochs=2"] >= 2 * steps["memory.num_blocks=2"] - 1
    res = json.loads((study / "results.json").read_text())
    rows = {r["point"]: r for r in res["rows"]}
    assert set(rows) == {"base", "memory.num_blocks=2", "train.epochs=2"}
    assert res["split"] == "validation" and res["reference_point"] == "base"
    for name, r in rows.items():
        assert set(r["ppl"]) == {"validation"}  # --sweep.eval: validation only
        assert r["memory_vs_base_lm"]["ci95"][0] <= r["memory_vs_base_lm"]["change"] <= \
            r["memory_vs_base_lm"]["ci95"][1]
        assert (r["memory_vs_base_point"] is None) == (name == "base")
    # the base LM is the same model on the same tokens at every point
    assert len({round(r["ppl"]["validation"]["base"], 9) for r in rows.values()}) == 1
    assert rows["memory.num_blocks=2"]["memory_params"] > rows["base"]["memory_params"]
    assert rows["train.epochs=2"]["values"] == {"memory.num_blocks": 1, "train.epochs": 2.0}
    # wall times come from the run directory that built each output: the base point's memory is the base run's
    assert rows["base"]["wall_seconds"]["train"] == json.loads((root / "timings.json").read_text())["train"]
    assert rows["train.epochs=2"]["wall_seconds"]["train"] != rows["base"]["wall_seconds"]["train"]
    assert (study / "sweep.png").stat().st_size > 0
    assert "| memory.num_blocks=2 |" in capsys.readouterr().out
    # a second call finds every point done: nothing is trained again, the table is the same
    mtime = (study / "train.epochs=2" / "memory" / "manifest.json").stat().st_mtime_ns
    assert main(["sweep", "--config", str(path)]) == 0
    assert (study / "train.epochs=2" / "memory" / "manifest.json").stat().st_mtime_ns == mtime
    assert json.loads((study / "results.json").read_text())["rows"] == res["rows"]


def test_sweep_plan_follows_the_options_each_stage_reads(tmp_path):
    cfg = load_config(_cfg_file(tmp_path))
    ran = lambda pt: [s for s, how, _ in plan(cfg, pt) if how == "run"]  # noqa: E731
    assert ran({}) == ["eval"]
    assert ran({"train.epochs": 4}) == ["train", "eval"]  # extract reads train.val_positions only
    assert ran({"train.val_positions": 50}) == ["extract", "index", "knn-targets", "train", "eval"]
    assert ran({"knn.temperature": 1.0}) == ["knn-targets", "train", "eval"]  # the index reads knn.k only
    assert ran({"data.max_train_tokens": 500})[:3] == ["prepare", "finetune", "extract"]
    assert point_name({"train.epochs": 4.0, "memory.num_blocks": 2}) == "memory.num_blocks=2,train.epochs=4"


def test_sweep_refuses_bad_points(tmp_path):
    path = _cfg_file(tmp_path)
    with pytest.raises(ConfigError, match="sweep.points.*out_dir"):
        load_config(path, {"sweep.points": "[{out_dir: x}]"})
    with pytest.raises(ConfigError, match="twice"):
        load_config(path, {"sweep.points": "[{train.epochs: 2}, {train.epochs: 2}]"})
    with pytest.raises(ConfigError, match="section.option"):
        load_config(path, {"sweep.points": "[{epochs: 2}]"})
    cfg = load_config(path, {"sweep.points": "[{train.epochz: 2}]"})
    assert main(["sweep", "--config", str(path), "--sweep.points", "[{train.epochz: 2}]"]) == 2
    assert cfg.sweep.points == [{"train.epochz": 2}]
    assert main(["sweep", "--config", str(path), "--sweep.points", "[]"]) == 2


def test_config_include_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("out_dir: a\ntrain: {lr: 0.1, epochs: 3}\nmemory: {num_blocks: 2}\n")
    (tmp_path / "study.yaml").write_text("include: base.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(tmp_path / "study.yaml", {"memory.num_blocks": "7"})
    assert (cfg.out_dir, cfg.train.lr, cfg.train.epochs, cfg.memory.num_blocks) == ("a", 0.1, 5.0, 7)
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*included from"):
        load_config(tmp_path / "missing.yaml")


def test_sweep_plan_shares_outputs_between_points_and_skips_what_eval_does_not_read(tmp_path):
    cfg = load_config(_cfg_file(tmp_path), {"sweep.points": "[{knn.datastore_tokens: 300}, "
                                            "{knn.datastore_tokens: 300, memory.num_blocks: 2}, "
                                            "{data.max_train_tokens: 300, finetune.mode: full, eval.systems: [base]}]"})
    size, mem, ft = cfg.sweep.points
    p = {s: (how, owner) for s, how, owner in plan(cfg, size)}
    assert p["extract"] == ("shared", None)  # every size is a prefix of the base run's one extraction
    assert [p[s][0] for s in ("index", "knn-targets", "train", "eval")] == ["run"] * 4
    p = {s: (how, owner) for s, how, owner in plan(cfg, mem)}
    owner = point_name(size)
    assert p["index"] == ("shared", owner) and p["knn-targets"] == ("shared", owner)  # built by the size point
    assert p["train"][0] == "run"
    p = {s: how for s, how, _ in plan(cfg, ft)}  # the fine-tuned LM alone: no datastore, no memory
    assert p == {"prepare": "run", "finetune": "run", "extract": "skip", "index": "skip", "knn-targets": "skip",
                 "train": "skip", "eval": "run"}


def test_scaling_sweep_uses_prefixes_of_one_extraction(tmp_path, capsys):
    from mlpmem.artifacts import Datastore

    path = _cfg_file(tmp_path, **{"eval.splits": ["validation", "test"]})
    d = yaml.safe_load(path.read_text())
    d["sweep"] = {"name": "scale", "eval": {"splits": ["validation", "test"],
                                           "systems": ["base", "knn", "memory", "memory+knn"]},
                  "points": [{"knn.datastore_tokens": 400}, {}, {"knn.datastore_tokens": 400, "memory.num_blocks": 2},
                             {"data.max_train_tokens": 400, "finetune.mode": "full", "eval.systems": ["base"]}]}
    path.write_text(yaml.safe_dump(d))
    assert main(["sweep", "--config", str(path)]) == 0
    root, scale = tmp_path / "run", tmp_path / "run" / "scale"
    small, full = scale / "knn.datastore_tokens=400", scale / "base"
    n = Datastore(root).n
    assert n > 400 and (small / "datastore").resolve() == (root / "datastore").resolve()
    assert json.loads((small / "index" / "manifest.json").read_text())["ntotal"] == 400
    assert json.loads((small / "targets" / "manifest.json").read_text())["n_positions"] == 400
    assert json.loads((full / "index" / "manifest.json").read_text())["ntotal"] == n
    mem = scale / "knn.datastore_tokens=400,memory.num_blocks=2"
    assert (mem / "targets").resolve() == (small / "targets").resolve()
    assert json.loads((mem / "memory" / "manifest.json").read_text())["memory_config"]["num_blocks"] == 2
    res = json.loads((scale / "results.json").read_text())
    assert res["scaling"] and len(res["rows"]) == 4
    assert {r["datastore_tokens"] for r in res["rows"]} == {400, n, None}
    ft = [r for r in res["rows"] if r["options"].get("finetune.mode") == "full"][0]
    assert ft["train_epochs"] is None and ft["memory_params"] is None  # it trains no memory: no epochs shown
    assert f"| {ft['point']} | - | - |" in res["table"]
    # the fine-tuned LM against the base LM on the same test tokens: a paired interval around its own change
    ci = ft["finetuned_vs_base_lm"]
    base_ppl = {r["datastore_tokens"]: r for r in res["rows"]}[400]["splits"]["test"]["systems"]["base"]["ppl"]
    assert ci["change"] == pytest.approx(ft["splits"]["test"]["systems"]["base"]["ppl"] / base_ppl - 1, rel=1e-6)
    assert ci["ci95"][0] <= ci["change"] <= ci["ci95"][1]
    out = capsys.readouterr().out
    assert "### Corpus size (test perplexity" in out and "| 400 |" in out and "### Memory size at 400" in out
    assert (scale / "scaling.png").stat().st_size > 0
    proj = res["projection"]["sizes"]
    small_rows = {r["datastore_tokens"]: r for r in res["rows"]}[400]["facts"]
    assert small_rows["targets_rows"] == 400 and small_rows["index_keys"] == 400
    # linear stages scale with the corpus: 10x the tokens, 10x the extraction and the datastore
    assert proj["1000000000"]["extract_s"] == pytest.approx(10 * proj["100000000"]["extract_s"])
    assert proj["1000000000"]["datastore_bytes"] == pytest.approx(10 * proj["100000000"]["datastore_bytes"])
    assert "### Projection from the throughput measured at" in out
    with pytest.raises(Exception, match="exceeds the"):  # a prefix longer than the extraction
        Datastore(root, limit=n + 1)


def test_sweep_writes_the_finished_points_before_a_later_one_fails(tmp_path):
    path = _cfg_file(tmp_path)
    d = yaml.safe_load(path.read_text())
    d["sweep"] = {"name": "partial", "points": [{"knn.datastore_tokens": 300}, {"knn.datastore_tokens": 10**9}]}
    path.write_text(yaml.safe_dump(d))
    assert main(["sweep", "--config", str(path)]) == 2  # the second prefix is longer than the extraction
    res = json.loads((tmp_path / "run" / "partial" / "results.json").read_text())
    assert [r["point"] for r in res["rows"]] == ["knn.datastore_tokens=300"]
