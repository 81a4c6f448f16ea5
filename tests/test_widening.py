"""Tuned values on the edge of their grid: the grid is widened and the split scored again, for kNN-LM's and the
memory's temperatures in `eval`, and for the targets' temperature in `knn-targets`."""

import json

import numpy as np
import pytest
import yaml

from helpers import make_texts, tiny_config, write_corpus
from mlpmem.artifacts import load_eval_scores
from mlpmem.cli import main
from mlpmem.components.interpolate import perplexity
from mlpmem.components.scoring import Scored
from mlpmem.components.tuning import MAX_WIDENINGS, system_logprobs, widened_grids
from mlpmem.config import load_config


def test_widened_grids_extend_past_each_edge():
    sc = Scored(lm=np.zeros(3), mem=np.zeros((3, 3)), knn=np.zeros((2, 3)), mem_T=[0.5, 1.0, 2.0], knn_T=[1.0, 4.0])
    cfg = load_config(None, {"eval.lambdas": [0.0, 0.1, 0.2]})
    res = {"edges": {"knn": ["T"], "memory": ["T_mem", "lam"]},
           "settings": {"knn": {"T": 1.0, "lam": 0.1}, "memory": {"T_mem": 2.0, "lam": 0.2}}}
    g = widened_grids(res, sc, cfg)
    assert g == {"knn_temperatures": [0.5, 1.0, 4.0], "memory_temperatures": [0.5, 1.0, 2.0, 4.0],
                 "lambdas": [0.0, 0.1, 0.2, 0.6]}
    assert widened_grids({"edges": {}, "settings": {}}, sc, cfg) is None


def test_eval_widens_temperature_grids_and_scores_again(tmp_path):
    write_corpus(tmp_path / "corpus.txt", make_texts(20) * 4)
    # grids far above any useful temperature: kNN-LM's and the memory's optimum lie below both
    cfg = tiny_config(tmp_path, "llama", **{"eval.knn_temperatures": [256.0, 512.0],
                                            "eval.memory_temperatures": [16.0, 32.0], "knn.temperature": 1.0})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["pipeline", "--config", str(tmp_path / "cfg.yaml")]) == 0
    run = tmp_path / "run"
    res = json.loads((run / "eval" / "results.json").read_text())
    grids = res["grids"]
    # each round adds half of the lowest value: 3 rounds at most
    assert grids["knn_temperatures"][:2] in ([32.0, 64.0], [64.0, 128.0]) or len(grids["knn_temperatures"]) <= 5
    assert min(grids["knn_temperatures"]) < 256 and min(grids["memory_temperatures"]) < 16
    assert len(grids["knn_temperatures"]) <= 2 + MAX_WIDENINGS
    st = res["settings"]
    assert st["knn"]["T"] < 256 and st["memory"]["T_mem"] < 16
    # what is still on an edge is reported; a value off the edge is not
    for system, key in (("knn", "T"), ("memory", "T_mem")):
        grid = grids["knn_temperatures" if key == "T" else "memory_temperatures"]
        assert (key in res["edges"].get(system, [])) == (st[system][key] in (min(grid), max(grid)))
    # the saved scores carry the widened grids, and every reader recomputes the reported perplexity from them
    cfg2 = load_config(tmp_path / "cfg.yaml")
    for split in ("validation", "test"):
        sc = load_eval_scores(run, "eval", split)
        assert sc.knn_T == grids["knn_temperatures"] and sc.mem_T == grids["memory_temperatures"]
        for system in ("knn", "memory", "memory+knn"):
            lp = system_logprobs(sc, system, st[system], cfg2)
            assert perplexity(lp) == pytest.approx(res["splits"][split]["systems"][system]["ppl"], rel=1e-9)
    # knn-targets' own choice of temperature widens the same way
    assert json.loads((run / "targets" / "manifest.json").read_text())["temperature_sweep"] is None  # fixed 1.0
    assert main(["knn-targets", "--config", str(tmp_path / "cfg.yaml"), "--knn.temperature", "none", "--force"]) == 0
    tm = json.loads((run / "targets" / "manifest.json").read_text())
    assert min(tm["temperature_sweep"]["grid"]) < 256 and tm["temperature"] < 256
    assert tm["temperature"] == min(float(t) for t in tm["temperature_sweep"]["ppl_by_T"]) or \
        not tm["temperature_sweep"]["edge"]
