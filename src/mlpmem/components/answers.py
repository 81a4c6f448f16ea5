"""Short answers under the base LM and its mixtures: the log-likelihood of a given answer, and greedy decoding.

Both encode a (prompt, target) pair as lm-eval does (the target's tokens are those the pair's joint encoding adds
after the prompt's, no special tokens), so `mlpmem qa` and its exported lm-eval tasks score the same tokens.

- :func:`answer_scores`: one forward per batch of prompt + target; at each target position log p(gold) of the LM,
  of the memory per temperature and of kNN-LM per temperature (a :class:`Scored`, as in eval), so every mixture's
  answer log-likelihood follows from :func:`mlpmem.components.tuning.system_logprobs`.
- :func:`greedy_continuations`: Hugging Face ``generate`` (greedy, KV cache, left padding) with a logits processor
  that replaces the LM's next-token distribution by the mixture, reading the memory's and kNN-LM's input from the
  hook point during the same forward.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mlpmem.components.capture import capture
from mlpmem.components.interpolate import memory_logprobs, mix3
from mlpmem.components.lm import LoadedLM
from mlpmem.components.scoring import KnnScorer, Scored, head_logprobs_at, memory_logprobs_at

log = logging.getLogger(__name__)


def encode_pairs(tokenizer, prompts: list[str], targets: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per pair: the target's ids are what encoding prompt + target adds to the prompt's."""
    out = []
    for p, t in zip(prompts, targets):
        ctx = tokenizer(p, add_special_tokens=False)["input_ids"]
        whole = tokenizer(p + t, add_special_tokens=False)["input_ids"]
        if not ctx or len(whole) <= len(ctx):
            raise ValueError(f"cannot score the target {t!r} after the prompt {p[-40:]!r}: it adds no tokens")
        out.append((ctx, whole[len(ctx):]))
    return out


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def answer_scores(lm: LoadedLM, pairs: list[tuple[list[int], list[int]]], batch_size: int, hook=None, memory=None,
                  mem_temperatures=(1.0,), knn_scorer: KnnScorer | None = None) -> tuple[Scored, np.ndarray]:
    """Gold log-probs at every target token of every pair, and (M,) the pair each scored position belongs to."""
    model, dev = lm.model, lm.device
    base = _decoder(model)
    lm_lp, mem_lp, knn_lp, owner = [], [], [], []
    secs = {"lm": 0.0, "memory": 0.0, "knn": 0.0}
    with torch.inference_mode():
        for s in range(0, len(pairs), batch_size):
            group = pairs[s:s + batch_size]
            seqs = [(c + a)[:-1] for c, a in group]
            width = max(len(x) for x in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, x in enumerate(seqs):  # right padding: positions (and so the keys) as in an unpadded forward
                ids[j, :len(x)] = torch.tensor(x)
                mask[j, :len(x)] = 1
            sb = np.concatenate([np.full(len(a), j) for j, (_, a) in enumerate(group)])
            st = np.concatenate([np.arange(len(c) - 1, len(c) + len(a) - 1) for c, a in group])
            gold = torch.from_numpy(np.concatenate([a for _, a in group]).astype(np.int64)).to(dev)
            owner.append(np.concatenate([np.full(len(a), s + j) for j, (_, a) in enumerate(group)]))
            t0 = time.perf_counter()
            with capture(model, hook) if hook is not None else contextlib.nullcontext() as cap:
                final = base(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            sb_t, st_t = torch.from_numpy(sb).to(dev), torch.from_numpy(st).to(dev)
            lm_lp.append(head_logprobs_at(model, final[sb_t, st_t], gold).double().cpu().numpy())
            t1 = time.perf_counter()
            secs["lm"] += t1 - t0
            if hook is not None:
                keys = cap.value[sb_t, st_t].float()
            if memory is not None:
                mem_lp.append(memory_logprobs_at(memory, keys, gold, mem_temperatures).double().cpu().numpy())
                secs["memory"] += time.perf_counter() - t1
            if knn_scorer is not None:
                t2 = time.perf_counter()
                knn_lp.append(knn_scorer(keys, gold))
                secs["knn"] += time.perf_counter() - t2
    sc = Scored(lm=np.concatenate(lm_lp), mem=np.concatenate(mem_lp, 1) if mem_lp else None,
                knn=np.concatenate(knn_lp, 1) if knn_lp else None, seconds=secs,
                mem_T=[float(t) for t in mem_temperatures] if memory is not None else None,
                knn_T=list(knn_scorer.temperatures) if knn_scorer is not None else None)
    return sc, np.concatenate(owner)


@dataclass
class Mixture:
    """A system's next-token distribution, log((1 - lam_mem - lam_knn) p_LM + lam_mem p_mem + lam_knn p_kNN)."""

    lam_mem: float = 0.0
    lam_knn: float = 0.0
    memory: torch.nn.Module | None = None
    mem_temperature: float = 1.0
    knn: Callable[[torch.Tensor], torch.Tensor] | None = None  # (B, d) hidden -> (B, V) log p_kNN

    @property
    def is_base(self) -> bool:
        return self.lam_mem == 0.0 and self.lam_knn == 0.0


class _MixProcessor:
    """A transformers logits processor: the LM's next-token logits in, the mixture's log-probs out (greedy
    decoding then takes the mixture's most likely token). The hidden state comes from ``cap``, the capture of
    the hook point in the forward that made these logits."""

    def __init__(self, mix: Mixture, cap) -> None:
        self.mix, self.cap = mix, cap

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        m = self.mix
        h = self.cap.value[:, -1].float()
        lm_lp = torch.log_softmax(scores.float(), -1)
        mem_lp = knn_lp = None
        if m.lam_mem > 0:
            param = next(m.memory.parameters())
            mem_lp = memory_logprobs(m.memory(h.to(param.dtype)), m.mem_temperature).to(lm_lp.device)
        if m.lam_knn > 0:
            knn_lp = m.knn(h).to(lm_lp.device)
        return mix3(lm_lp, mem_lp, knn_lp, m.lam_mem, m.lam_knn)


def greedy_continuations(lm: LoadedLM, prompts: list[str], max_new_tokens: int, batch_size: int,
                         mix: Mixture | None = None, hook=None, desc: str = "qa") -> list[str]:
    """Greedy continuations of the prompts (no special tokens added; left-padded batches) under the base LM or,
    with ``mix`` and ``hook``, under the mixture; the continuations only, decoded."""
    from transformers import LogitsProcessorList

    from mlpmem.runtime import progress

    tok = lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # as lm-eval and the generate stage do
    pad = tok.pad_token_id
    old_side = tok.padding_side
    tok.padding_side = "left"
    bar = progress(total=len(prompts), desc=desc, unit="item")
    out: list[str] = []
    t0 = time.perf_counter()
    try:
        for s in range(0, len(prompts), batch_size):
            enc = tok(prompts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                      temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                if mix is None or mix.is_base:
                    gen = lm.model.generate(**enc.to(lm.device), **kw)
                else:
                    with capture(lm.model, hook) as cap:
                        gen = lm.model.generate(**enc.to(lm.device), logits_processor=LogitsProcessorList(
                            [_MixProcessor(mix, cap)]), **kw)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            bar.update(len(enc["input_ids"]))
            bar.set_postfix(items_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.1f}")
    finally:
        tok.padding_side = old_side
        bar.close()
    return out
