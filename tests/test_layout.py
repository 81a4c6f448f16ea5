"""The package keeps its layers: base < components < artifacts < stages < entry points; stages never import each
other; components never touch the run directory. Checked on the source, lazy imports included."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("import_graph",
                                               Path(__file__).parents[1] / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def test_layers_hold():
    graph = import_graph.imports()
    assert {"mlpmem.stages.extract", "mlpmem.artifacts.readers", "mlpmem.components.knn"} <= set(graph)
    assert import_graph.violations(graph) == []


def test_the_import_graph_picture_is_current():
    """docs/img/import_graph.png shows the imports of the source as it is: its edge list (import_graph.txt beside
    it, text that does not depend on the matplotlib version) must equal the source's. A stale pair is redrawn here,
    and the test fails until the new files are committed."""
    picture = import_graph.PICTURE
    if import_graph.refresh(import_graph.imports(), picture):
        raise AssertionError(f"{picture} was stale (the modules or imports in {picture.with_suffix('.txt').name} "
                             "differed from the source's): redrawn; commit it and the .txt beside it")


def test_the_checker_sees_a_violation():
    graph = import_graph.imports()
    graph["mlpmem.stages.train"] = graph["mlpmem.stages.train"] | {"mlpmem.stages.extract"}
    graph["mlpmem.components.knn"] = graph["mlpmem.components.knn"] | {"mlpmem.artifacts.readers"}
    bad = import_graph.violations(graph)
    assert "stage mlpmem.stages.train imports stage mlpmem.stages.extract" in bad
    assert any(b.startswith("mlpmem.components.knn (components) imports mlpmem.artifacts.readers") for b in bad)


def test_every_stage_module_is_in_the_table():
    from mlpmem.commands import COMMANDS

    graph = import_graph.imports()
    stage_modules = {m for m in graph if m.startswith("mlpmem.stages.")}
    in_table = {s.target.partition(":")[0] for s in COMMANDS.values()}
    assert stage_modules <= in_table
