"""The MLP memory: a residual stack of the base LM family's own feed-forward blocks, without attention.

    x <- in_proj(x)                    (only when the memory width differs from the LM hidden size)
    x <- x + FFN(Norm(x))              L times
    logits = head(Norm(x))             untied Linear(hidden -> vocab), no bias

GPT-2 family: LayerNorm, Linear d->I, GELU (tanh), Linear I->d, dropout on the block output.
Llama family (Llama/Mistral/Qwen): RMSNorm, down(silu(gate(h)) * up(h)), no biases.

A checkpoint is a folder with ``model.safetensors`` and ``config.json``; the config alone rebuilds the module, so
inference code never needs the training code (and nothing is unpickled). ``MLPMemory`` is a Hugging Face Hub model
(huggingface_hub's ``ModelHubMixin``): ``from_pretrained`` takes a folder or a Hub repo id, ``save_pretrained``
writes the folder with a model card, ``push_to_hub`` uploads it.

Why ``ModelHubMixin`` and not ``PyTorchModelHubMixin``: the PyTorch mixin loads weights with ``strict=False`` (a
missing or mis-shaped tensor passes silently), falls back to unpickling ``pytorch_model.bin``, and rebuilds the
config by dropping unknown keys, where a memory's config.json carries a format version and identity metadata that
must be checked. So the generic mixin gives the Hub side (save_pretrained with a card, push_to_hub, the card's
library and tags), and loading stays this module's strict reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors.torch import load_file, save
from torch import nn

from mlpmem.files import atomic_write_bytes, atomic_write_json

FAMILIES = ("gpt2", "llama")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
# model_types known to use RMSNorm + SwiGLU without biases; others qualify by having the matching config fields
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class MLPMemoryConfig:
    """Everything needed to rebuild an :class:`MLPMemory` (it is written verbatim to config.json).

    ``meta`` is free-form identity (base model, hook point, tokenizer hash) that lets later stages refuse a memory
    trained for another LM.
    """

    family: str
    input_size: int
    hidden_size: int
    intermediate_size: int
    num_blocks: int
    vocab_size: int
    norm_eps: float = 1e-5
    dropout: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: got {self.family!r}, expected one of {', '.join(FAMILIES)}")
        for name in ("input_size", "hidden_size", "intermediate_size", "num_blocks", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLPMemoryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"memory config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)


def memory_config_for(
    lm_config: Any,
    num_blocks: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    dropout: float = 0.1,
    meta: dict[str, Any] | None = None,
) -> MLPMemoryConfig:
    """Derive a memory config from a transformers ``PretrainedConfig`` of the base LM.

    Defaults follow the authors: the LM's own FFN shape, and ``round(1.5 * num_hidden_layers)`` blocks (GPT-2
    small/medium/large -> 18/36/54), which makes the memory about as large as its base LM. ``input_size`` is always
    the LM hidden size (the memory reads the LM's hidden state); a different ``hidden_size`` adds an input projection.
    """
    cfg = lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config
    model_type = getattr(cfg, "model_type", None)
    if model_type == "gpt2":
        family, lm_hidden, layers = "gpt2", cfg.n_embd, cfg.n_layer
        eps = cfg.layer_norm_epsilon
        width = hidden_size or lm_hidden
        # n_inner belongs to the LM's width; a wider/narrower memory keeps GPT-2's 4x ratio instead
        lm_inner = cfg.n_inner if getattr(cfg, "n_inner", None) and width == lm_hidden else 4 * width
    elif model_type in LLAMA_LIKE or (hasattr(cfg, "intermediate_size") and hasattr(cfg, "rms_norm_eps")):
        family, lm_hidden, layers = "llama", cfg.hidden_size, cfg.num_hidden_layers
        eps = cfg.rms_norm_eps
        width = hidden_size or lm_hidden
        lm_inner = cfg.intermediate_size
    else:
        raise ValueError(
            f"lm_config: unsupported model_type {model_type!r}; supported: 'gpt2', {', '.join(map(repr, LLAMA_LIKE))} "
            "or any config with intermediate_size and rms_norm_eps (RMSNorm + SwiGLU)"
        )
    if num_blocks is None:
        num_blocks = max(1, int(round(1.5 * layers)))
    identity = {"base_model_type": model_type, "base_name_or_path": getattr(lm_config, "_name_or_path", "") or ""}
    identity.update(meta or {})
    return MLPMemoryConfig(
        family=family,
        input_size=lm_hidden,
        hidden_size=width,
        intermediate_size=intermediate_size or lm_inner,
        num_blocks=num_blocks,
        vocab_size=cfg.vocab_size,
        norm_eps=float(eps),
        dropout=dropout,
        meta=identity,
    )


class GPT2Block(nn.Module):
    """x + dropout(fc2(gelu_tanh(fc1(LayerNorm(x)))))."""

    def __init__(self, c: MLPMemoryConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.dropout = nn.Dropout(c.dropout)

    def residual_proj(self) -> nn.Linear:
        return self.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh")))


class LlamaBlock(nn.Module):
    """x + dropout(down(silu(gate(h)) * up(h))), h = RMSNorm(x); no biases, as in the Llama family."""

    def __init__(self, c: MLPMemoryConfig):
        super().__init__()
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.gate = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.dropout = nn.Dropout(c.dropout)

    def residual_proj(self) -> nn.Linear:
        return self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.dropout(self.down(F.silu(self.gate(h)) * self.up(h)))


class MLPMemory(nn.Module, ModelHubMixin, library_name="mlpmem", tags=["mlpmem", "mlp-memory", "knn-lm"],
                paper_url="https://arxiv.org/abs/2508.01832"):
    """Maps an LM hidden state (..., input_size) to next-token logits (..., vocab_size)."""

    source: str | None = None  # the folder or Hub repo id it was loaded from (None: built in this process)

    def __init__(self, config: MLPMemoryConfig):
        super().__init__()
        self.config = config
        gpt2 = config.family == "gpt2"
        self.in_proj = (
            nn.Linear(config.input_size, config.hidden_size, bias=gpt2)
            if config.input_size != config.hidden_size
            else None
        )
        block = GPT2Block if gpt2 else LlamaBlock
        self.blocks = nn.ModuleList(block(config) for _ in range(config.num_blocks))
        self.norm = (
            nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            if gpt2
            else nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        )
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) weights, zero biases, unit norms; residual output projections scaled by 1/sqrt(2L).

        The 1/sqrt(2L) scaling (GPT-2's) keeps the residual stream's variance from growing with depth, which matters
        here because the authors' memories are deep (18-54 blocks).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        std = 0.02 / math.sqrt(2 * self.config.num_blocks)
        for b in self.blocks:
            nn.init.normal_(b.residual_proj().weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., input_size), any float dtype -> logits (..., vocab_size) in the computation dtype.

        The input is cast to the parameter dtype first (keys are stored as float16, the memory may be float32);
        under autocast the matmuls then run in the autocast dtype.
        """
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the output head: the final normalised hidden state (..., hidden_size)."""
        if x.shape[-1] != self.config.input_size:
            raise ValueError(f"x: last dimension must be input_size={self.config.input_size}, got {tuple(x.shape)}")
        x = x.to(self.head.weight.dtype)
        if self.in_proj is not None:
            x = self.in_proj(x)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------- persistence (Hub model)

    def _save_pretrained(self, save_directory: Path) -> None:
        """ModelHubMixin's hook: the two checkpoint files, with the identity made shareable (:func:`shareable_meta`:
        no local paths)."""
        write_pretrained(self, Path(save_directory), meta=shareable_meta(self.config.meta))

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> str | None:
        """Write ``model.safetensors``, ``config.json`` and a model card (``README.md``, kept if the folder has one)
        into ``save_directory``; ``push_to_hub=True`` then uploads it to ``repo_id``. ``model_card_kwargs`` go to
        :func:`mlpmem.components.hub.model_card` (results, corpus, license, ...). Each file is written atomically;
        the stages swap whole directories instead (:func:`mlpmem.files.swapped_directory`)."""
        kw = {"memory_ref": repo_id or Path(save_directory).name, **(model_card_kwargs or {})}
        return super().save_pretrained(save_directory, config=config, repo_id=repo_id, push_to_hub=push_to_hub,
                                       model_card_kwargs=kw, **push_to_hub_kwargs)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None,
                    **kwargs: Any) -> str:
        """Upload the memory (weights, config, model card) to the Hub repo ``repo_id`` (created if needed); see
        ``huggingface_hub.ModelHubMixin.push_to_hub`` for ``private``, ``token``, ``commit_message``, ..."""
        return super().push_to_hub(repo_id, model_card_kwargs={"memory_ref": repo_id, **(model_card_kwargs or {})},
                                   **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card written by save_pretrained / push_to_hub (see :func:`mlpmem.components.hub.model_card`)."""
        from mlpmem.components.hub import model_card

        return ModelCard(model_card(self, **kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MLPMemory:
        """Rebuild a memory (in eval mode) from a folder written by :meth:`save_pretrained` or a Hub repo id
        (downloaded to the Hub cache; ``revision``, ``token``, ``cache_dir``, ``force_download`` and
        ``local_files_only`` as in huggingface_hub). The weights are checked tensor by tensor against the config.
        It does not check the base model: :func:`mlpmem.components.hub.load_memory_for` and ``mlpmem.load`` do."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, device=device, dtype=dtype)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         **_: Any) -> MLPMemory:
        d = resolve_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                           local_files_only=local_files_only, token=token)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint folder {d} is incomplete: missing {', '.join(missing)}")
        try:
            raw = json.loads((d / CONFIG_NAME).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint folder {d}: {CONFIG_NAME} is not valid JSON ({e})") from None
        if raw.pop("architecture", None) != "MLPMemory":
            raise ValueError(f"checkpoint folder {d}: {CONFIG_NAME} does not describe an MLPMemory")
        version = raw.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"checkpoint folder {d}: format_version {version}, this mlpmem reads {FORMAT_VERSION}")
        model = cls(MLPMemoryConfig.from_dict(raw))
        try:
            state = load_file(str(d / WEIGHTS_NAME), device=str(device))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"checkpoint folder {d}: {WEIGHTS_NAME} is unreadable ({e})") from None
        check_state_dict(model, state, where=str(d))
        model.load_state_dict(state)
        model.to(device=device, dtype=dtype)
        model.source = model_id
        return model.eval()


def is_hub_id(source: str | Path) -> bool:
    """Whether ``source`` reads as a Hub repo id (``user/name``) rather than a local path."""
    s = str(source)
    if s.count("/") != 1 or s.startswith((".", "/", "~")) or Path(s).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def resolve_folder(source: str | Path, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """A local memory folder, or a Hub repo id downloaded to the Hub cache (its config, weights and card; needs the
    network once). FileNotFoundError in one line otherwise."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if not is_hub_id(source):
        what = "is a file" if p.exists() else "does not exist"
        raise FileNotFoundError(f"{source} {what}: neither a memory folder nor a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision,
                                      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"], **hub_kwargs))
    except Exception as e:  # offline, unknown repo, no access: one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(f"{source}: could not download it from the Hub ({type(e).__name__}: {first})") from None


def shareable_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The identity without local paths, for a folder that leaves this machine: the base model's fingerprint and
    tokenizer hash stay (they are what the checks compare); a base model loaded from a local folder or file is
    named by its last path component."""
    out = dict(meta)
    for key in ("base_model", "base_name_or_path"):
        v = out.get(key)
        if isinstance(v, str) and v and not is_hub_id(v) and (os.sep in v or "/" in v or Path(v).exists()):
            out[key] = Path(v).name
    return out


def memory_fingerprint(memory: nn.Module) -> str:
    """Content hash of a memory as it is held (its architecture, and every tensor's name, dtype, shape and bytes;
    not its ``meta``, which names what it is for): equal fingerprints compute the same function. 16 hex digits."""
    h = hashlib.sha256()
    cfg = getattr(memory, "config", None)
    if isinstance(cfg, MLPMemoryConfig):
        arch = {k: v for k, v in cfg.to_dict().items() if k not in ("meta", "dropout")}
        h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, t in sorted(memory.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_pretrained(memory: MLPMemory, directory: Path, meta: dict[str, Any] | None = None) -> None:
    """Write the two checkpoint files into an existing directory (each atomically, weights first); ``meta``
    replaces the config's meta in config.json when given."""
    # clone+contiguous: safetensors refuses shared or non-contiguous storage
    state = {k: v.detach().contiguous().cpu() for k, v in memory.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    cfg = {"architecture": "MLPMemory", "format_version": FORMAT_VERSION, **memory.config.to_dict()}
    if meta is not None:
        cfg["meta"] = meta
    atomic_write_json(directory / CONFIG_NAME, cfg)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """ValueError listing missing, unexpected and mis-shaped tensors of ``state`` against ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for k in sorted(set(expected) & set(state)):
        if tuple(state[k].shape) != expected[k]:
            problems.append(f"{k} has shape {tuple(state[k].shape)}, config implies {expected[k]}")
    if problems:
        raise ValueError(f"checkpoint {where} does not match its config.json: " + "; ".join(problems))


def _lm_final_norm(lm_model: nn.Module) -> nn.Module:
    base = getattr(lm_model, "base_model", lm_model)
    for name in ("norm", "ln_f", "final_layernorm"):
        m = getattr(base, name, None)
        if isinstance(m, nn.Module) and getattr(m, "weight", None) is not None:
            return m
    raise ValueError(
        f"lm_model: cannot find the final norm of {type(lm_model).__name__} (looked for base_model.norm / .ln_f / "
        ".final_layernorm)"
    )


@torch.no_grad()
def init_head_from_lm(memory: MLPMemory, lm_model: nn.Module) -> None:
    """Copy the LM's output embedding into the memory head and its final norm into the memory's final norm.

    The memory then starts out reading its last hidden state the way the LM reads its own, a warm start offered
    as an option to measure against the random head.
    """
    emb = lm_model.get_output_embeddings()
    if emb is None:
        raise ValueError(f"lm_model: {type(lm_model).__name__} has no output embeddings")
    w = emb.weight
    if tuple(w.shape) != tuple(memory.head.weight.shape):
        raise ValueError(
            f"memory: head shape {tuple(memory.head.weight.shape)} (vocab, memory hidden_size) differs from the LM's "
            f"output embedding {tuple(w.shape)}; init_head='lm' needs the same vocabulary and width"
        )
    norm = _lm_final_norm(lm_model)
    if tuple(norm.weight.shape) != tuple(memory.norm.weight.shape):
        raise ValueError(f"memory: final norm shape {tuple(memory.norm.weight.shape)} differs from the LM's "
                         f"{tuple(norm.weight.shape)}")
    lm_bias = getattr(norm, "bias", None)
    mem_bias = getattr(memory.norm, "bias", None)
    if (lm_bias is None) != (mem_bias is None):
        raise ValueError(f"memory: family {memory.config.family!r} norm does not match the LM's "
                         f"{type(norm).__name__} (bias present in one only)")
    memory.head.weight.copy_(w)
    memory.norm.weight.copy_(norm.weight)
    if mem_bias is not None:
        mem_bias.copy_(lm_bias)


def memory_logprobs(memory: MLPMemory, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """hidden (..., input_size) -> float32 log_softmax(logits / temperature), shape (..., vocab_size)."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    return torch.log_softmax(memory(hidden).float() / temperature, dim=-1)
