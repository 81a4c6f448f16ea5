"""An adaptive gate: the memory's weight λ set per token from cheap features of the two distributions.

A fixed λ tuned on validation mixes the memory in equally everywhere, also where it knows nothing (text unlike
its training corpus). The gate reads, at each position, six numbers that need no gold token (so generation has
them too) and sets

    lam(f) = lam_max * sigmoid(c + b + w . (f - mu) / sd),   c = logit(lam0 / lam_max),

where lam0 is the tuned fixed λ, mu and sd standardise the features on the fitting tokens, and (w, b) start at 0:
the gate starts as the fixed λ exactly (lam(f) = lam0 when the affine part is 0, by construction; a tuned λ within
LAM_EDGE of 0 or of lam_max, where the logit would be (near) infinite, starts from the nearest value inside). (w, b)
are fitted by L-BFGS in float64 on half of the validation documents, minimising the mixture's mean NLL plus
L2_W * |w|^2, and kept only if they beat the fixed λ on the other half (else the fixed λ is used: :func:`fit_gate`
says which).
lam_max (LAM_MAX, or 1 when the tuned λ is at or above it) keeps at least 1 - lam_max of the LM in every token, so a
token can never lose more than -log(1 - lam_max) nats against the base LM.

Features (FEATURES, in this order; all in float32 from the log-probabilities of the whole vocabulary):
    lm_entropy, lm_maxprob          entropy (nats) and top probability of p_LM
    mem_entropy, mem_maxprob        the same for p_mem at the memory's inference temperature
    argmax_agree                    1.0 when both distributions have the same top token, else 0.0
    mem_minus_lm_at_lm_argmax       log p_mem(a) - log p_LM(a) at the LM's top token a, clipped to +-GAP_CLIP
Scoring (components/scoring.py) computes them in the chunks it already holds and keeps the LM's two separately
from the memory's four (which depend on the memory temperature); the joint LM (components/joint.py) computes them
with :func:`features` at every step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from mlpmem.components.interpolate import mix_gold

FEATURES = ("lm_entropy", "lm_maxprob", "mem_entropy", "mem_maxprob", "argmax_agree", "mem_minus_lm_at_lm_argmax")
N_LM_FEATURES = 2     # the first two depend on the LM alone
GAP_CLIP = 30.0       # nats; a memory that rules the LM's top token out gives -inf there
LAM_MAX = 0.9         # the gate's ceiling (unless the tuned λ is above it)
L2_W = 1e-3           # on the weights of the standardised features, per token-averaged NLL
MAX_ITER = 300        # L-BFGS iterations
MIN_SD = 1e-6         # a constant feature (sd 0) is standardised to 0 instead of inf
LAM_EDGE = 0.01       # the gate starts from the tuned λ moved at least this far inside (0, lam_max)


# ------------------------------------------------------------------------------------------------ features

def _entropy(lp: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last axis; a token with p = 0 (log p = -inf) adds 0, not nan."""
    return -(lp.exp() * lp.clamp_min(torch.finfo(lp.dtype).min)).sum(-1)


def lm_features(lm_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the LM's log-probabilities (..., V): (its 2 features (..., 2) float32, its top token (...) int64,
    log p_LM of that token (...)); the last two feed :func:`mem_features`."""
    lp = lm_lp.float()
    top_lp, top = lp.max(-1)
    return torch.stack([_entropy(lp), top_lp.exp()], -1), top, top_lp


def mem_features(mem_lp: torch.Tensor, lm_top: torch.Tensor, lm_top_lp: torch.Tensor) -> torch.Tensor:
    """The memory's 4 features (..., 4) float32 from its log-probabilities (..., V) at its temperature and the LM's
    top token and its log-prob (from :func:`lm_features`)."""
    lp = mem_lp.float()
    top_lp, top = lp.max(-1)
    gap = (lp.gather(-1, lm_top[..., None])[..., 0] - lm_top_lp).clamp(-GAP_CLIP, GAP_CLIP)
    return torch.stack([_entropy(lp), top_lp.exp(), (top == lm_top).float(), gap], -1)


def features(lm_lp: torch.Tensor, mem_lp: torch.Tensor) -> torch.Tensor:
    """All FEATURES (..., 6) float32 from both distributions' log-probabilities (..., V)."""
    f_lm, top, top_lp = lm_features(lm_lp)
    return torch.cat([f_lm, mem_features(mem_lp, top, top_lp)], -1)


# ------------------------------------------------------------------------------------------------ the gate

def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclass(frozen=True)
class Gate:
    """lam(f) = lam_max * sigmoid(logit(lam0 / lam_max) + b + w . (f - mu) / sd), fitted at memory temperature
    T_mem; lam0 is the λ it started from (the tuned one, see LAM_EDGE). Plain floats, so it saves as JSON
    (:meth:`to_dict` / :meth:`from_dict`)."""

    lam0: float
    lam_max: float
    T_mem: float
    w: tuple[float, ...]
    b: float
    mu: tuple[float, ...]
    sd: tuple[float, ...]
    features: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        if tuple(self.features) != FEATURES:
            raise ValueError(f"gate features {list(self.features)} are not this version's {list(FEATURES)}: "
                             "rerun `mlpmem eval` to fit the gate again")
        if not all(len(v) == len(FEATURES) for v in (self.w, self.mu, self.sd)):
            raise ValueError(f"gate w, mu and sd need {len(FEATURES)} values each")
        if not 0.0 < self.lam0 < self.lam_max <= 1.0:
            raise ValueError(f"gate needs 0 < lam0 < lam_max <= 1, got lam0={self.lam0}, lam_max={self.lam_max}")
        if not (self.T_mem > 0 and all(s > 0 for s in self.sd)):
            raise ValueError("gate T_mem and sd must be > 0")
        if not all(math.isfinite(x) for x in (*self.w, self.b, *self.mu, *self.sd)):
            raise ValueError("gate parameters must be finite")

    @staticmethod
    def start(lam0: float, T_mem: float, mu, sd, lam_max: float | None = None) -> "Gate":
        """The gate at the fixed λ (w = 0, b = 0)."""
        lam_max = lam_max if lam_max is not None else (LAM_MAX if lam0 < LAM_MAX else 1.0)
        return Gate(float(lam0), float(lam_max), float(T_mem), (0.0,) * len(FEATURES), 0.0,
                    tuple(float(x) for x in mu), tuple(float(max(x, MIN_SD)) for x in sd))

    def logit(self, f: torch.Tensor) -> torch.Tensor:
        """The gate's affine part b + w . (f - mu) / sd, (...) float64 for features (..., 6)."""
        f = f.to(torch.float64)
        mu, sd, w = (torch.tensor(v, dtype=torch.float64, device=f.device) for v in (self.mu, self.sd, self.w))
        return ((f - mu) / sd) @ w + self.b

    def lam(self, feats):
        """Per-token λ (...) float64 for features (..., 6): a torch tensor for a tensor, else a numpy array. Where
        the affine part is 0 (w = 0 and b = 0 everywhere) it is lam0 exactly, so the gate at its start reproduces
        the fixed-λ mixture bit for bit."""
        is_np = not isinstance(feats, torch.Tensor)
        f = torch.tensor(np.asarray(feats)) if is_np else feats  # a copy: saved scores may be read-only
        z = self.logit(f)
        lam = self.lam_max * torch.sigmoid(_logit(self.lam0 / self.lam_max) + z)
        lam = torch.where(z == 0, torch.full_like(lam, self.lam0), lam).clamp(0.0, self.lam_max)
        return lam.numpy() if is_np else lam

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @staticmethod
    def from_dict(d: dict) -> "Gate":
        names = {f.name for f in dataclasses.fields(Gate)}
        if not isinstance(d, dict) or not names - {"features"} <= set(d):
            raise ValueError(f"not a gate: expected the keys {sorted(names)}")
        return Gate(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def gated_gold(lm_lp_gold: np.ndarray, mem_lp_gold: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Gold log-probs (M,) float64 of the mixture with a per-token λ (M,): log((1 - lam) p_LM + lam p_mem)."""
    return mix_gold(lm_lp_gold, mem_lp_gold, np.asarray(lam, dtype=np.float64))


# ------------------------------------------------------------------------------------------------ fitting

def split_documents(doc_ids: np.ndarray, seed: int) -> np.ndarray:
    """(M,) bool: the positions whose document falls in the fitting half (a seeded shuffle of the documents, the
    larger half when odd); the others are the check half."""
    docs = np.unique(doc_ids)
    fit_docs = np.random.default_rng(seed).permutation(docs)[:(len(docs) + 1) // 2]
    return np.isin(doc_ids, fit_docs)


def _mix_nll(theta: torch.Tensor, X: torch.Tensor, lm: torch.Tensor, mem: torch.Tensor, c: float,
             lam_max: float) -> torch.Tensor:
    """Mean NLL of the gated mixture at parameters theta = (w, b), in float64 and in log space throughout."""
    u = c + X @ theta[:-1] + theta[-1]
    log_lam = math.log(lam_max) + torch.nn.functional.logsigmoid(u)
    log_1m = torch.nn.functional.logsigmoid(-u) if lam_max == 1.0 else torch.log1p(-lam_max * torch.sigmoid(u))
    return -torch.logaddexp(lm + log_1m, mem + log_lam).mean()


def _nll(lm: np.ndarray, mem: np.ndarray, lam) -> float:
    return float(-gated_gold(lm, mem, np.broadcast_to(np.asarray(lam, dtype=np.float64), lm.shape)).mean()) \
        if lm.size else math.nan


def fit_gate(lm: np.ndarray, mem: np.ndarray, feats: np.ndarray, doc_ids: np.ndarray, lam0: float, T_mem: float,
             seed: int = 0, l2: float = L2_W, max_iter: int = MAX_ITER) -> tuple[Gate | None, dict]:
    """Fit the gate on validation positions and decide whether to use it.

    lm, mem: (M,) gold log-probs of the LM and of the memory at T_mem; feats: (M, 6) FEATURES at T_mem; doc_ids:
    (M,) document of each position; lam0: the tuned fixed λ the gate starts from. Returns (the gate, or None when
    the fixed λ is kept, and a report: "used", "reason", the fitted parameters, and the mean NLL of the fixed λ
    and of the gate on the fitting half and on the check half; "change" is the gate's perplexity change).
    """
    if not 0.0 <= lam0 <= 1.0:
        raise ValueError(f"fit_gate: lam0 must be in [0, 1], got {lam0}")
    lm, mem = np.asarray(lm, np.float64), np.asarray(mem, np.float64)
    feats = np.asarray(feats, np.float64)
    if feats.shape != (lm.shape[0], len(FEATURES)) or mem.shape != lm.shape or np.shape(doc_ids) != lm.shape:
        raise ValueError(f"fit_gate: lm and mem (M,), feats (M, {len(FEATURES)}) and doc_ids (M,) must agree, got "
                         f"{lm.shape}, {mem.shape}, {feats.shape}, {np.shape(doc_ids)}")
    lam_max = LAM_MAX if lam0 < LAM_MAX else 1.0
    start = min(max(float(lam0), LAM_EDGE), lam_max * (1 - LAM_EDGE))
    report = {"used": False, "lam0": float(lam0), "lam_start": start, "T_mem": float(T_mem), "l2": l2,
              "max_iter": max_iter, "features": list(FEATURES), "gate": None}
    fit = split_documents(doc_ids, seed)
    ok = np.isfinite(mix_gold(lm, mem, lam0)) & np.all(np.isfinite(feats), axis=1)
    a, b = fit & ok, ~fit & ok
    report.update(fit_tokens=int(a.sum()), check_tokens=int(b.sum()), fit_documents=int(len(np.unique(doc_ids[fit]))),
                  check_documents=int(len(np.unique(doc_ids[~fit]))))
    if not a.any() or not b.any():
        return None, {**report, "reason": "fixed λ: fewer than 2 documents to fit on and check on"}
    mu, sd = feats[a].mean(0), feats[a].std(0)
    gate0 = Gate.start(start, T_mem, mu, sd, lam_max)
    X = torch.from_numpy((feats[a] - gate0.mu) / np.asarray(gate0.sd))
    t_lm, t_mem = torch.from_numpy(lm[a]), torch.from_numpy(mem[a])
    c = _logit(gate0.lam0 / gate0.lam_max)
    theta = torch.zeros(len(FEATURES) + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _mix_nll(theta, X, t_lm, t_mem, c, gate0.lam_max) + l2 * theta[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = theta.detach().numpy()
    report["iterations"] = int(opt.state[theta].get("n_iter", 0))
    if not np.all(np.isfinite(w)):
        return None, {**report, "reason": "fixed λ: the fit diverged (non-finite parameters)"}
    gate = dataclasses.replace(gate0, w=tuple(float(x) for x in w[:-1]), b=float(w[-1]))
    report["gate"] = gate.to_dict()
    for name, m in (("fit", a), ("check", b)):
        report[name] = {"fixed_nll": _nll(lm[m], mem[m], lam0), "gate_nll": _nll(lm[m], mem[m], gate.lam(feats[m]))}
        report[name]["change"] = math.exp(report[name]["gate_nll"] - report[name]["fixed_nll"]) - 1  # in PPL
    used = report["check"]["gate_nll"] < report["check"]["fixed_nll"]
    report["used"] = used
    report["reason"] = ("per-token λ: the gate beats the fixed λ on the held-out half of validation documents"
                        if used else "fixed λ: the gate does not beat it on the held-out half of validation documents")
    return (gate if used else None), report
