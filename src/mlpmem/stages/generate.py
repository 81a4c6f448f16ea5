"""Stage `generate`: continuations of the base LM with and without the memory, through HF's own `generate`."""

from __future__ import annotations

import logging

import torch

from mlpmem.artifacts import base_model, load_memory, tuned_settings
from mlpmem.components.capture import resolve_hook
from mlpmem.components.joint import attach_memory
from mlpmem.components.lm import LoadedLM, load_lm
from mlpmem.config import Config

log = logging.getLogger(__name__)


def generate_texts(lm: LoadedLM, prompts: list[str], cfg: Config) -> list[str]:
    """Batched, left-padded generation with the model's own `generate`; returns the continuations only."""
    tok, g = lm.tokenizer, cfg.generate
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
    kw = dict(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, num_beams=g.num_beams,
              pad_token_id=tok.pad_token_id)
    if g.do_sample:
        kw["temperature"] = g.temperature
    with torch.inference_mode():
        out = lm.model.generate(**enc, **kw)
    return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def run(cfg: Config) -> dict:
    lm = load_lm(base_model(cfg)[0])
    memory, _ = load_memory(cfg.run_dir, lm, resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer),
                            required=True)
    # --generate.lam, else what `mlpmem eval` tuned for this very memory, else an error (artifacts.tuned_settings)
    tuned = tuned_settings(cfg.run_dir, cfg.eval.out_name, cfg.generate.lam, flag="--generate.lam",
                           mem_T=cfg.memory.temperature)
    lam = tuned.lam
    gate = tuned.gate if cfg.generate.lam is None else None  # eval's per-token gate, unless a fixed λ is asked for
    log.info("generate: memory lambda %s (%s), temperature %g", "per token (gate)" if gate else f"{lam:g}",
             tuned.source, tuned.mem_T)
    torch.manual_seed(cfg.seed)
    base = generate_texts(lm, cfg.generate.prompts, cfg) if cfg.generate.side_by_side else None
    handle = attach_memory(lm.model, memory, lam=lam, mem_temperature=tuned.mem_T, gate=gate)
    try:
        torch.manual_seed(cfg.seed)
        joint = generate_texts(lm, cfg.generate.prompts, cfg)
    finally:
        handle.detach()
    rows = []
    for i, p in enumerate(cfg.generate.prompts):
        print(f"\n### {p}")
        if base is not None:
            print(f"[base]            {base[i].strip()}")
        print(f"[+memory λ={'gate' if gate else f'{lam:g}'}] {joint[i].strip()}")
        rows.append({"prompt": p, "base": base[i] if base else None, "memory": joint[i], "lam": lam})
    return {"generations": rows}
