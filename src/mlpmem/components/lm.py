"""Loading the base LM and its tokenizer (default offline model, hub id, local directory, or .gguf file)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mlpmem.config import ModelConfig
from mlpmem.errors import ConfigError, ModelLoadError
from mlpmem.files import WEIGHT_SUFFIXES, cached_sha256, fingerprint
from mlpmem.runtime import library_progress, resolve_dtype

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedLM:
    model: torch.nn.Module
    tokenizer: object
    identity: dict  # name, revision, config hash, tokenizer hash, parameter count; recorded in manifests
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--model.device {name}: CUDA is not available on this machine; use auto or cpu")
    return dev


def model_source(mcfg: ModelConfig) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for the configured model name."""
    if mcfg.name == "default":
        from mlpmem.assets import default_model_dir

        return str(default_model_dir()), {}
    p = Path(mcfg.name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"--model.name {mcfg.name}: GGUF file not found")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists() and not p.is_dir():
        raise ModelLoadError(f"--model.name {mcfg.name}: is a file but not a .gguf; pass a model directory, "
                             "a .gguf file or a hub id")
    looks_local = p.is_absolute() or mcfg.name.startswith(".") or mcfg.name.count("/") > 1  # hub ids: [org/]name
    if looks_local and not p.exists():
        raise ModelLoadError(f"--model.name {mcfg.name}: no such directory")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelLoadError(f"--model.name {mcfg.name}: the directory has no config.json, so it is not a "
                             "Hugging Face model directory (save one with save_pretrained, or pass a .gguf file)")
    return (str(p) if p.is_dir() else mcfg.name), ({"revision": mcfg.revision} if mcfg.revision else {})


def tokenizer_hash(tok) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normaliser): equal hashes = same token ids."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # padding / truncation settings live in the backend too and change whenever the tokenizer is called with
        # padding=... or truncation=...; they do not change token ids, so hash a copy without them
        from tokenizers import Tokenizer

        clean = Tokenizer.from_str(backend.to_str())
        clean.no_padding()
        clean.no_truncation()
        blob = clean.to_str()
    else:
        blob = repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_tokenizer(mcfg: ModelConfig):
    from transformers import AutoTokenizer

    src, kw = model_source(mcfg)
    try:
        with library_progress():  # download bars as mlpmem's own (rank 0, MLPMEM_NO_PROGRESS)
            return AutoTokenizer.from_pretrained(src, trust_remote_code=mcfg.trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model.name {mcfg.name}: could not load its tokenizer ({str(e).splitlines()[0]}). "
                             "Pass an existing model directory, a .gguf file, or a hub id (needs network).") from None


def weights_digest(src: str, kw: dict, model) -> str:
    """Content identity of the weights: hash of the weight files of a local model (cached), the commit of a hub
    snapshot, else a hash of the loaded tensors. Replacing a checkpoint's weights in place changes it."""
    p = Path(src)
    files = [p / kw["gguf_file"]] if "gguf_file" in kw else \
        sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES) if p.is_dir() else []
    if files:
        return fingerprint([(f.name, cached_sha256(f)) for f in files])
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return f"commit:{commit}"
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(mcfg: ModelConfig, model, tok, weights: str | None = None) -> dict:
    cfg_json = model.config.to_json_string(use_diff=False)
    # dtype-independent: the same checkpoint at fp32 or bf16 has the same identity (dtype recorded separately);
    # location-independent: the path it was loaded from is not part of what it computes
    cfg_hash = hashlib.sha256(
        "\n".join(line for line in cfg_json.splitlines()
                  if "dtype" not in line and '"_name_or_path"' not in line).encode()).hexdigest()[:16]
    name = mcfg.name
    if name == "default":
        from mlpmem.assets import DEFAULT_MODEL_ID

        name = DEFAULT_MODEL_ID
    ident = {
        "name": name,
        "revision": mcfg.revision,
        "model_type": model.config.model_type,
        "config_hash": cfg_hash,
        "tokenizer_hash": tokenizer_hash(tok),
        "n_params": sum(p.numel() for p in model.parameters()),
        "hidden_size": model.config.get_text_config().hidden_size,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "weights": weights,
    }
    # content, not location: a moved model directory or a renamed copy is the same model (the weights digest,
    # the config and the tokenizer say what it computes)
    ident["fingerprint"] = fingerprint({k: v for k, v in ident.items() if k not in ("name", "revision")})
    return ident


def check_context(lm: LoadedLM, context: int) -> None:
    """Refuse windows longer than the model's positions (GPT-2 would fail deep inside its position embedding)."""
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and context > max_pos:
        raise ConfigError(f"--window.context {context} exceeds the {max_pos} positions of {lm.identity['name']}; "
                          f"use --window.context {max_pos} or less (and a --window.stride that fits)")


def load_lm(mcfg: ModelConfig) -> LoadedLM:
    """Load the base LM (frozen, eval mode) and its tokenizer onto the configured device and dtype."""
    from transformers import AutoModelForCausalLM

    src, kw = model_source(mcfg)
    device = resolve_device(mcfg.device)
    dtype = resolve_dtype(mcfg.dtype, str(device))
    tok = load_tokenizer(mcfg)
    try:
        with library_progress():  # transformers' "Loading weights" and download bars as mlpmem's own
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=DTYPES[dtype], trust_remote_code=mcfg.trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model.name {mcfg.name}: could not load the model ({str(e).splitlines()[0]}). "
                             "Pass an existing model directory, a .gguf file, or a hub id (needs network).") from None
    model.to(device).eval().requires_grad_(False)
    ident = model_identity(mcfg, model, tok, weights_digest(src, kw, model))
    log.info("loaded %s (%s, %.1fM params, %s on %s)", ident["name"], ident["model_type"],
             ident["n_params"] / 1e6, dtype, device)
    return LoadedLM(model=model, tokenizer=tok, identity=ident, device=device)
