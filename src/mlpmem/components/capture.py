"""Hook points: which hidden state of the base LM is the memory's key, and how to capture it.

The key of position t is the input of the last decoder layer's feed-forward block, after that block's pre-FFN norm
(spec section 2.2). A hook point names one module of the model and whether its output or its (first positional)
input is captured, as a string 'module.path:output' / 'module.path:input'. The same string is recorded in every
manifest and in the memory's config, so a memory can check that it is attached where it was trained.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mlpmem.errors import ConfigError

KINDS = ("output", "input")

# Pre-FFN norm of a decoder layer, by attribute name. Order matters:
# - Gemma 2/3 (and similar "sandwich" layers) have both post_attention_layernorm and pre_feedforward_layernorm; there
#   post_attention_layernorm normalises the *attention output* before the residual add, and the FFN's input norm is
#   pre_feedforward_layernorm. So pre_feedforward_layernorm must win when it exists.
# - Llama/Mistral/Qwen/Gemma 1/GPT-NeoX/Bloom: post_attention_layernorm is the norm applied right before the MLP.
# - GPT-2/GPT-Neo: ln_2.
_PRE_FFN_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
# Layers that normalise *after* each sub-block (OLMo 2 style) have post_feedforward_layernorm but no pre-FFN norm:
# their post_attention_layernorm is applied to the attention output, not to the FFN input. For those (and for any
# family we do not know) the FFN's own input is the right key, which we capture directly.
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")


@dataclass(frozen=True)
class HookPoint:
    """A module of the model (dotted path from the top-level model) and what to capture: its output or input."""

    module: str
    kind: str = "output"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"hook kind must be one of {KINDS}, got {self.kind!r} (in hook {self.module!r})")

    def __str__(self) -> str:
        return f"{self.module}:{self.kind}"

    @classmethod
    def parse(cls, text: str) -> "HookPoint":
        """'a.b.c' or 'a.b.c:output' -> output of a.b.c; 'a.b.c:input' -> its first positional input."""
        module, sep, kind = text.strip().rpartition(":")
        if not sep:
            module, kind = kind, "output"
        if not module:
            raise ConfigError(f"empty module path in hook {text!r}; expected 'module.path:output' or ':input'")
        return cls(module, kind)


class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass once the wanted tensor is captured."""


class Captured:
    """Holder for the most recent tensor captured at a hook point; `.value` is (B, T, d) or None before a forward."""

    def __init__(self, hp: HookPoint) -> None:
        self.hook_point = hp
        self.value: torch.Tensor | None = None


def _first_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise TypeError(f"hook point produced {type(x).__name__}, expected a tensor (or a tuple starting with one)")


def register_capture(module: nn.Module, kind: str, fn) -> torch.utils.hooks.RemovableHandle:
    """Call fn(tensor) each time `module` runs: with its output (kind 'output') or first positional input ('input').

    A module called with its input as a keyword (rare in HF code) gives the 'hidden_states' keyword or the first
    tensor keyword.
    """
    if kind == "output":
        return module.register_forward_hook(lambda m, args, out: fn(_first_tensor(out)))

    def pre_hook(m, args, kwargs):
        if args:
            fn(_first_tensor(args[0]))
            return
        x = kwargs.get("hidden_states")
        if x is None:
            x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if x is None:
            raise TypeError(f"{type(m).__name__} was called without a tensor input to capture")
        fn(x)

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _bad_hook(model: nn.Module, name: str, why: str) -> ConfigError:
    names = _module_names(model)
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not near:  # fall back to the siblings of the deepest existing parent
        parent = name
        while parent and parent not in names:
            parent = parent.rpartition(".")[0]
        near = [n for n in names if n.startswith(parent + ".") and n.count(".") == parent.count(".") + 1][:5]
        near = near or names[:5]
    return ConfigError(f"hook {name!r}: {why}. Nearby valid module names: {', '.join(near)}. "
                      "Pass an existing module as --extract.hook 'module.path:output' (or ':input').")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers and its dotted path ('transformer.h', 'model.layers', ...).

    Found generically: among the ModuleLists inside the decoder (model.get_decoder() when available, so a vision
    tower's layers are ignored), prefer one whose length equals config.num_hidden_layers, then a conventional name,
    then the shallowest; layers must be modules with children (not a list of plain Linears).
    """
    scope = model
    if hasattr(model, "get_decoder"):
        with contextlib.suppress(Exception):
            scope = model.get_decoder() or model
    in_scope = {id(m) for m in scope.modules()}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n_layers = getattr(cfg, "num_hidden_layers", None)
    best, best_key = None, None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or id(mod) not in in_scope:
            continue
        if not all(len(list(layer.children())) > 0 for layer in mod):
            continue
        key = (len(mod) == n_layers, name.rpartition(".")[2] in _LAYER_LIST_NAMES, -name.count("."), len(mod))
        if best_key is None or key > best_key:
            best, best_key = (name, mod), key
    if best is None:
        raise ConfigError(f"could not find the decoder layers of {type(model).__name__}; "
                         "pass the hook explicitly as --extract.hook 'module.path:output'")
    return best


def _auto_hook(model: nn.Module, layer: int) -> HookPoint:
    path, layers = decoder_layers(model)
    n = len(layers)
    if not -n <= layer < n:
        raise ConfigError(f"--extract.layer {layer} is out of range for a model with {n} decoder layers")
    idx = layer % n
    block = layers[idx]
    prefix = f"{path}.{idx}" if path else str(idx)
    children = dict(block.named_children())
    post_norm_layer = "post_feedforward_layernorm" in children and "pre_feedforward_layernorm" not in children
    if not post_norm_layer:
        for norm in _PRE_FFN_NORMS:
            if norm in children:
                return HookPoint(f"{prefix}.{norm}", "output")
    for ffn in _FFN_NAMES:
        if ffn in children:
            return HookPoint(f"{prefix}.{ffn}", "input")
    raise ConfigError(f"no known pre-FFN norm or FFN module in {prefix} ({type(block).__name__}: children "
                     f"{', '.join(children)}); pass the hook explicitly as --extract.hook 'module.path:output'")


def resolve_hook(model: nn.Module, hook: str | HookPoint = "auto", layer: int = -1) -> HookPoint:
    """Resolve --extract.hook / --extract.layer to a HookPoint that exists in `model`.

    'auto': the pre-FFN norm output of decoder layer `layer` (-1: last). GPT-2: transformer.h[L].ln_2;
    Llama/Mistral/Qwen: model.layers[L].post_attention_layernorm; Gemma 2/3: model.layers[L].pre_feedforward_layernorm
    (their post_attention_layernorm is a post-norm of the attention output); post-norm or unknown layers: the input
    of the layer's FFN module. Explicit names ('model.layers.3.mlp:input') are validated.
    """
    if isinstance(hook, HookPoint):
        hp = hook
    elif hook.strip() == "auto":
        return _auto_hook(model, layer)
    else:
        hp = HookPoint.parse(hook)
    try:
        model.get_submodule(hp.module)
    except AttributeError:
        raise _bad_hook(model, hp.module, f"no module of that name in {type(model).__name__}") from None
    return hp


def hook_width(model: nn.Module, hp: HookPoint) -> int | None:
    """Feature size of the captured tensor when it can be read off the module's weights (norms, Linear), else None."""
    m = model.get_submodule(hp.module)
    if isinstance(m, nn.Linear):
        return m.in_features if hp.kind == "input" else m.out_features
    w = getattr(m, "weight", None)
    if hp.kind == "output" and isinstance(w, torch.Tensor) and w.dim() == 1:
        return w.numel()
    cfg = getattr(model, "config", None)
    if hp.kind == "input" and hp.module.rpartition(".")[2] in _FFN_NAMES and cfg is not None:
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return getattr(cfg, "hidden_size", None)  # an FFN block reads (and writes) the residual width
    return None


@contextlib.contextmanager
def capture(model: nn.Module, hp: HookPoint) -> Iterator[Captured]:
    """Capture the tensor at `hp` during forwards run inside the block; the hook is removed on exit, even on error.

    >>> with capture(model, hp) as cap:
    ...     model(input_ids)
    >>> cap.value.shape   # (B, T, d): the last captured tensor
    """
    cap = Captured(hp)

    def store(x: torch.Tensor) -> None:
        cap.value = x

    handle = register_capture(model.get_submodule(hp.module), hp.kind, store)
    try:
        yield cap
    finally:
        handle.remove()


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (``model.base_model``), or the model itself when it has none."""
    return getattr(model, "base_model", model)


def forward_hidden(model: nn.Module, hp: HookPoint, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Hidden states at `hp` for input_ids (B, T) -> (B, T, d), in the model's dtype.

    Runs the base model only (not the LM head, which can be 50-250K wide) and stops as soon as the hook fires, so the
    layers after the hook point are skipped too. Grad mode is the caller's: wrap in torch.inference_mode() to extract.
    """
    target = model.get_submodule(hp.module)
    base = decoder_body(model)
    if not any(m is target for m in base.modules()):
        base = model  # a hook outside the base model (e.g. 'lm_head:input') needs the full forward
    cap = Captured(hp)

    def stop(x: torch.Tensor) -> None:
        cap.value = x
        raise _StopForward

    handle = register_capture(target, hp.kind, stop)
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if cap.value is None:
        raise RuntimeError(f"hook point {hp} did not run during the forward of {type(base).__name__}")
    return cap.value
