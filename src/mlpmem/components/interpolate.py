"""Mixing distributions in log space: p = (1 - lam) p_LM + lam p_mem (and the three-way mix with kNN-LM).

Everything stays in log space (torch.logaddexp / numpy.logaddexp) so tiny probabilities and -inf (a token a
distribution rules out) survive without underflow or NaN. lam = 0 and lam = 1 return an input unchanged, so the
base LM (and the memory alone) are reproduced bit for bit. The joint LM that applies this inside a Hugging Face
model lives in joint.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _check_lam(lam: float, name: str = "lam") -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {lam}")


def mix_logprobs(lm_logprobs: torch.Tensor, mem_logprobs: torch.Tensor, lam: float) -> torch.Tensor:
    """log((1 - lam) p_LM + lam p_mem) elementwise; inputs are log-probabilities (..., V) of the same shape.

    lam = 0 returns lm_logprobs itself, lam = 1 mem_logprobs itself (exact). Computed in the inputs' promoted dtype.
    """
    _check_lam(lam)
    if lam == 0.0:
        return lm_logprobs
    if lam == 1.0:
        return mem_logprobs
    # log1p(-lam) is accurate for small lam; -inf + finite stays -inf and logaddexp(-inf, -inf) = -inf.
    return torch.logaddexp(lm_logprobs + math.log1p(-lam), mem_logprobs + math.log(lam))


def mix_logprobs_per_token(lm_logprobs: torch.Tensor, mem_logprobs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) p_LM + lam p_mem) with one lam per position: log-probs (..., V), lam (...) in [0, 1] (e.g. from
    an adaptive gate, float64). The log weights are computed in lam's dtype and cast to the log-probs' dtype."""
    if torch.any((lam < 0) | (lam > 1)):
        raise ValueError("every lam must be in [0, 1]")
    dtype = torch.promote_types(lm_logprobs.dtype, mem_logprobs.dtype)
    log_1m = torch.log1p(-lam)[..., None].to(dtype)
    log_lam = torch.log(lam)[..., None].to(dtype)
    return torch.logaddexp(lm_logprobs + log_1m, mem_logprobs + log_lam)


def memory_logprobs(mem_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(z_mem / T) in float32 (or float64 if given): the memory's next-token log-probabilities."""
    if temperature <= 0:
        raise ValueError(f"memory temperature must be > 0, got {temperature}")
    z = mem_logits if mem_logits.dtype == torch.float64 else mem_logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def mix_gold(lm_lp_gold: np.ndarray, other_lp_gold: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
    """Gold-token log-probs of the mixture, float64, for lambda sweeps: log((1-lam) e^lm + lam e^other).

    lm_lp_gold, other_lp_gold: (N,) log-probabilities of the gold tokens under the LM and the memory (or kNN).
    lam: a scalar, or an array broadcasting against them (e.g. lams[:, None] for a (L, N) sweep at once).
    A scalar lam of 0 or 1 returns the corresponding input (as float64) exactly.
    """
    lm = np.asarray(lm_lp_gold, dtype=np.float64)
    other = np.asarray(other_lp_gold, dtype=np.float64)
    lam_arr = np.asarray(lam, dtype=np.float64)
    if np.any((lam_arr < 0) | (lam_arr > 1)):
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if lam_arr.ndim == 0 and lam_arr == 0.0:
        return np.broadcast_to(lm, np.broadcast_shapes(lm.shape, other.shape)).copy()
    if lam_arr.ndim == 0 and lam_arr == 1.0:
        return np.broadcast_to(other, np.broadcast_shapes(lm.shape, other.shape)).copy()
    with np.errstate(divide="ignore"):  # log(0) = -inf is what we want at the ends of a sweep
        return np.logaddexp(lm + np.log1p(-lam_arr), other + np.log(lam_arr))


def mix3(lm, mem, knn, lam_mem: float, lam_knn: float):
    """log(lam_knn p_kNN + lam_mem p_mem + (1 - lam_mem - lam_knn) p_LM), all inputs log-probabilities.

    Works on torch tensors or numpy arrays (same shapes). Terms with weight 0 are skipped, so lam_knn = 0 gives
    exactly mix_logprobs(lm, mem, lam_mem) and both weights 0 give lm unchanged.
    """
    _check_lam(lam_mem, "lam_mem")
    _check_lam(lam_knn, "lam_knn")
    lam_lm = 1.0 - lam_mem - lam_knn
    if lam_lm < -1e-12:
        raise ValueError(f"lam_mem + lam_knn must be <= 1, got {lam_mem} + {lam_knn}")
    lam_lm = max(lam_lm, 0.0)
    logaddexp = torch.logaddexp if isinstance(lm, torch.Tensor) else np.logaddexp
    terms = [(x, w) for x, w in ((lm, lam_lm), (mem, lam_mem), (knn, lam_knn)) if w > 0.0]
    out = None
    for x, w in terms:
        term = x if w == 1.0 else x + math.log(w)
        out = term if out is None else logaddexp(out, term)
    return out


def perplexity(gold_logprobs: np.ndarray) -> float:
    """Token-level perplexity exp(mean NLL) from per-token gold log-probs (any shape); inf if it overflows, nan
    when no token was scored."""
    lp = np.asarray(gold_logprobs, dtype=np.float64)
    if lp.size == 0:
        return math.nan
    with np.errstate(over="ignore"):
        return float(np.exp(-lp.mean()))
