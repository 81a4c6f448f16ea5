"""The systems registry (mlpmem.systems) is the one list of evaluated systems: config validation allows exactly its
eval systems, every system eval, qa, compare and sweep name is declared there, and the compound names are spelled
nowhere else."""

import ast
from pathlib import Path

import numpy as np

from mlpmem import systems as sy
from mlpmem.components.scoring import Scored
from mlpmem.config import ConfigError, EvalConfig, load_config

SRC = Path(__file__).parents[1] / "src" / "mlpmem"


def _valid(systems: list[str]) -> bool:
    try:
        EvalConfig(systems=systems).validate("eval")
    except ConfigError:
        return False
    return True


def test_config_allows_exactly_the_registrys_eval_systems():
    allowed = {s for s in sy.SYSTEMS if _valid([sy.MEMORY, s])}  # memory+gate needs memory beside it
    assert allowed == set(sy.EVAL_SYSTEMS) == {s.name for s in sy.SYSTEMS.values() if s.in_eval}
    assert not _valid(["no such system"])
    assert EvalConfig().systems == list(sy.DEFAULT_EVAL_SYSTEMS) == [sy.BASE, sy.KNN, sy.MEMORY, sy.MEMORY_KNN]
    joint = {s for s in sy.SYSTEMS if _valid_joint([sy.MEMORY, s])}
    assert joint == set(sy.JOINT_EVAL_SYSTEMS) == {sy.BASE, sy.MEMORY, sy.MEMORY_GATE}


def _valid_joint(systems: list[str]) -> bool:
    try:
        EvalConfig(systems=systems, joint=True, out_name="eval-joint").validate("eval")
    except ConfigError:
        return False
    return True


def test_every_system_in_eval_results_is_declared():
    rng = np.random.default_rng(0)
    sc = Scored(lm=np.log(rng.uniform(0.05, 0.3, 64)), mem=np.log(rng.uniform(0.05, 0.9, (1, 64))),
                knn=np.log(rng.uniform(0.01, 0.9, (2, 64))))
    cfg = load_config(None, {"eval.lambdas": [0.0, 0.5, 1.0], "eval.knn_temperatures": [1.0, 2.0],
                             "eval.memory_temperatures": [1.0]})
    from mlpmem.components.tuning import settle
    res = settle({"validation": sc, "test": sc}, cfg, doc_ids={"test": np.arange(64) // 8})
    named = set(res["settings"]) | set(res["edges"]) | {s for sw in res["sweeps"].values() for s in sw}
    named |= {s for sp in res["splits"].values() for s in sp["systems"]}
    named |= {n for sp in res["splits"].values() for c in sp.get("comparisons", {}) for n in c.split(" vs ")}
    assert named <= set(sy.SYSTEMS)
    assert list(res["settings"]) == [sy.BASE, sy.KNN, sy.MEMORY, sy.MEMORY_ALONE, sy.MEMORY_KNN]
    # what eval records of each system's size and speed
    from mlpmem.stages.eval import _systems_meta

    class LM:
        identity = {"n_params": 10}
    meta = _systems_meta(LM(), {"test": sc}, {"params": 3, "bytes": 6}, {"bytes": 8})
    assert set(meta) <= set(sy.SYSTEMS)


def test_systems_named_by_tables_and_studies_are_declared():
    from mlpmem.components.report import SYSTEM_STYLE
    from mlpmem.components.tuning import COMPARISONS
    from mlpmem.stages.qa import MIXTURES, RAG
    from mlpmem.studies.compare import ROWS, VARIANTS
    from mlpmem.studies.scaling import SYSTEMS as SCALING

    named = set(SYSTEM_STYLE) | {s for p in COMPARISONS for s in p} | {s for _, _, s in ROWS}
    named |= {s for s, _ in SCALING} | {s for over, *_ in VARIANTS.values() for s in over.get("eval.systems", [])}
    assert named <= set(sy.SYSTEMS)
    assert MIXTURES == (sy.KNN, sy.MEMORY, sy.MEMORY_KNN) and RAG == (sy.RAG, sy.RAG_MEMORY)
    assert all(sy.SYSTEMS[s].in_qa for s in MIXTURES + RAG + (sy.BASE, sy.FINETUNED))


def test_needs_are_stages_and_match_what_each_system_reads():
    from mlpmem.stages import STAGES

    assert set().union(*(s.needs for s in sy.SYSTEMS.values())) <= set(STAGES)
    assert sy.needed_stages([sy.BASE]) == {"prepare", "finetune"}
    assert sy.needed_stages([sy.BASE, sy.KNN]) == {"prepare", "finetune", "extract", "index"}
    assert sy.needed_stages([sy.MEMORY]) == sy.needed_stages([sy.MEMORY_KNN]) == \
        {"prepare", "finetune", "extract", "index", "knn-targets", "train"}
    for s in sy.SYSTEMS.values():
        assert s.uses_knn <= ("index" in s.needs) and s.uses_memory <= ("train" in s.needs)


def test_compound_system_names_are_spelled_only_in_the_registry():
    """'memory+knn', 'memory alone', ... as a bare string outside mlpmem/systems.py: use its constant. (The short
    names base, knn, memory, rag are also stage outputs, config sections and timing keys: not checked.)"""
    compound = {n for n in sy.SYSTEMS if n not in (sy.BASE, sy.KNN, sy.MEMORY, sy.RAG)}
    bare = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "systems.py" and path.parent == SRC:
            continue
        tree = ast.parse(path.read_text())
        bare += [f"{path.relative_to(SRC)}:{n.lineno}" for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and n.value in compound]
    assert bare == []
