"""Command `export`: this run's memory as a Hugging Face Hub model folder (config.json, model.safetensors and a
model card naming the base model, its fingerprint, the hook point, the corpus and the eval results), optionally
pushed to the Hub. Load it with :func:`mlpmem.components.hub.load_memory_for`, which refuses another base model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlpmem.artifacts import DATA, JOINT, JOINT_MEMORY, MEMORY, load_eval_results, read_manifest, verify_chain
from mlpmem.artifacts.manifest import owner_of
from mlpmem.components.hub import push_to_hub, save_for_hub
from mlpmem.components.memory import MLPMemory
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import check_replaceable

log = logging.getLogger(__name__)


def _check_destination(out: Path) -> None:
    """Export writes only a folder of its own: not into a stage's directory, and never over a user's folder or
    file (StageError, exit 2, before anything is read or written)."""
    for d in (out.parent.absolute(), *out.parent.absolute().parents):
        who = owner_of(d)
        if who is not None:
            raise StageError(f"--export.dir {out}: it lies inside {d}, which holds {who} output; export into a "
                             "folder of its own (the default is <out_dir>/export)")
    try:
        check_replaceable(out)
    except StageError as e:
        raise StageError(f"--export.dir: {e}") from None


def run(cfg: Config) -> dict:
    ec = cfg.export
    out = Path(ec.dir) if ec.dir else cfg.run_dir / "export"
    _check_destination(out)
    if ec.joint:
        m = verify_chain(cfg.run_dir, JOINT, "joint")
        src, results_dir = cfg.run_dir / JOINT / JOINT_MEMORY, f"{cfg.eval.out_name}-joint"
    else:
        m = verify_chain(cfg.run_dir, MEMORY, "train")
        src, results_dir = cfg.run_dir / MEMORY / m["checkpoint"], cfg.eval.out_name
    try:
        memory = MLPMemory.from_pretrained(src)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"cannot load the memory to export: {e}") from None
    results = load_eval_results(cfg.run_dir, results_dir)
    if results is None:
        log.warning("export: no finished evaluation in %s: the model card has no results (run `mlpmem eval`%s)",
                    cfg.run_dir / results_dir, " --eval.joint true --eval.out_name " + results_dir if ec.joint else "")
    data = read_manifest(cfg.run_dir / DATA) or {}
    corpus = {"source": cfg.data.source, "fingerprint": data.get("fingerprint")}
    save_for_hub(memory, out, results=results, corpus=corpus)
    info = {"dir": str(out), "from": str(src), "memory_fingerprint": m["fingerprint"], "results": results_dir
            if results else None}
    print(f"exported the memory to {out} (model card: {out / 'README.md'})")
    if ec.push_to:
        info["url"] = push_to_hub(out, ec.push_to, private=ec.private)
        print(f"pushed to {info['url']}")
    return info
