"""Draw mlpmem's import graph by layer (docs/img/import_graph.png) and check the layering rules.

    python scripts/import_graph.py [--out docs/img/import_graph.png]

Beside the picture, ``import_graph.txt`` lists what it shows (each module, its layer and its imports): text that
does not depend on the matplotlib version, so tests/test_layout.py can tell a stale picture (the list differs from
the source's imports), redraw it and fail until both files are committed.

Layers, bottom to top: base (errors, files, config, runtime, assets) < components < artifacts < stages < entry
points (cli, pipeline, bench). A module may import from its own layer or below, with two further rules: stage
modules never import each other (only the stage table in ``mlpmem.stages``), and components know nothing of the
run directory (no ``mlpmem.artifacts``). The package root (``mlpmem/__init__.py``) is the public façade: it
re-exports the API from every layer, imported on first use (module ``__getattr__``), so its edges are exempt;
in exchange, no module of the package imports anything but ``__version__`` through it.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PICTURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "import_graph.png"
LAYERS = ["base", "components", "artifacts", "stages", "entry"]


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("components", "artifacts", "stages"):
        return parts[1]
    if len(parts) > 1 and parts[1] in ("cli", "commands", "studies", "harness", "bench", "api", "__main__"):
        return "entry"
    return "base"


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for p in sorted((src / "mlpmem").rglob("*.py")):
        name = ".".join(p.relative_to(src).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the mlpmem modules it imports (anywhere in the file, lazy imports included)."""
    mods = modules(src)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
                pkg = name.rsplit(".", node.level)[0] if not path.name == "__init__.py" else name
                base = f"{pkg}.{node.module}" if node.module else pkg
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    graph[name].add(t)
        graph.setdefault(name, set())
    return dict(graph)


def facade_imports(src: Path = SRC) -> list[str]:
    """Modules of the package that import a name other than ``__version__`` from the package root."""
    bad = []
    for name, path in modules(src).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mlpmem" and node.level == 0:
                bad += [f"{name} imports {a.name} through the package root (import it from its module)"
                        for a in node.names if a.name != "__version__" and f"mlpmem.{a.name}" not in modules(src)]
    return bad


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, deps in graph.items():
        if a == "mlpmem":  # the façade (see the module docstring)
            continue
        la = layer_of(a)
        for b in deps:
            lb = layer_of(b)
            if LAYERS.index(lb) > LAYERS.index(la):
                bad.append(f"{a} ({la}) imports {b} ({lb}), a higher layer")
            if la == "stages" and lb == "stages" and b != "mlpmem.stages" and a != "mlpmem.stages":
                bad.append(f"stage {a} imports stage {b}")
            if la == "components" and lb == "artifacts":
                bad.append(f"component {a} imports the run-directory layer ({b})")
    return sorted(bad)


def draw(graph: dict[str, set[str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {ly: sorted(m for m in graph if layer_of(m) == ly) for ly in LAYERS}
    pos = {}
    for y, ly in enumerate(LAYERS):
        ms = rows[ly]
        for x, m in enumerate(ms):
            pos[m] = ((x + 0.5) / len(ms), y)
    fig, ax = plt.subplots(figsize=(max(16.0, 0.85 * max(len(ms) for ms in rows.values())), 8))  # labels apart
    for a, deps in graph.items():
        for b in deps:
            (x0, y0), (x1, y1) = pos[a], pos[b]
            ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 - 0.12),
                        arrowprops=dict(arrowstyle="->", color="tab:red" if y1 > y0 else "0.6", lw=0.6,
                                        alpha=0.6))
    colours = dict(zip(LAYERS, ["#e8e8e8", "#cfe3f7", "#fde2c0", "#d4f0d4", "#f1d4f0"]))
    for m, (x, y) in pos.items():
        label = m.removeprefix("mlpmem.").replace(".", ".\n", 1) if m != "mlpmem" else "mlpmem"
        ax.text(x, y, label, ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round", fc=colours[layer_of(m)], ec="0.4"))
    ax.set_yticks(range(len(LAYERS)))
    ax.set_yticklabels(LAYERS)
    ax.set_xticks([])
    ax.set_ylim(-0.6, len(LAYERS) - 0.4)
    ax.set_xlim(-0.02, 1.02)
    n_edges = sum(len(d) for d in graph.values())
    ax.set_title(f"mlpmem imports by layer ({len(graph)} modules, {n_edges} imports; arrows point to what is "
                 "imported; a red arrow would point upwards)")
    for s in ("top", "right", "bottom"):
        ax.spines[s].set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def describe(graph: dict[str, set[str]]) -> str:
    """What the picture shows, as text: a header, then one line per module, "<module> (<layer>): <imports>"."""
    lines = ["# mlpmem's import graph, drawn in import_graph.png: module (layer): the modules it imports.",
             "# Written with the picture by scripts/import_graph.py; tests/test_layout.py redraws both when the",
             "# source's imports differ from this list."]
    lines += [f"{m} ({layer_of(m)}): {' '.join(sorted(graph[m]))}".rstrip() for m in sorted(graph)]
    return "\n".join(lines) + "\n"


def write(graph: dict[str, set[str]], out: Path = PICTURE) -> None:
    """Draw the picture at ``out`` and write its edge list beside it (``.txt``), the picture first: a failed
    drawing leaves the old list, so the picture still counts as stale."""
    draw(graph, out)
    out.with_suffix(".txt").write_text(describe(graph))


def refresh(graph: dict[str, set[str]], out: Path = PICTURE) -> bool:
    """Redraw the picture when it is stale (its edge list differs from ``graph``, or either file is missing);
    returns whether it was."""
    txt = out.with_suffix(".txt")
    if out.is_file() and txt.is_file() and txt.read_text() == describe(graph):
        return False
    write(graph, out)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(PICTURE))
    args = ap.parse_args()
    graph = imports()
    write(graph, Path(args.out))
    bad = violations(graph) + facade_imports()
    print(f"{len(graph)} modules; wrote {args.out} and {Path(args.out).with_suffix('.txt')}")
    for b in bad:
        print("layering violation:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
