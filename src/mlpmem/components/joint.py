"""The joint LM: a Hugging Face causal LM with an MLP memory mixed into its output, via hooks.

attach_memory(model, memory) installs three hooks and no new decoding code:
1. a capture hook at the memory's hook point (the pre-FFN norm of the last decoder layer by default), keeping the
   hidden states (B, T, d) of the current forward;
2. a forward pre-hook on the model, recording `logits_to_keep` so the captured positions can be aligned with the
   positions the LM head actually receives (generate() passes logits_to_keep=1: only the newest position);
3. a forward hook on the LM head (model.get_output_embeddings()) that replaces its logits by the mixed
   log-probabilities  log((1 - lam) softmax(z_LM) + lam softmax(z_mem / T_mem)).
Log-probabilities are valid logits, so everything downstream works unchanged: generate() with greedy, sampling, beam
search, KV cache (the memory is position-wise, it needs no cache), left padding; model(ids, labels=...).loss is the
joint NLL. At lam = 0 the head's own output is returned untouched, so the model is bit-identical to the base LM.
With an adaptive gate (components/gate.py, fitted by `eval` with system memory+gate) lam is set per position from
the gate's features of the two distributions at that position, exactly as eval scored it.

Post-head logit transforms (Gemma 2/3 final_logit_softcapping, Granite logits_scaling, Cohere logit_scale) are
applied by the model *after* the head, which would distort the mixture; while attached they are switched off in the
model and applied inside the head hook instead (same operations, so lam = 0 stays bit-identical), and restored by
detach(). A model saved while a memory is attached would therefore save the neutral value: detach first.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .capture import HookPoint, hook_width, register_capture, resolve_hook
from .gate import Gate, features
from .interpolate import memory_logprobs, mix_logprobs, mix_logprobs_per_token

_ATTR = "_mlpmem_joint"


def _meta(memory: nn.Module) -> dict:
    cfg = getattr(memory, "config", None)
    meta = getattr(cfg, "meta", None)
    return dict(meta) if isinstance(meta, dict) else {}


def _memory_field(memory: nn.Module, name: str):
    """A field of the memory's config: config.meta[name], else config.<name>, else None."""
    meta = _meta(memory)
    if meta.get(name) is not None:
        return meta[name]
    return getattr(getattr(memory, "config", None), name, None)


def _select_positions(h: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The rows of h (B, T, d) that the LM head received for this `logits_to_keep` (HF semantics: an int keeps the
    last n positions, 0 all; a 1-D tensor indexes positions; a 2-D int tensor positions per row; a 2-D bool tensor
    is a mask, flattened)."""
    if isinstance(logits_to_keep, torch.Tensor):
        idx = logits_to_keep.to(h.device)
        if idx.ndim == 2 and idx.dtype == torch.bool:
            return h[idx]
        if idx.ndim == 2:
            return torch.take_along_dim(h, idx[..., None], dim=1)
        return h[:, idx, :]
    return h[:, -int(logits_to_keep):, :] if logits_to_keep else h


def _post_head_transforms(model: nn.Module) -> tuple[list[Callable], list[Callable]]:
    """Switch off the logit transforms a model applies after its head; return (transforms, restore callbacks)."""
    posts: list[Callable] = []
    restores: list[Callable] = []
    cfgs = [model.config] if hasattr(model, "config") else []
    if cfgs and hasattr(model.config, "get_text_config"):
        text = model.config.get_text_config()
        if text is not model.config:
            cfgs.append(text)

    def neutralize(obj, attr: str, neutral) -> None:
        old = getattr(obj, attr)
        setattr(obj, attr, neutral)
        restores.append(lambda: setattr(obj, attr, old))

    cap = next((c.final_logit_softcapping for c in cfgs if getattr(c, "final_logit_softcapping", None) is not None),
               None)
    if cap is not None:  # Gemma 2/3 family: logits = tanh(logits / cap) * cap, same op order as the model
        for c in cfgs:
            if getattr(c, "final_logit_softcapping", None) is not None:
                neutralize(c, "final_logit_softcapping", None)
        posts.append(lambda z: torch.tanh(z / cap) * cap)
    scaling = next((c.logits_scaling for c in cfgs if getattr(c, "logits_scaling", None) not in (None, 1, 1.0)),
                   None)
    if scaling is not None:  # Granite: logits / logits_scaling (dividing by 1.0 afterwards is exact)
        for c in cfgs:
            if getattr(c, "logits_scaling", None) not in (None, 1, 1.0):
                neutralize(c, "logits_scaling", 1.0)
        posts.append(lambda z: z / scaling)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:  # Cohere: logits * scale
        neutralize(model, "logit_scale", 1.0)
        posts.append(lambda z: z * scale)
    return posts, restores


class JointHandle:
    """A memory attached to a model. `lam`, `mem_temperature` and `gate` can be changed at any time; detach() undoes
    all. With a `gate` the weight is the gate's per position and `lam` is not used."""

    def __init__(self, model: nn.Module, memory: nn.Module, hook_point: HookPoint, lam: float,
                 mem_temperature: float, gate: Gate | None = None) -> None:
        self.model = model
        self.memory = memory
        self.hook_point = hook_point
        self.lam = lam
        self.mem_temperature = mem_temperature
        self.gate = gate
        self._captured: torch.Tensor | None = None
        self._logits_to_keep = None
        self._saw_call = False
        self._handles: list = []
        self._restores: list[Callable] = []
        self._posts: list[Callable] = []
        self.attached = False

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {value}")
        self._lam = value

    @property
    def mem_temperature(self) -> float:
        return self._mem_temperature

    @mem_temperature.setter
    def mem_temperature(self, value: float) -> None:
        value = float(value)
        if not value > 0 or math.isinf(value):
            raise ValueError(f"mem_temperature must be a positive finite number, got {value}")
        self._mem_temperature = value

    @property
    def gate(self) -> Gate | None:
        return self._gate

    @gate.setter
    def gate(self, value: Gate | None) -> None:
        if value is not None and not isinstance(value, Gate):
            raise ValueError(f"gate must be a components.gate.Gate or None, got {type(value).__name__}")
        self._gate = value

    def _attach(self) -> None:
        model, head = self.model, self.model.get_output_embeddings()
        self._posts, self._restores = _post_head_transforms(model)
        self._handles = [
            model.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
            register_capture(model.get_submodule(self.hook_point.module), self.hook_point.kind, self._on_capture),
            head.register_forward_hook(self._on_head),
        ]
        setattr(model, _ATTR, self)
        self.attached = True

    def detach(self) -> None:
        """Remove every hook and restore the model's settings; the model is the plain LM again. Idempotent."""
        for h in self._handles:
            h.remove()
        for restore in reversed(self._restores):
            restore()
        self._handles, self._restores, self._posts = [], [], []
        self._captured = None
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self.attached = False

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs) -> None:
        self._captured = None
        self._logits_to_keep = kwargs.get("logits_to_keep")
        self._saw_call = True

    def _on_capture(self, x: torch.Tensor) -> None:
        self._captured = x

    def _on_head(self, module, args, logits: torch.Tensor):
        logits_to_keep, saw_call = self._logits_to_keep, self._saw_call
        h, self._captured, self._logits_to_keep, self._saw_call = self._captured, None, None, False
        lm_logits = logits
        for post in self._posts:
            lm_logits = post(lm_logits)
        if self._lam == 0.0 and self._gate is None:
            return lm_logits if self._posts else None  # untouched: bit-identical to the base LM
        if h is None:
            raise RuntimeError(f"the memory's hook point {self.hook_point} did not run before the LM head")
        if saw_call and logits_to_keep is not None:
            h = _select_positions(h, logits_to_keep)
        elif logits.dim() == 3:
            # forward() called directly (hooks on __call__ did not run): the head saw the last T' positions
            h = h[:, -logits.shape[1]:, :]
        if h.shape[:-1] != logits.shape[:-1]:
            raise RuntimeError(f"cannot align the hidden states captured at {self.hook_point} {tuple(h.shape)} "
                               f"with the LM head's logits {tuple(logits.shape)}")
        param = next(self.memory.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else logits.device
        mem_logits = self.memory(h.to(device=device, dtype=dtype))
        if mem_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(f"the memory predicts {mem_logits.shape[-1]} tokens but the LM head {logits.shape[-1]}: "
                             "the memory was trained for another base model")
        mem_lp = memory_logprobs(mem_logits, self._mem_temperature).to(logits.device)
        lm_lp = torch.log_softmax(lm_logits.float(), dim=-1)
        if self._gate is not None:  # the gate's λ per position, from the features scoring computes (no gold token)
            return mix_logprobs_per_token(lm_lp, mem_lp, self._gate.lam(features(lm_lp, mem_lp)))
        return mix_logprobs(lm_lp, mem_lp, self._lam)


def attach_memory(model: nn.Module, memory: nn.Module, lam: float = 0.25, hook: str | HookPoint | None = None,
                  mem_temperature: float | None = None, gate: Gate | None = None) -> JointHandle:
    """Mix `memory` into `model`'s next-token distribution at every forward; returns the handle (detach() to undo).

    mem_temperature: the memory's inference temperature; default the gate's (it was fitted at it), else 1.
    gate: an adaptive gate (components/gate.py; e.g. artifacts.tuned_settings(...).gate): λ per position from it,
        `lam` then unused.

    memory: any module mapping hidden states (..., d) -> logits (..., V); its optional `config.meta` may name the
        "hook" it was trained on and its "input_size" / "vocab_size", which are checked against the model.
    hook: where to read the hidden state; default the memory's meta hook, else resolve_hook(model, 'auto').
    The memory is moved to the device of the model's LM head and runs in its own dtype (hidden states are cast to
    it; float32 memories see float32 inputs). The mixture is returned in float32. Modes (train/eval) are left as
    they are: call .eval() on both for inference.
    """
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("a memory is already attached to this model; call detach_memory(model) (or "
                           "handle.detach()) before attaching another")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None); "
                         "attach the memory to a causal LM (AutoModelForCausalLM)")
    meta_hook = _meta(memory).get("hook")
    meta_layer = int(_meta(memory).get("layer", -1))
    if meta_hook is not None:
        try:
            trained_hp = resolve_hook(model, meta_hook, layer=meta_layer)
        except ValueError as e:
            raise ValueError(f"the memory was trained for another base model or hook point: its hook {meta_hook!r} "
                             f"does not exist in {type(model).__name__} ({e})") from None
    hp = resolve_hook(model, hook if hook is not None else (meta_hook or "auto"), layer=meta_layer)
    if meta_hook is not None and hp != trained_hp:
        raise ValueError(f"the memory was trained for another base model or hook point: it was trained on "
                         f"{trained_hp}, but is being attached at {hp}")
    width, in_size = hook_width(model, hp), _memory_field(memory, "input_size")
    if width is not None and in_size is not None and int(in_size) != width:
        raise ValueError(f"the memory was trained for another base model or hook point: it expects inputs of size "
                         f"{in_size}, but the hidden state at {hp} has size {width}")
    n_vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    mem_vocab = _memory_field(memory, "vocab_size")
    if mem_vocab is not None and int(mem_vocab) != n_vocab:
        raise ValueError(f"the memory was trained for another base model: it predicts {mem_vocab} tokens, but "
                         f"the model's LM head has {n_vocab}")
    if gate is not None and mem_temperature is not None and float(mem_temperature) != gate.T_mem:
        raise ValueError(f"the gate was fitted with the memory at temperature {gate.T_mem:g}, not {mem_temperature:g}: "
                         "leave mem_temperature unset")
    mem_temperature = mem_temperature if mem_temperature is not None else (gate.T_mem if gate is not None else 1.0)
    memory.to(head.weight.device)
    handle = JointHandle(model, memory, hp, lam, mem_temperature, gate)
    handle._attach()
    return handle


def detach_memory(model: nn.Module) -> bool:
    """Detach the memory attached to `model`, if any; returns whether one was attached."""
    handle = getattr(model, _ATTR, None)
    if handle is None:
        return False
    handle.detach()
    return True


def attached_memory(model: nn.Module) -> JointHandle | None:
    """The handle of the memory attached to `model`, or None."""
    return getattr(model, _ATTR, None)


class MemoryAttached(nn.Module):
    """A causal LM with a memory attached, as one module for training both together: ``parameters()`` holds the
    LM's and the memory's, ``forward`` is the LM's, whose logits are then the mixture's log-probabilities (so the
    usual next-token cross-entropy on them is the mixture's NLL, and its gradient reaches the LM through both its
    own head and the hidden state the memory reads). Attach before wrapping the LM (e.g. with peft LoRA): the hooks
    stay on the LM's modules. ``detach()`` removes the hooks and returns the LM. With a ``gate`` the memory's
    weight is the gate's per position (``lam`` unused; mem_temperature defaults to the gate's)."""

    def __init__(self, lm: nn.Module, memory: nn.Module, lam: float, hook: str | HookPoint | None = None,
                 mem_temperature: float | None = None, gate: Gate | None = None) -> None:
        super().__init__()
        self.handle = attach_memory(lm, memory, lam=lam, hook=hook, mem_temperature=mem_temperature, gate=gate)
        self.lm = lm
        self.memory = memory

    def forward(self, *args, **kwargs):
        return self.lm(*args, **kwargs)

    def detach(self) -> nn.Module:
        self.handle.detach()
        return self.lm
