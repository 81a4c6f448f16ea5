"""The evaluated systems, declared once: what each reads, what it mixes into the LM, what it tunes, its label in
tables, and where it may appear (--eval.systems, `mlpmem qa`).

Eval, qa, compare and sweep name systems through this registry (or its name constants); the names are also the
keys of results.json, so they never change. Stage names in ``needs`` are the stage table's (`mlpmem.stages`),
spelled out here because the base layer imports no stage.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE, KNN, MEMORY, MEMORY_ALONE = "base", "knn", "memory", "memory alone"
MEMORY_KNN, MEMORY_GATE = "memory+knn", "memory+gate"
FINETUNED, RAG, RAG_MEMORY = "fine-tuned", "rag", "rag+memory"

_LM = frozenset({"prepare", "finetune"})  # the data and the (possibly fine-tuned) LM
_KNN = _LM | {"extract", "index"}  # + the datastore and its index
_MEMORY = _KNN | {"knn-targets", "train"}  # + the kNN targets the memory is trained on, and the memory


@dataclass(frozen=True)
class System:
    """One evaluated system.

    name         its key in results.json, --eval.systems and qa's results
    label        its name in tables (qa's rows, the scaling table's columns)
    needs        the pipeline stages whose artifacts its evaluation reads
    uses_memory  mixes the MLP memory in (or, memory alone, is it)
    uses_knn     mixes kNN-LM's distribution in
    tuned        the settings eval tunes for it on validation (empty: none, or another system's)
    in_eval      may be listed in --eval.systems
    in_qa        answered by `mlpmem qa`
    opt_in       in_eval but not in --eval.systems' default
    rag          answers from a BM25-retrieved prompt (qa only)
    """

    name: str
    label: str
    needs: frozenset[str]
    uses_memory: bool = False
    uses_knn: bool = False
    tuned: tuple[str, ...] = ()
    in_eval: bool = False
    in_qa: bool = False
    opt_in: bool = False
    rag: bool = False


# in the order results list them
SYSTEMS: dict[str, System] = {s.name: s for s in (
    System(BASE, "base LM", _LM, in_eval=True, in_qa=True),
    System(KNN, "kNN-LM", _KNN, uses_knn=True, tuned=("lam", "T"), in_eval=True, in_qa=True),
    System(MEMORY, "memory", _MEMORY, uses_memory=True, tuned=("lam", "T_mem"), in_eval=True, in_qa=True),
    # reported by eval whenever memory is: λ = 1 at the memory's tuned temperature
    System(MEMORY_ALONE, "memory alone", _MEMORY, uses_memory=True),
    System(MEMORY_KNN, "memory + kNN-LM", _MEMORY, uses_memory=True, uses_knn=True,
           tuned=("lam_mem", "lam_knn", "T", "T_mem"), in_eval=True, in_qa=True),
    # a per-token λ fitted from the memory's tuned one (needs memory listed too)
    System(MEMORY_GATE, "memory, gated", _MEMORY, uses_memory=True, tuned=("gate",), in_eval=True, opt_in=True),
    # qa's extras: the vanilla LM beside a fine-tuned one, and retrieval-augmented prompts
    System(FINETUNED, "fine-tuned LM", _LM, in_qa=True),
    System(RAG, "RAG", _LM, in_qa=True, rag=True),
    System(RAG_MEMORY, "RAG + memory", _MEMORY, uses_memory=True, in_qa=True, rag=True),
)}

EVAL_SYSTEMS = tuple(s.name for s in SYSTEMS.values() if s.in_eval)  # what --eval.systems may list
DEFAULT_EVAL_SYSTEMS = tuple(s.name for s in SYSTEMS.values() if s.in_eval and not s.opt_in)
JOINT_EVAL_SYSTEMS = tuple(s for s in EVAL_SYSTEMS if not SYSTEMS[s].uses_knn)  # the datastore predates joint
# qa's mixtures over the run's LM at eval's tuned settings, and its retrieval-augmented systems
QA_MIXTURES = tuple(s.name for s in SYSTEMS.values() if s.in_qa and not s.rag and (s.uses_memory or s.uses_knn))
QA_RAG = tuple(s.name for s in SYSTEMS.values() if s.in_qa and s.rag)


def uses_memory(systems) -> bool:
    return any(SYSTEMS[s].uses_memory for s in systems)


def uses_knn(systems) -> bool:
    return any(SYSTEMS[s].uses_knn for s in systems)


def needed_stages(systems) -> set[str]:
    """The pipeline stages an evaluation of ``systems`` reads (the base LM needs only the data and its model)."""
    return set().union(_LM, *(SYSTEMS[s].needs for s in systems))
