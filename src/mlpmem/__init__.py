"""mlpmem: a retriever-pretrained MLP memory for any Hugging Face causal LM.

    import mlpmem

    model, tok = mlpmem.load("HuggingFaceTB/SmolLM2-135M", memory="user/repo-or-local-dir")

The public names below are imported on first use (module ``__getattr__``), so ``import mlpmem`` loads neither torch
nor transformers; ``MemoryLM`` (lm-eval's model) needs the optional extra ``pip install mlpmem[eval]``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "load": "mlpmem.api",
    "check_memory": "mlpmem.api",
    "MLPMemory": "mlpmem.components.memory",
    "MemoryMismatch": "mlpmem.components.hub",
    "attach_memory": "mlpmem.components.joint",
    "detach_memory": "mlpmem.components.joint",
    "MemoryLM": "mlpmem.harness",
}
__all__ = ["__version__", "load", "check_memory", "MLPMemory", "MemoryMismatch", "attach_memory", "detach_memory",
           "MemoryLM"]

if TYPE_CHECKING:  # what type checkers see (py.typed); at run time these come from __getattr__
    from mlpmem.api import check_memory, load
    from mlpmem.components.hub import MemoryMismatch
    from mlpmem.components.joint import attach_memory, detach_memory
    from mlpmem.components.memory import MLPMemory
    from mlpmem.harness import MemoryLM


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlpmem' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if name == "MemoryLM" and e.name and e.name.split(".")[0] == "lm_eval":
            raise ImportError("mlpmem.MemoryLM needs lm-evaluation-harness: pip install 'mlpmem[eval]'") from e
        raise
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
