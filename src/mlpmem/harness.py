"""lm-evaluation-harness integration (``pip install mlpmem[eval]``, lm-eval 0.4): the model ``mlpmem`` is lm-eval's
own Hugging Face model (HFLM) with a memory attached to it, so every harness task (log-likelihood, rolling
log-likelihood, generation) sees the mixture  log((1 - lam) p_LM + lam p_mem)  and nothing else changes.

    mlpmem-lm-eval --model mlpmem --model_args pretrained=default,memory=runs/demo/memory/best --tasks ...

lm-eval 0.4 discovers models only in its own package, so ``mlpmem-lm-eval`` (also ``python -m mlpmem.harness``)
registers ``mlpmem`` and then runs lm-eval's command line unchanged. From Python, ``import mlpmem.harness`` once
and use ``lm_eval.simple_evaluate(model="mlpmem", model_args=...)``, or build :class:`MemoryLM` yourself.

model_args beyond HFLM's own:
    memory           a memory folder (a run's ``memory/best``, ``joint/memory``, an ``mlpmem export`` folder) or a
                     Hub repo id; checked against ``pretrained`` (tokenizer, weights, hook point)
    lam              the memory's weight; default: the value `mlpmem eval` tuned, read through the run's manifests
                     (when ``memory`` lies in a run directory), else an error
    mem_temperature  the memory's softmax temperature; default: the tuned one, else 1
``pretrained=default`` is the offline default model.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from mlpmem.components.hub import load_memory_for, resolve
from mlpmem.components.joint import attach_memory
from mlpmem.components.lm import model_identity, model_source, weights_digest
from mlpmem.config import ModelConfig


def tuned_settings(memory_dir: Path) -> dict:
    """{"lam", "T_mem"} tuned by `mlpmem eval` for the memory in ``memory_dir`` when it lies in a run directory
    (``<run>/memory/<checkpoint>`` or ``<run>/joint/memory``), read through the eval manifest; else {}."""
    from mlpmem.artifacts import load_eval_results

    d = Path(memory_dir).resolve()  # memory/best and joint/memory are links to versioned directories
    parent = {"memory": "eval", "joint": "eval-joint"}.get(d.parent.name)
    run = d.parent.parent
    if parent is None or not (run / parent).is_dir():
        return {}
    res = load_eval_results(run, parent)
    st = ((res or {}).get("settings") or {}).get("memory")
    return {"lam": float(st["lam"]), "T_mem": float(st.get("T_mem", 1.0))} if st and "lam" in st else {}


@register_model("mlpmem")
class MemoryLM(HFLM):
    """HFLM with an MLP memory mixed into the model's next-token distribution (see the module docstring)."""

    def __init__(self, pretrained: str = "default", memory: str | None = None, lam: float | None = None,
                 mem_temperature: float | None = None, revision: str | None = None, **kwargs) -> None:
        if memory is None:
            raise ValueError("model_args: memory= is required (a memory folder or Hub repo id)")
        mcfg = ModelConfig(name=str(pretrained), revision=revision)
        src, kw = model_source(mcfg)
        if "gguf_file" in kw:
            kwargs.setdefault("gguf_file", kw["gguf_file"])
        super().__init__(pretrained=src, revision=revision or "main", **kwargs)
        identity = model_identity(mcfg, self.model, self.tokenizer, weights_digest(src, kw, self.model))
        folder = resolve(memory)
        tuned = tuned_settings(folder)
        if lam is None and "lam" not in tuned:
            raise ValueError(f"model_args: lam= is required: no tuned lambda found for {memory} (it is not in a run "
                             "directory evaluated by `mlpmem eval`)")
        self.lam = float(lam) if lam is not None else tuned["lam"]
        self.mem_temperature = float(mem_temperature) if mem_temperature is not None else tuned.get("T_mem", 1.0)
        param = next(self.model.parameters())
        self.memory = load_memory_for(folder, identity, device=str(param.device)).eval()
        self.handle = attach_memory(self.model, self.memory, lam=self.lam, mem_temperature=self.mem_temperature)


def main() -> None:
    """`mlpmem-lm-eval`: lm-eval's command line with the ``mlpmem`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
