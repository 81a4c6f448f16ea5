"""The memory's training loss: alpha * KL(p_knn || softmax(z)) + (1 - alpha) * CE(z, gold), per position.

kNN targets are sparse (at most k distinct ids per position, padded with id -1 / prob 0), so the KL is computed by
gathering the student's log-probabilities at the stored ids: log q(id) = z_id - logsumexp(z). The only (N, V)
tensors are the logits themselves (plus a float32 copy when they are bf16) and the softmax that autograd builds for
logsumexp's backward. The CE uses the same logsumexp, so one reduction over the vocabulary serves both terms.

:func:`dense_memory_loss` is the way earlier implementations did it (scatter targets into (N, V), full
log_softmax); it is kept as the reference for tests and the baseline for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    """loss: scalar float32 with grad (mean over positions); kl, ce: detached scalar means of the two terms."""

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


def _check(logits: torch.Tensor, tgt_ids: torch.Tensor, tgt_probs: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (N, V), got shape {tuple(logits.shape)}")
    if tgt_ids.shape != tgt_probs.shape or tgt_ids.dim() != 2 or tgt_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"tgt_ids/tgt_probs: expected matching (N={logits.shape[0]}, K) shapes, got "
                         f"{tuple(tgt_ids.shape)} and {tuple(tgt_probs.shape)}")
    if tgt_ids.dtype.is_floating_point:
        raise ValueError(f"tgt_ids: expected an integer tensor, got {tgt_ids.dtype}")


def _sparse_kl(
    logits32: torch.Tensor, lse: torch.Tensor, tgt_ids: torch.Tensor, tgt_probs: torch.Tensor
) -> torch.Tensor:
    valid = tgt_ids >= 0
    # pads (-1) gather index 0 and are masked out below; gathering K << V entries is the whole point
    z = logits32.gather(1, tgt_ids.clamp(min=0).long())  # (N, K)
    logq = z - lse.unsqueeze(1)
    p = tgt_probs.float()
    # xlogy gives 0 * log 0 = 0 for zero-probability entries
    terms = torch.xlogy(p, p) - p * logq
    return torch.where(valid, terms, torch.zeros_like(terms)).sum(1)


def sparse_kl(logits: torch.Tensor, tgt_ids: torch.Tensor, tgt_probs: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per position, from sparse targets.

    logits: (N, V) any float dtype; tgt_ids: (N, K) integer, padded with -1; tgt_probs: (N, K) float, 0 at pads.
    Returns (N,) float32: sum_j p_j * (log p_j - log q(id_j)), computed in float32.
    """
    _check(logits, tgt_ids, tgt_probs)
    logits32 = logits.float()
    return _sparse_kl(logits32, torch.logsumexp(logits32, dim=-1), tgt_ids, tgt_probs)


def _combine(kl: torch.Tensor, ce: torch.Tensor, alpha: float) -> LossOutput:
    loss = (alpha * kl + (1.0 - alpha) * ce).mean()
    return LossOutput(loss=loss, kl=kl.detach().mean(), ce=ce.detach().mean())


def _check_alpha_labels(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels: expected shape ({logits.shape[0]},), got {tuple(labels.shape)}")


def memory_loss(
    logits: torch.Tensor, tgt_ids: torch.Tensor, tgt_probs: torch.Tensor, labels: torch.Tensor, alpha: float
) -> LossOutput:
    """Mean over positions of alpha * KL(p_knn || q) + (1 - alpha) * CE(q, labels), with q = softmax(logits).

    logits (N, V) any float dtype; tgt_ids (N, K) int (pad -1); tgt_probs (N, K) float; labels (N,) int.
    """
    _check(logits, tgt_ids, tgt_probs)
    _check_alpha_labels(logits, labels, alpha)
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)  # shared by both terms
    kl = _sparse_kl(logits32, lse, tgt_ids, tgt_probs)
    ce = lse - logits32.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return _combine(kl, ce, alpha)


def dense_memory_loss(
    logits: torch.Tensor, tgt_ids: torch.Tensor, tgt_probs: torch.Tensor, labels: torch.Tensor, alpha: float
) -> LossOutput:
    """Reference: the same loss with targets scattered into a dense (N, V) tensor. Slow and memory-hungry on purpose."""
    _check(logits, tgt_ids, tgt_probs)
    _check_alpha_labels(logits, labels, alpha)
    n, v = logits.shape
    valid = tgt_ids >= 0
    dense = torch.zeros(n, v, dtype=torch.float32, device=logits.device)
    # pads add probability 0 at index 0, which leaves the dense target unchanged
    dense.scatter_add_(1, tgt_ids.clamp(min=0).long(), torch.where(valid, tgt_probs.float(), 0.0))
    logq = F.log_softmax(logits.float(), dim=-1)
    kl = (torch.xlogy(dense, dense) - dense * logq).sum(1)
    ce = F.cross_entropy(logits.float(), labels.long(), reduction="none")
    return _combine(kl, ce, alpha)
