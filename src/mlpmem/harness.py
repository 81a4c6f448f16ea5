"""lm-evaluation-harness integration (``pip install mlpmem[eval]``, lm-eval 0.4): the model ``mlpmem`` is lm-eval's
own Hugging Face model (HFLM) with a memory attached to it, so every harness task (log-likelihood, rolling
log-likelihood, generation) sees the mixture  log((1 - lam) p_LM + lam p_mem)  and nothing else changes.

    mlpmem-lm-eval --model mlpmem --model_args pretrained=default,memory=runs/demo/memory/best --tasks ...

lm-eval 0.4 discovers models only in its own package, so ``mlpmem-lm-eval`` (also ``python -m mlpmem.harness``)
registers ``mlpmem`` and then runs lm-eval's command line unchanged. From Python, ``import mlpmem.harness`` once
and use ``lm_eval.simple_evaluate(model="mlpmem", model_args=...)``, or build :class:`MemoryLM` yourself.

model_args beyond HFLM's own:
    memory           a memory folder (a run's ``memory/best``, ``joint/memory``, an ``mlpmem export`` folder) or a
                     Hub repo id; checked against ``pretrained`` (tokenizer, weights, hook point). From Python, also a
                     loaded :class:`MLPMemory`, or None when ``pretrained`` is a model object that already has one
                     attached (``mlpmem.load``)
    lam              the memory's weight; default: the tuned one (recorded in an exported memory's config, or read
                     through the run's manifests when ``memory`` lies in a run directory), else an error
    mem_temperature  the memory's softmax temperature; default: the tuned one, else 1
    gate             the per-token λ eval fitted (memory+gate) and kept: auto (default: used when recorded and
                     neither lam nor mem_temperature is given), true (required), false (the fixed λ)
``pretrained=default`` is the offline default model; from Python, ``pretrained`` may be a model object (pass its
``tokenizer=``). The results' config records λ, the temperature, the memory's fingerprint, source and base-model
fingerprint, and counts the memory's parameters (``get_model_info``).

lm-eval versions that discover installed plugins find ``mlpmem`` through the ``lm_eval.models`` entry point in
mlpmem's pyproject.toml; lm-eval 0.4.13 does not, hence ``mlpmem-lm-eval`` / ``import mlpmem.harness``.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from mlpmem.api import flag, identity_of, keeps_gate, resolve_settings, run_tuned_settings
from mlpmem.components.hub import check_base, load_memory_for
from mlpmem.components.joint import attach_memory, attached_memory
from mlpmem.components.lm import model_identity, model_source, weights_digest
from mlpmem.components.memory import MLPMemory, memory_fingerprint
from mlpmem.config import ModelConfig

tuned_settings = run_tuned_settings  # the name this module had for it


@register_model("mlpmem")
class MemoryLM(HFLM):
    """HFLM with an MLP memory mixed into the model's next-token distribution (see the module docstring)."""

    def __init__(self, pretrained: Any = "default", memory: str | MLPMemory | None = None, lam: float | None = None,
                 mem_temperature: float | None = None, gate: bool | str | None = None, revision: str | None = None,
                 **kwargs: Any) -> None:
        if isinstance(pretrained, str):
            mcfg = ModelConfig(name=str(pretrained), revision=revision)
            src, kw = model_source(mcfg)
            if "gguf_file" in kw:
                kwargs.setdefault("gguf_file", kw["gguf_file"])
            super().__init__(pretrained=src, revision=revision or "main", **kwargs)
            identity = model_identity(mcfg, self.model, self.tokenizer, weights_digest(src, kw, self.model))
        else:  # a model object: HFLM takes it as it is
            super().__init__(pretrained=pretrained, revision=revision or "main", **kwargs)
            identity = identity_of(self.model, self.tokenizer)
        attached = attached_memory(self.model)
        if memory is None:
            if attached is None:
                raise ValueError("model_args: memory= is required (a memory folder or Hub repo id)")
            check_base(attached.memory.config.meta or {}, identity)
            self.handle, self.memory = attached, attached.memory
            want = flag(gate, "model_args: gate=")
            if want is True and attached.gate is None:
                raise ValueError("model_args: gate=true, but the attached memory mixes at a fixed λ "
                                 "(mlpmem.load(..., gate=True) attaches it with its gate)")
            if not keeps_gate(want, lam, mem_temperature):
                attached.gate = None  # a fixed mixture asked for
            if lam is not None:
                attached.lam = lam
            if mem_temperature is not None:
                attached.mem_temperature = mem_temperature
            return
        if attached is not None:
            raise ValueError("pretrained: this model already has a memory attached; pass memory=None to evaluate "
                             "that one, or mlpmem.detach_memory(model) first")
        param = next(self.model.parameters())
        self.memory = load_memory_for(memory, identity, device=str(param.device), dtype=param.dtype).eval()
        lam, temp, g = resolve_settings(self.memory, lam, mem_temperature, what="model_args: lam=", gate=gate,
                                        gate_what="model_args: gate=")
        self.handle = attach_memory(self.model, self.memory, lam=lam, mem_temperature=temp, gate=g)

    @property
    def lam(self) -> float:
        return self.handle.lam

    @property
    def mem_temperature(self) -> float:
        return self.handle.mem_temperature

    def get_model_info(self) -> dict:
        """HFLM's (parameters, dtype, revision, sha) for the evaluated system: ``model_num_parameters`` counts the
        base LM and the memory (each also apart), plus the memory's λ, temperature, fingerprint and source."""
        info = super().get_model_info()
        base = int(info.get("model_num_parameters") or 0)
        mem = self.memory.num_parameters()
        meta = self.memory.config.meta or {}
        info.update(model_num_parameters=base + mem, base_model_num_parameters=base, memory_num_parameters=mem,
                    memory_lam=self.lam, memory_temperature=self.mem_temperature,
                    memory_gate=self.handle.gate.to_dict() if self.handle.gate is not None else None,
                    memory_fingerprint=memory_fingerprint(self.memory), memory_source=self.memory.source,
                    memory_base_model=meta.get("base_model"), memory_base_fingerprint=meta.get("base_fingerprint"),
                    memory_hook=str(self.handle.hook_point))
        return info


def main() -> None:
    """`mlpmem-lm-eval`: lm-eval's command line with the ``mlpmem`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
