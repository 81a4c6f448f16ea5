"""A memory as a Hugging Face Hub model: a folder (config.json, model.safetensors, README.md model card) that
loads from a local path or a Hub repo id, refuses a base model it was not trained for, and pushes to the Hub.

    from mlpmem.components.hub import load_memory_for, save_for_hub

    save_for_hub(memory, "export/", results=eval_results, corpus={"source": ..., "fingerprint": ...})
    memory = load_memory_for("user/smollm2-wiki-memory", base_identity)   # or a local folder

The identity it checks is the one every mlpmem manifest records for the base LM (:func:`mlpmem.components.lm.
model_identity`): the tokenizer, and the weights digest (a fine-tuned copy is another model: its hidden states
differ, so the memory's inputs would too).

The card's metadata (what the Hub indexes): ``library_name: mlpmem``, tags, ``base_model`` (a Hub id only) with
``base_model_relation: adapter``, ``license`` (given, else the base model's when known, else the placeholder
``license: other`` + ``license_name: base-model-license-unknown``, to be replaced by hand), ``datasets`` (when the
corpus is a Hub dataset) and a ``model-index`` with the evaluation's perplexities.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlpmem.components.memory import MLPMemory, is_hub_id, resolve_folder, shareable_meta
from mlpmem.files import swapped_directory
from mlpmem import systems as sy

CARD_NAME = "README.md"
# the offline default base model: a dequantised Q4_1 build of this Hub model (Apache-2.0), loaded as "default"
DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_BASE_LICENSE = "apache-2.0"
LICENSE_PLACEHOLDER = {"license": "other", "license_name": "base-model-license-unknown"}


class MemoryMismatch(ValueError):
    """The memory was trained for another base model or hook point."""


def check_base(meta: dict, identity: dict, hook: str | None = None) -> None:
    """Raise :class:`MemoryMismatch` unless a memory with this ``meta`` (its config's) fits the base LM of
    ``identity`` (and ``hook``, when given): same tokenizer, same weights, same hook point."""
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != identity.get("tokenizer_hash"):
        raise MemoryMismatch(f"this memory was trained for {meta.get('base_model')}, whose tokenizer differs from "
                             f"{identity.get('name')}'s: use the base model it was trained with")
    if meta.get("base_fingerprint") and meta["base_fingerprint"] != identity.get("fingerprint"):
        raise MemoryMismatch(f"this memory was trained for base model {meta.get('base_model')} "
                             f"({meta['base_fingerprint']}), not {identity.get('name')} ({identity.get('fingerprint')}; "
                             "its weights or config differ): load the base model it was trained with")
    if hook is not None and meta.get("hook") and meta["hook"] != str(hook):
        raise MemoryMismatch(f"this memory was trained on hook point {meta['hook']}, not {hook}")


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def is_default_base(meta: dict) -> bool:
    from mlpmem.assets import DEFAULT_MODEL_ID

    return meta.get("base_model") == DEFAULT_MODEL_ID


def load_name(meta: dict) -> str:
    """What ``mlpmem.load`` takes for this memory's base model: "default", a Hub id, or the name of the local
    folder it was trained with."""
    return "default" if is_default_base(meta) else str(meta.get("base_model") or "default")


def tuned(memory: MLPMemory, results: dict | None = None) -> dict:
    """{"lam", "mem_temperature"[, "gate"]} the memory was tuned at: its config's ``meta.tuned`` (written by `mlpmem
    export`), else the eval results' memory settings; {} if neither says. "gate" (a
    :class:`mlpmem.components.gate.Gate` as a dict) is there when eval fitted the per-token gate (memory+gate)
    and kept it because it beat the fixed λ on held-out validation documents."""
    t = (memory.config.meta or {}).get("tuned") or {}
    settings = (results or {}).get("settings") or {}
    st = settings.get(sy.MEMORY) or {}
    if "lam" in t:
        lam, temp, gate = t["lam"], t.get("mem_temperature", 1.0), t.get("gate")
    elif "lam" in st:
        lam, temp, gate = st["lam"], st.get("T_mem", 1.0), (settings.get(sy.MEMORY_GATE) or {}).get("gate")
    else:
        return {}
    got = {"lam": float(lam), "mem_temperature": float(temp)}
    return {**got, "gate": gate} if gate else got


def _eval_results(results: dict | None, corpus: dict | None) -> list:
    """The perplexities of the evaluation as the card's model-index entries (one per split and system)."""
    from huggingface_hub import EvalResult

    corpus = corpus or {}
    out = []
    for split, entry in ((results or {}).get("splits") or {}).items():
        for system, r in entry.get("systems", {}).items():
            out.append(EvalResult(task_type="text-generation", task_name="Language modeling",
                                  dataset_type=corpus.get("hub_dataset") or "custom",
                                  dataset_name=str(corpus.get("name") or corpus.get("source") or "corpus"),
                                  dataset_split=split, metric_type="perplexity", metric_value=round(r["ppl"], 4),
                                  metric_name=f"token perplexity ({system})"))
    return out


def model_card(memory: MLPMemory, results: dict | None = None, corpus: dict | None = None, *,
               memory_ref: str | None = None, license: str | None = None, model_name: str | None = None) -> str:
    """The README.md of a memory folder: Hub metadata (see the module docstring) and what a user needs to know: the
    base model and its fingerprint, the hook point, the corpus, the size, a usage snippet that runs as written (from
    the folder's parent directory, or anywhere once ``memory_ref`` is its Hub id), the eval results.

    corpus: {"source", "fingerprint", "name" (shown), "hub_dataset" (a Hub dataset id, or None)}."""
    from huggingface_hub import ModelCardData

    meta = shareable_meta(memory.config.meta or {})
    corpus = corpus or {}
    default = is_default_base(meta)
    base = str(meta.get("base_model") or "unknown")
    hub_base = DEFAULT_BASE_HUB_ID if default else (base if is_hub_id(base) else None)
    lic = license or (DEFAULT_BASE_LICENSE if default else None)
    memory_ref = memory_ref or "REPO_ID_OR_FOLDER"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(hub_base or base).name).strip("-")
    name = model_name or (memory_ref if is_hub_id(memory_ref) else f"mlpmem-memory-{stem}")
    evals = _eval_results(results, corpus)
    info = getattr(type(memory), "_hub_mixin_info", None)
    tags = sorted(set((info.model_card_data.tags if info else None) or []) | {"mlpmem", "mlp-memory"})
    data = ModelCardData(library_name="mlpmem", tags=tags, base_model=hub_base,
                         **({"license": lic} if lic else LICENSE_PLACEHOLDER),
                         datasets=[corpus["hub_dataset"]] if corpus.get("hub_dataset") else None,
                         model_name=name if evals else None, eval_results=evals or None)
    data.base_model_relation = "adapter" if hub_base else None
    c = memory.config
    dtype = str(next(memory.parameters()).dtype).removeprefix("torch.")
    settings = tuned(memory, results)
    lines = [f"# MLP memory for {base}", "",
             "A retriever-pretrained MLP memory (MLP Memory, Wei et al., ICLR 2026) made with "
             "[mlpmem](https://arxiv.org/abs/2508.01832): a stack of feed-forward blocks that maps the base LM's "
             "hidden state to a next-token distribution imitating kNN-LM over its training corpus, mixed with the "
             "LM at inference.", "", "| | |", "|---|---|",
             f"| base model | {base}" + (f" (a dequantised Q4_1 build of {DEFAULT_BASE_HUB_ID}, loaded by mlpmem as "
                                       "`default`)" if default else "") + " |",
             f"| base model fingerprint (tokenizer, config, weights) | `{meta.get('base_fingerprint')}` |",
             f"| hook point (its input) | `{meta.get('hook')}` |",
             f"| blocks, width, inner size | {c.num_blocks}, {c.hidden_size}, {c.intermediate_size} |",
             f"| parameters, dtype | {memory.num_parameters():,}, {dtype} |"]
    if corpus:
        lines.append(f"| corpus | {corpus.get('name') or corpus.get('source')} (fingerprint "
                     f"`{corpus.get('fingerprint')}`) |")
    if meta.get("joint"):
        lines.append(f"| trained jointly with its LM | λ {meta['joint'].get('lam')}, {meta['joint'].get('mode')} |")
    if settings:
        lines.append(f"| tuned mixing weight λ, temperature | {_fmt(settings['lam'])}, "
                     f"{_fmt(settings['mem_temperature'])} |")
        if settings.get("gate"):
            g = settings["gate"]
            lines.append(f"| per-token gate (λ from the LM's and the memory's entropies and top probabilities; "
                         f"fitted on validation, kept because it beat the fixed λ on held-out documents) | "
                         f"λ up to {_fmt(g['lam_max'])} around {_fmt(g['lam0'])}, temperature {_fmt(g['T_mem'])}; "
                         "used by default (`gate=False`: the fixed λ) |")
    lam_arg = "" if settings else ", lam=0.25"
    where = ("" if default or is_hub_id(base) else
             f"  # {load_name(meta)!r}: the folder the base model was loaded from when the memory was trained")
    lines += ["", "## Use", "", "`pip install mlpmem`, then:", "", "```python",
              "import mlpmem", "",
              f"model, tok = mlpmem.load({load_name(meta)!r}, memory={memory_ref!r}{lam_arg}){where}",
              'out = model.generate(**tok("The", return_tensors="pt"), max_new_tokens=20)',
              "print(tok.decode(out[0], skip_special_tokens=True))",
              "```", "",
              "`mlpmem.load` returns the base model (a plain transformers model: its own `generate`, lm-eval's "
              "`HFLM(pretrained=model, tokenizer=tok)`) with the memory mixed into its next-token distribution"
              + (" at the tuned λ and temperature above (`lam=` overrides)" if settings else "")
              + (", λ set per token by the gate above" if settings.get("gate") else "") + ". "
              "It reads the hidden state at the hook point above, so it must be attached to exactly the base model "
              "it was trained for: `mlpmem.load`, and `mlpmem.check_memory(model, tok, memory)` for a model you "
              "loaded yourself, refuse any other (the fingerprint above)."]
    if evals:
        lines += ["", "## Evaluation (token-level perplexity; λ and temperatures tuned on validation)", "",
                  "| split | system | PPL | vs base LM (95% CI) |", "|---|---|---|---|"]
        for split, entry in results["splits"].items():
            for system, r in entry["systems"].items():
                vs = r.get("vs_base")
                ci = f"{100 * vs['change']:+.1f}% [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}]" \
                    if vs else ""
                lines.append(f"| {split} | {system} | {r['ppl']:.3f} | {ci} |")
    lines += ["", "## License", ""]
    lines.append(f"`{lic}`" + (", the base model's." if lic == DEFAULT_BASE_LICENSE and default else ".") if lic else
                 "Not known to mlpmem: the memory derives from the base model (its hidden states) and the corpus. "
                 "Replace `license: other` / `license_name` in this card's metadata with the license that applies "
                 "(or export with `--export.license`).")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def save_for_hub(memory: MLPMemory, directory: str | Path, results: dict | None = None,
                 corpus: dict | None = None, **card: Any) -> Path:
    """Write the memory (:meth:`MLPMemory.save_pretrained`: no local paths in its config) and its model card into
    ``directory``, switched in whole (a reader never sees half). ``card``: :func:`model_card`'s keywords."""
    d = Path(directory)
    with swapped_directory(d) as tmp:
        memory.save_pretrained(tmp, model_card_kwargs={"results": results, "corpus": corpus,
                                                       "memory_ref": card.pop("memory_ref", None) or d.name, **card})
    return d


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """A local memory folder, or a Hub repo id downloaded to the local cache (needs the network once)."""
    return resolve_folder(source, revision=revision)


def load_memory_for(source: str | Path | MLPMemory, identity: dict, hook: str | None = None, device: str = "cpu",
                    dtype=None, revision: str | None = None) -> MLPMemory:
    """Load a memory (folder or Hub repo id; a loaded one is only checked) for the base LM of ``identity``
    (``LoadedLM.identity``); raises :class:`MemoryMismatch` if it was trained for another base model or hook
    point."""
    if isinstance(source, MLPMemory):
        memory = source.to(device=device, dtype=dtype)
    else:
        memory = MLPMemory.from_pretrained(source, revision=revision, device=device, dtype=dtype)
    check_base(memory.config.meta or {}, identity, hook)
    return memory


def push_to_hub(directory: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload a folder written by :func:`save_for_hub` to the Hub (creating the repo); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="mlpmem memory")
    return f"https://huggingface.co/{repo_id}"
