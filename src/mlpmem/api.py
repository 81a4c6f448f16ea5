"""The Python API a Hugging Face user starts from (re-exported lazily by ``import mlpmem``):

    import mlpmem

    model, tok = mlpmem.load("HuggingFaceTB/SmolLM2-135M", memory="user/repo-or-local-dir")
    out = model.generate(**tok("The", return_tensors="pt"), max_new_tokens=20)

``load`` loads the base LM (or takes your model object), loads the memory (a folder or a Hub repo id), refuses a
memory trained for another base model (:class:`mlpmem.components.hub.MemoryMismatch`), and attaches it at the λ and
temperature ``mlpmem eval`` tuned for it. What it returns is the plain transformers model with hooks (its own
``generate``, ``model(ids, labels=ids).loss``, lm-eval's ``HFLM(pretrained=model, tokenizer=tok)``);
``mlpmem.detach_memory(model)`` gives back the base model exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from mlpmem.components.memory import MLPMemory

PathLike = str | os.PathLike


def identity_of(model: nn.Module, tokenizer: Any) -> dict:
    """The base-model identity of a model object (``AutoModelForCausalLM``) and its tokenizer, as
    :func:`mlpmem.components.lm.model_identity` computes it for a model mlpmem loads: tokenizer hash, config hash
    (dtype and path left out), parameter count, and the weights digest of the folder it was loaded from (the Hub
    commit for a Hub id). A model built or changed in this process is hashed tensor by tensor instead, so a copy
    fine-tuned in memory still differs from the folder it came from only if it was saved and reloaded; check
    the model as loaded."""
    from mlpmem.components.lm import model_identity, weights_digest
    from mlpmem.config import ModelConfig

    src = str(getattr(model.config, "_name_or_path", "") or "")
    # "<in memory>" is no folder, so the digest is the Hub commit, else the tensors themselves
    digest = weights_digest(src if src and Path(src).is_dir() else "<in memory>", {}, model)
    return model_identity(ModelConfig(name=src or type(model).__name__), model, tokenizer, digest)


def check_memory(model: nn.Module, tokenizer: Any, memory: MLPMemory | PathLike, *, hook: str | None = None) -> None:
    """Raise :class:`mlpmem.MemoryMismatch` unless ``memory`` (loaded, a folder or a Hub repo id) was trained for
    this model object and tokenizer: same tokenizer, weights and config (:func:`identity_of`), and hook point when
    given. Use it before :func:`mlpmem.attach_memory` on a model you loaded yourself."""
    from mlpmem.components.hub import check_base
    from mlpmem.components.memory import MLPMemory

    mem = memory if isinstance(memory, MLPMemory) else MLPMemory.from_pretrained(memory)
    check_base(mem.config.meta or {}, identity_of(model, tokenizer), hook)


def run_tuned_settings(memory_dir: PathLike) -> dict:
    """{"lam", "T_mem"[, "gate"]} tuned by `mlpmem eval` for the memory in ``memory_dir`` when it lies in a run
    directory (``<run>/memory/<checkpoint>`` or ``<run>/joint/memory``), read by
    :func:`mlpmem.artifacts.tuned_settings` (through the eval manifest and its upstream chain); "gate" (a dict) when
    eval fitted and kept the per-token gate; {} when that run has no finished evaluation of it."""
    from mlpmem.artifacts import is_complete, tuned_settings

    d = Path(memory_dir).resolve()  # memory/best and joint/memory are links to versioned directories
    parent = {"memory": "eval", "joint": "eval-joint"}.get(d.parent.name)
    run = d.parent.parent
    if parent is None or not is_complete(run / parent):
        return {}
    tuned = tuned_settings(run, parent, memory=False)
    if tuned.lam is None:
        return {}
    got = {"lam": tuned.lam, "T_mem": tuned.mem_T}
    return {**got, "gate": tuned.gate.to_dict()} if tuned.gate is not None else got


def tuned_settings(memory: MLPMemory) -> dict:
    """{"lam", "mem_temperature"[, "gate"]} the memory was tuned at: recorded in its config by `mlpmem export`,
    else read from the run directory it lies in; {} when neither says. "gate" (a dict) when eval fitted and kept
    the per-token gate (memory+gate)."""
    from mlpmem.components.hub import tuned

    got = tuned(memory)
    if not got and memory.source and Path(memory.source).is_dir():
        run = run_tuned_settings(memory.source)
        got = {"lam": run["lam"], "mem_temperature": run["T_mem"]} if run else {}
        if run.get("gate"):
            got["gate"] = run["gate"]
    return got


def flag(value: bool | str | None, what: str) -> bool | None:
    """``gate`` as given from Python (a bool, None) or by lm-eval's model_args (a string)."""
    if value is None or isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    if low in ("none", "auto", ""):
        return None
    raise ValueError(f"{what}: expected true, false or auto, got {value!r}")


def keeps_gate(want: bool | None, lam: float | None, mem_temperature: float | None) -> bool:
    """Whether a recorded gate mixes: asked for (True), or by default (None) unless a fixed λ or temperature is
    given."""
    return want is True or (want is None and lam is None and mem_temperature is None)


def resolve_settings(memory: MLPMemory, lam: float | None, mem_temperature: float | None,
                     what: str = "lam", gate: bool | str | None = None,
                     gate_what: str = "gate") -> tuple[float, float, Any]:
    """(lam, mem_temperature, gate) by the rule of :func:`mlpmem.artifacts.tuned_settings`: the given ones, else the
    tuned ones (:func:`tuned_settings`), else a ValueError naming ``what`` (no default λ); a temperature nobody
    tuned is 1.

    gate: None (auto) mixes with the per-token gate eval fitted and kept, unless ``lam`` or ``mem_temperature`` is
    given (a fixed mixture asked for), as the `generate` stage does; True requires that gate (a ValueError naming
    ``gate_what`` when none is recorded); False never uses one. The gate returned is a
    :class:`mlpmem.components.gate.Gate` or None; with a gate the temperature is the one it was fitted at."""
    from mlpmem.components.gate import Gate

    settings = tuned_settings(memory)
    want = flag(gate, gate_what)
    if want is True and not settings.get("gate"):
        raise ValueError(f"{gate_what}: no per-token gate is recorded for the memory {memory.source or ''}: "
                         "`mlpmem eval` fits one with memory+gate in --eval.systems and keeps it only where it beats "
                         "the fixed λ on held-out validation documents (`mlpmem export` then records it)")
    if lam is None and "lam" not in settings:
        raise ValueError(f"{what} is required: no tuned lambda is recorded for the memory {memory.source or ''} "
                         "(neither in its config, as `mlpmem export` writes it, nor in a run directory evaluated by "
                         "`mlpmem eval`)")
    use_gate = bool(settings.get("gate")) and keeps_gate(want, lam, mem_temperature)
    lam = float(lam) if lam is not None else settings["lam"]
    g = Gate.from_dict(settings["gate"]) if use_gate else None
    if g is not None:
        if mem_temperature is not None and float(mem_temperature) != g.T_mem:
            raise ValueError(f"the gate was fitted with the memory at temperature {g.T_mem:g}, not "
                             f"{float(mem_temperature):g}: leave the temperature unset, or pass {gate_what}=false")
        return lam, g.T_mem, g
    temp = float(mem_temperature) if mem_temperature is not None else settings.get("mem_temperature", 1.0)
    return lam, temp, None


def load(base: PathLike | nn.Module, memory: MLPMemory | PathLike, *, tokenizer: Any = None,
         lam: float | None = None, mem_temperature: float | None = None, gate: bool | None = None,
         device: str = "auto", dtype: str = "auto", revision: str | None = None, memory_revision: str | None = None,
         trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer): the base LM with ``memory`` attached, ready for ``model.generate`` and lm-eval.

    base: a Hub id, a local model folder, a .gguf file, "default" (mlpmem's offline SmolLM2), or a model object
        (``AutoModelForCausalLM``; pass its ``tokenizer``), to which the memory is attached in place.
    memory: an ``mlpmem export`` folder, a run's ``memory/best``, a Hub repo id, or a loaded :class:`MLPMemory`.
    lam, mem_temperature: the memory's weight and softmax temperature; default: the tuned ones (an error if none
        are recorded and ``lam`` is not given).
    gate: the per-token λ that `mlpmem eval` fitted (memory+gate) and kept because it beat the fixed λ on held-out
        validation documents: None (default) uses it when one is recorded and neither ``lam`` nor
        ``mem_temperature`` is given; True requires it; False mixes at the fixed λ.
    device, dtype: for a base loaded here ("auto": CUDA if available; bf16 where the device computes it natively,
        else fp32); the memory runs on the model's device in the model's dtype.
    Raises :class:`mlpmem.MemoryMismatch` when the memory was trained for another base model.
    """
    from mlpmem.components.hub import load_memory_for
    from mlpmem.components.joint import attach_memory

    if isinstance(base, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("tokenizer: pass it with a model object; a base given by name brings its own")
        from mlpmem.components.lm import load_lm
        from mlpmem.config import ModelConfig

        lm = load_lm(ModelConfig(name=str(base), revision=revision, device=device, dtype=dtype,
                                 trust_remote_code=trust_remote_code))
        model, tok, identity = lm.model, lm.tokenizer, lm.identity
        if tok.pad_token is None:  # batched generate needs one; the model never sees it (attention mask)
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # a decoder continues from the right end of every row
    else:
        if tokenizer is None:
            raise ValueError("tokenizer: required with a model object (the one the model was loaded with)")
        model, tok, identity = base, tokenizer, identity_of(base, tokenizer)
    param = next(model.parameters())
    mem = load_memory_for(memory, identity, device=str(param.device), dtype=param.dtype, revision=memory_revision)
    lam, temp, g = resolve_settings(mem, lam, mem_temperature, gate=gate)
    attach_memory(model, mem.eval(), lam=lam, mem_temperature=temp, gate=g)
    return model, tok
