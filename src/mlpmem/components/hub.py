"""A memory as a Hugging Face Hub model: a folder (config.json, model.safetensors, README.md model card) that
loads from a local path or a Hub repo id, refuses a base model it was not trained for, and pushes to the Hub.

    from mlpmem.components.hub import load_memory_for, save_for_hub

    save_for_hub(memory, "export/", results=eval_results, corpus={"source": ..., "fingerprint": ...})
    memory = load_memory_for("user/smollm2-wiki-memory", base_identity)   # or a local folder

The identity it checks is the one every mlpmem manifest records for the base LM (:func:`mlpmem.components.lm.
model_identity`): the tokenizer, and the weights digest (a fine-tuned copy is another model: its hidden states
differ, so the memory's inputs would too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlpmem.components.memory import MLPMemory, write_pretrained
from mlpmem.files import atomic_write_text, swapped_directory

CARD_NAME = "README.md"


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


def model_card(memory: MLPMemory, results: dict | None = None, corpus: dict | None = None) -> str:
    """The README.md of a memory folder: Hub metadata (library, base model, tags) and what a user needs to know:
    the base model and its fingerprint, the hook point, the corpus, the size, how to load it, and the eval results."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = memory.config.meta or {}
    base = str(meta.get("base_model") or "unknown")
    is_hub_id = base.count("/") == 1 and not Path(base).exists()
    data = ModelCardData(library_name="mlpmem", tags=["mlp-memory", "knn-lm", "retrieval"],
                         base_model=base if is_hub_id else None)
    c = memory.config
    lines = [f"# MLP memory for {base}", "",
             "A retriever-pretrained MLP memory (MLP Memory, Wei et al., ICLR 2026) made with mlpmem: a stack of feed-forward blocks that maps the base LM's hidden state to "
             "a next-token distribution imitating kNN-LM over its training corpus, mixed with the LM at inference.",
             "", "| | |", "|---|---|",
             f"| base model | {base} |",
             f"| base model fingerprint (tokenizer, config, weights) | `{meta.get('base_fingerprint')}` |",
             f"| hook point (its input) | `{meta.get('hook')}` |",
             f"| blocks, width, inner size | {c.num_blocks}, {c.hidden_size}, {c.intermediate_size} |",
             f"| parameters | {memory.num_parameters():,} |"]
    if corpus:
        lines.append(f"| corpus | {corpus.get('source')} (fingerprint `{corpus.get('fingerprint')}`) |")
    if meta.get("joint"):
        lines.append(f"| trained jointly with its LM | λ {meta['joint'].get('lam')}, {meta['joint'].get('mode')} |")
    settings = (results or {}).get("settings", {}).get("memory")
    if settings:
        lines.append(f"| tuned mixing weight λ, temperature | {_fmt(settings.get('lam'))}, "
                     f"{_fmt(settings.get('T_mem'))} |")
    lines += ["", "## Use", "", "```python",
              "from mlpmem.components.hub import load_memory_for",
              "from mlpmem.components.joint import attach_memory",
              "from mlpmem.components.lm import load_lm",
              "from mlpmem.config import ModelConfig",
              "",
              f"lm = load_lm(ModelConfig(name={base!r}))  # the base model (a local copy of it also works)",
              "memory = load_memory_for(REPO_OR_DIR, lm.identity)  # refuses another base model",
              f"attach_memory(lm.model, memory, lam={_fmt((settings or {}).get('lam', 0.25))}, "
              f"mem_temperature={_fmt((settings or {}).get('T_mem', 1.0))})",
              "```", "",
              "It reads the hidden state at the hook point above and must be attached to exactly the base model it "
              "was trained for (the fingerprint above); `load_memory_for` checks that."]
    if results and results.get("splits"):
        lines += ["", "## Evaluation (token-level perplexity; λ and temperatures tuned on validation)", "",
                  "| split | system | PPL | vs base LM (95% CI) |", "|---|---|---|---|"]
        for split, entry in results["splits"].items():
            for system, r in entry["systems"].items():
                vs = r.get("vs_base")
                ci = f"{100 * vs['change']:+.1f}% [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}]" \
                    if vs else ""
                lines.append(f"| {split} | {system} | {r['ppl']:.3f} | {ci} |")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def save_for_hub(memory: MLPMemory, directory: str | Path, results: dict | None = None,
                 corpus: dict | None = None) -> Path:
    """Write the memory and its model card into ``directory``, switched in whole (a reader never sees half)."""
    d = Path(directory)
    with swapped_directory(d) as tmp:
        write_pretrained(memory, tmp)
        atomic_write_text(tmp / CARD_NAME, model_card(memory, results, corpus))
    return d


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """A local memory folder, or a Hub repo id downloaded to the local cache (needs the network once)."""
    p = Path(source)
    if p.is_dir():
        return p
    if p.exists() or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: neither a memory folder nor a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision))
    except Exception as e:  # offline, unknown repo, no access: one line
        raise FileNotFoundError(f"{source}: could not download it from the Hub ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_memory_for(source: str | Path, identity: dict, hook: str | None = None, device: str = "cpu",
                    dtype=None, revision: str | None = None) -> MLPMemory:
    """Load a memory (folder or Hub repo id) for the base LM of ``identity`` (``LoadedLM.identity``); raises
    :class:`MemoryMismatch` if it was trained for another base model or hook point."""
    memory = MLPMemory.from_pretrained(resolve(source, revision), device=device, dtype=dtype)
    check_base(memory.config.meta or {}, identity, hook)
    return memory


def push_to_hub(directory: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload a folder written by :func:`save_for_hub` to the Hub (creating the repo); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="mlpmem memory")
    return f"https://huggingface.co/{repo_id}"
