"""Token-level sliding-window scoring of the base LM, the memory and kNN-LM in one pass (the `eval` stage's core).

One forward pass of the base LM per window serves every system: for each scored position we keep only
log p(gold) of each system (the LM, the memory at its temperature, the kNN distribution at each swept
temperature). Perplexity of any mixture then follows exactly from those numbers, since

    log p_mix(gold) = logaddexp(log(1 - lam) + log p_LM(gold), log lam + log p_other(gold)),

so the lambda / temperature sweeps (:mod:`mlpmem.components.tuning`) cost nothing extra and no (N, V) array is
ever kept. With ``gate_features`` it also keeps the adaptive gate's six features per position (computed from the
full distributions while they are at hand, never from the gold token; :mod:`mlpmem.components.gate`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mlpmem.errors import ConfigError
from mlpmem.components.data import batch_windows, plan_windows, shard_windows
from mlpmem.components.gate import FEATURES, N_LM_FEATURES, lm_features, mem_features
from mlpmem.components.lm import LoadedLM

log = logging.getLogger(__name__)

# (hidden (M, d) float32, gold (M,) int64) -> log p(gold) of shape (n_temperatures, M), float64
KnnScorer = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


@dataclass
class Scored:
    """Per-position log-probabilities of the gold token, for one split (M scored positions)."""

    lm: np.ndarray                       # (M,) float64, base LM
    mem: np.ndarray | None = None        # (n_Tm, M) float64, memory alone per inference temperature
    knn: np.ndarray | None = None        # (n_T, M) float64, kNN distribution per temperature
    seconds: dict = field(default_factory=dict)  # time spent per component: lm, memory, knn
    mem_T: list[float] | None = None     # the memory's temperatures, one per row of ``mem``
    knn_T: list[float] | None = None     # the kNN temperatures, one per row of ``knn``
    lm_feats: np.ndarray | None = None   # (M, 2) float32, the gate's LM features (gate.FEATURES[:2])
    mem_feats: np.ndarray | None = None  # (n_Tm, M, 4) float32, the gate's memory features per temperature

    @property
    def n(self) -> int:
        return int(self.lm.shape[0])

    def gate_features(self, T_mem: float) -> np.ndarray:
        """(M, 6) float32: the adaptive gate's features with the memory at temperature ``T_mem``."""
        if self.lm_feats is None or self.mem_feats is None or self.mem_T is None:
            raise ValueError("these scores hold no gate features: score with gate_features=True (system "
                             "memory+gate in --eval.systems)")
        return np.concatenate([self.lm_feats, self.mem_feats[list(self.mem_T).index(T_mem)]], axis=1)

    @staticmethod
    def join(parts: list["Scored"]) -> "Scored":
        """Concatenate the scores of consecutive shards of one split (in shard order); seconds add up."""
        nonempty = [p for p in parts if p.n] or parts[:1]  # a shard with no windows has no memory/kNN arrays

        def cat(name, axis=0):
            arrs = [getattr(p, name) for p in nonempty]
            return None if any(a is None for a in arrs) else np.concatenate(arrs, axis=axis)

        secs: dict = {}
        for p in parts:
            for k, v in p.seconds.items():
                secs[k] = secs.get(k, 0.0) + v
        return Scored(lm=cat("lm"), mem=cat("mem", axis=1), knn=cat("knn", axis=1), seconds=secs,
                      mem_T=nonempty[0].mem_T, knn_T=nonempty[0].knn_T, lm_feats=cat("lm_feats"),
                      mem_feats=cat("mem_feats", axis=1))


GOLD_ROWS, GOLD_SUB = 256, 32  # gold_logprobs' CPU chunks (scripts/profile_eval.py times other values)
GOLD_ROWS_CUDA = 2048  # on GPUs small chunks would only add kernel launches: head and log-softmax on 2048 rows


def gold_logprobs(head, hidden: torch.Tensor, gold: torch.Tensor, transform=None, rows: int | None = None,
                  sub: int | None = None, transforms: list | None = None, on_logprobs=None) -> torch.Tensor:
    """log softmax(transform(head(hidden)))[gold] for (M, d) hidden states: (M,) float32, no (M, V) tensor kept.
    With ``transforms`` (a list, e.g. one temperature each): (len(transforms), M), the head run once.
    ``on_logprobs(t, i, logprobs)``, if given, also receives each chunk's full log-softmax (m, V) float32 of
    transform t for rows i..i+m (for statistics of the whole distribution, e.g. the gate's features).

    The head runs on ``rows`` rows at a time (large enough for an efficient matmul) and the float32
    log-softmax on ``sub`` rows at a time: small buffers the allocator reuses and the cache holds. On CPUs this
    is several times faster than one log_softmax over (M, V), whose fresh multi-GB temporaries cost more in page
    faults than in arithmetic (measured in docs/bench.md). ``transform`` maps float32 logits (e.g. a temperature
    or a soft cap). On CUDA both default to GOLD_ROWS_CUDA.
    """
    cuda = hidden.device.type == "cuda"
    rows, sub = rows or (GOLD_ROWS_CUDA if cuda else GOLD_ROWS), sub or (GOLD_ROWS_CUDA if cuda else GOLD_SUB)
    fns = transforms if transforms is not None else [transform]
    out = torch.empty((len(fns), hidden.shape[0]), dtype=torch.float32, device=hidden.device)
    for i in range(0, hidden.shape[0], rows):
        z = head(hidden[i:i + rows])
        for j in range(0, z.shape[0], sub):
            z32 = z[j:j + sub].float()
            g = gold[i + j:i + j + z32.shape[0], None]
            for t, fn in enumerate(fns):
                zs = z32 if fn is None else fn(z32)
                out[t, i + j:i + j + zs.shape[0]] = zs.gather(-1, g)[:, 0] - torch.logsumexp(zs, -1)
                if on_logprobs is not None:
                    on_logprobs(t, i + j, torch.log_softmax(zs, -1))
    return out if transforms is not None else out[0]


def head_logprobs_at(model, final_hidden: torch.Tensor, gold: torch.Tensor, on_logprobs=None) -> torch.Tensor:
    """log softmax(LM head(h))[gold] for (M, d) final hidden states (the model's logit soft cap applied)."""
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    transform = (lambda z: torch.tanh(z / cap) * cap) if cap else None
    return gold_logprobs(model.get_output_embeddings(), final_hidden, gold, transform, on_logprobs=on_logprobs)


def memory_logprobs_at(memory, keys: torch.Tensor, gold: torch.Tensor, temperatures=(1.0,),
                       on_logprobs=None) -> torch.Tensor:
    """log softmax(memory(keys) / T)[gold] per temperature, (n_T, M) float32, computed like head_logprobs_at. An
    MLPMemory runs its blocks once and its head in chunks (once for all temperatures); any other module mapping
    keys to logits is applied in chunks whole."""
    fns = [None if T == 1.0 else (lambda z, T=T: z / T) for T in temperatures]
    keys = keys.to(next(memory.parameters()).dtype)
    if hasattr(memory, "features") and hasattr(memory, "head"):
        return gold_logprobs(memory.head, memory.features(keys), gold, transforms=fns, on_logprobs=on_logprobs)
    return gold_logprobs(memory, keys, gold, transforms=fns, on_logprobs=on_logprobs)


def _gate_feature_sinks(n_pos: int, n_temps: int, dev):
    """Buffers for the gate's features of one batch and the two callbacks that fill them from gold_logprobs'
    chunks: the LM's first (its top token is an input of the memory's features), then the memory's."""
    f_lm = torch.empty((n_pos, N_LM_FEATURES), dtype=torch.float32, device=dev)
    f_mem = torch.empty((n_temps, n_pos, len(FEATURES) - N_LM_FEATURES), dtype=torch.float32, device=dev)
    top = torch.empty(n_pos, dtype=torch.int64, device=dev)
    top_lp = torch.empty(n_pos, dtype=torch.float32, device=dev)

    def on_lm(t, i, lp):
        m = lp.shape[0]
        f_lm[i:i + m], top[i:i + m], top_lp[i:i + m] = lm_features(lp)

    def on_mem(t, i, lp):
        m = lp.shape[0]
        f_mem[t, i:i + m] = mem_features(lp, top[i:i + m], top_lp[i:i + m])

    return f_lm, f_mem, on_lm, on_mem


def _check_model(model, base, tokens: np.ndarray, longest: int, dev) -> None:
    """Refuse windows longer than the model's positions, and models whose logits are not head(final hidden)."""
    text_cfg = model.config.get_text_config()
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    if max_pos is not None and longest > max_pos:
        raise ConfigError(f"--window.context: windows of {longest} tokens exceed the {max_pos} positions of this "
                         f"{model.config.model_type} model; lower --window.context (and --window.stride)")
    # We score through the decoder + output head only (no (B, T, V) logits). Check on a few tokens that this is
    # what the model's own forward computes: some families scale their logits in forward (e.g. Granite, Cohere).
    probe = torch.from_numpy(tokens[:min(len(tokens), 9)].astype(np.int64))[None].to(dev)
    ref = model(input_ids=probe[:, :-1]).logits[0].float().log_softmax(-1).gather(-1, probe[0, 1:, None])[:, 0]
    got = head_logprobs_at(model, base(input_ids=probe[:, :-1]).last_hidden_state[0], probe[0, 1:])
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(got.float(), ref, atol=tol, rtol=0):
        raise ValueError(f"{model.config.model_type}: the model's logits are not its output head applied to the "
                         f"decoder's last hidden state (max |diff| of log-probs "
                         f"{(got.float() - ref).abs().max().item():.3g}); this evaluator does not support it")


def score_tokens(lm: LoadedLM, tokens: np.ndarray, context: int, stride: int, batch_size: int,
                 hook=None, memory=None, mem_temperatures=(1.0,), knn_scorer: KnnScorer | None = None,
                 desc: str = "eval", shard: tuple[int, int] = (0, 1), gate_features: bool = False) -> Scored:
    """Score every position of a token stream once with sliding windows; return per-position gold log-probs.

    ``hook`` (a capture.HookPoint) is needed when a memory or kNN scorer is given: it is where their input
    hidden state (the datastore key) is read, in the same forward pass as the LM's own prediction.
    ``shard`` = (i, n) scores only the i-th of n contiguous groups of windows (data.shard_windows), so n
    processes can share a split; concatenating the n results in order gives the unsharded result.
    ``gate_features`` (with a memory) also keeps the adaptive gate's features of every position: Scored.lm_feats
    and, per memory temperature, Scored.mem_feats.
    """
    from mlpmem.components.capture import capture
    from mlpmem.runtime import progress

    model, dev = lm.model, lm.device
    windows = plan_windows(len(tokens), context, stride)
    check_on = max((w.end - w.begin for w in windows), default=0)
    if shard != (0, 1):
        windows = shard_windows(windows, shard[1])[shard[0]]
    need_hidden = memory is not None or knn_scorer is not None
    lm_lp, mem_lp, knn_lp, lm_f, mem_f = [], [], [], [], []
    gate_features = gate_features and memory is not None
    secs = {"lm": 0.0, "memory": 0.0, "knn": 0.0}
    n_pos = sum(w.end - w.score_from for w in windows)
    bar = progress(total=n_pos, desc=desc, unit="tok")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    with torch.inference_mode():
        if check_on:
            _check_model(model, base, tokens, check_on, dev)
        for ids, mask, group in batch_windows(tokens, windows, batch_size):
            t0 = time.perf_counter()
            ids, mask = ids.to(dev), mask.to(dev)
            # select the scored positions: (window j, offset i) with label = the next token
            sel_b, sel_t = [], []
            for j, w in enumerate(group):
                r = np.arange(w.score_from - w.begin, w.end - w.begin)
                sel_b.append(np.full(len(r), j))
                sel_t.append(r)
            sb = torch.from_numpy(np.concatenate(sel_b)).to(dev)
            st = torch.from_numpy(np.concatenate(sel_t)).to(dev)
            gold_np = np.concatenate([tokens[w.score_from + 1:w.end + 1] for w in group]).astype(np.int64)
            gold = torch.from_numpy(gold_np).to(dev)
            if need_hidden:
                with capture(model, hook) as cap:
                    final = base(input_ids=ids, attention_mask=mask).last_hidden_state
                keys = cap.value[sb, st].float()
            else:
                final = base(input_ids=ids, attention_mask=mask).last_hidden_state
            on_lm = on_mem = None
            if gate_features:
                f_lm, f_mem, on_lm, on_mem = _gate_feature_sinks(len(gold_np), len(mem_temperatures), dev)
            lm_lp.append(head_logprobs_at(model, final[sb, st], gold, on_lm).double().cpu().numpy())
            t1 = time.perf_counter()
            secs["lm"] += t1 - t0
            if memory is not None:
                mem_lp.append(memory_logprobs_at(memory, keys, gold, mem_temperatures, on_mem).double().cpu().numpy())
                if gate_features:
                    lm_f.append(f_lm.cpu().numpy())
                    mem_f.append(f_mem.cpu().numpy())
                t2 = time.perf_counter()
                secs["memory"] += t2 - t1
                t1 = t2
            if knn_scorer is not None:
                knn_lp.append(knn_scorer(keys, gold))
                secs["knn"] += time.perf_counter() - t1
            bar.update(len(gold_np))
            bar.set_postfix(tok_s=f"{bar.n / max(sum(secs.values()), 1e-9):.0f}")
    bar.close()
    return Scored(lm=np.concatenate(lm_lp) if lm_lp else np.zeros(0),
                  mem=np.concatenate(mem_lp, axis=1) if mem_lp else None,
                  knn=np.concatenate(knn_lp, axis=1) if knn_lp else None, seconds=secs,
                  mem_T=[float(t) for t in mem_temperatures] if memory is not None else None,
                  knn_T=list(getattr(knn_scorer, "temperatures", None) or []) or None,
                  lm_feats=(np.concatenate(lm_f) if lm_f else np.zeros((0, N_LM_FEATURES), np.float32))
                  if gate_features else None,
                  mem_feats=(np.concatenate(mem_f, axis=1) if mem_f else
                             np.zeros((len(mem_temperatures), 0, len(FEATURES) - N_LM_FEATURES), np.float32))
                  if gate_features else None)
