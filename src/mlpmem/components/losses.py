"""The memory's training loss: alpha * KL(p_knn || softmax(z)) + (1 - alpha) * CE(z, gold), per position.

kNN targets are sparse (at most k ids per position, padded with id -1 / prob 0), so the KL only needs the student's
log-probabilities at the stored ids: log q(id) = z_id - logsumexp(z). The CE uses the same logsumexp, so one
reduction over the vocabulary serves both terms.

:func:`memory_loss` is a custom autograd Function. Its forward goes over the rows in chunks (sized so that a
chunk's (rows, V) float32 temporary is about 32 MiB) to get each row's logsumexp in float32, then gathers the K
target logits and the label logit. It keeps for backward only the logits themselves (a reference, not a copy), the
(N,) logsumexp and the (N, K) targets. Its backward recomputes softmax chunk by chunk and writes

    d loss / d z = g / N * ((alpha * S + 1 - alpha) * softmax(z) - alpha * p_scattered - (1 - alpha) * onehot(label))

(g the incoming gradient of the mean loss, S = sum of the row's target probabilities, p_scattered the targets
added up at their ids) straight into a gradient tensor of the logits' own dtype. Besides the logits and that
gradient, forward and backward each need one (rows, V) float32 buffer, allocated once and reused by every chunk
(the cast and all the arithmetic happen in place in it), and O(N * K) for the targets: no (N, V) float32 tensor
exists when the logits are bf16 (for float32 logits the gradient itself is one, and backward writes the softmax
into it directly, without a buffer).

:func:`memory_loss_autograd` is the straightforward autograd version (float32 copy, logsumexp, gather); its
backward builds several (N, V) float32 tensors. :func:`dense_memory_loss` is the way earlier implementations did
it (scatter targets into (N, V), full log_softmax). Both are kept as references for tests and as baselines for the
benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# float32 bytes of one chunk's (rows, V) temporary in memory_loss
_CHUNK_BYTES = 32 * 2**20


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


def memory_loss_autograd(
    logits: torch.Tensor, tgt_ids: torch.Tensor, tgt_probs: torch.Tensor, labels: torch.Tensor, alpha: float
) -> LossOutput:
    """The straightforward autograd version of :func:`memory_loss`, kept as its reference and as the benchmark's "before".

    Same arguments and result. Its backward builds several full (N, V) float32 tensors (the float32 copy's
    gradient, logsumexp's softmax, gather's scattered gradient), as much memory as :func:`dense_memory_loss`.
    """
    _check(logits, tgt_ids, tgt_probs)
    _check_alpha_labels(logits, labels, alpha)
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)  # shared by both terms
    kl = _sparse_kl(logits32, lse, tgt_ids, tgt_probs)
    ce = lse - logits32.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return _combine(kl, ce, alpha)


def _chunk_rows(v: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, v * itemsize))


class _MemoryLoss(torch.autograd.Function):
    """(loss, kl mean, ce mean) from logits and prepared sparse targets; only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, logits, ids, probs, valid, labels, alpha, chunk_rows):  # type: ignore[override]
        # ids: (N, K) int64 with pads clamped to 0; probs: (N, K) in the compute dtype, 0 at pads; labels: (N, 1) int64
        n = logits.shape[0]
        cdt = probs.dtype
        with torch.autocast(logits.device.type, enabled=False):
            lse = torch.empty(n, dtype=cdt, device=logits.device)
            buf = logits.new_empty((min(chunk_rows, n), logits.shape[1]), dtype=cdt)  # reused by every chunk
            for s in range(0, n, chunk_rows):
                z = logits[s:s + chunk_rows]
                m = z.amax(1).to(cdt)  # exact in any dtype; rows of all -inf get 0 so they give -inf, not nan
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                e = buf[:z.shape[0]]
                e.copy_(z)  # the cast, in place: torch.sub(z, m) would make a second chunk-sized copy on CPU
                lse[s:s + chunk_rows] = e.sub_(m.unsqueeze(1)).exp_().sum(1).log_().add_(m)
            # the same formula as _sparse_kl; gathering before the cast gives the same values
            logq = logits.gather(1, ids).to(cdt) - lse.unsqueeze(1)
            terms = torch.xlogy(probs, probs) - probs * logq
            kl = torch.where(valid, terms, torch.zeros_like(terms)).sum(1)
            ce = lse - logits.gather(1, labels).to(cdt).squeeze(1)
            loss = (alpha * kl + (1.0 - alpha) * ce).mean()
            kl_mean, ce_mean = kl.mean(), ce.mean()
        ctx.save_for_backward(logits, lse, ids, probs, labels)
        ctx.alpha = alpha
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return loss, kl_mean, ce_mean

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_kl, _g_ce):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        logits, lse, ids, probs, labels = ctx.saved_tensors
        alpha, rows = ctx.alpha, ctx.chunk_rows
        n = logits.shape[0]
        cdt = lse.dtype
        with torch.autocast(logits.device.type, enabled=False):
            scale = g.to(cdt) / n  # stays on the device: no sync
            coef = ((alpha * probs.sum(1) + (1.0 - alpha)) * scale).unsqueeze(1)  # (N, 1) softmax factor per row
            neg_p = probs * (-alpha * scale)  # (N, K), added at the ids (duplicates add up, pads add 0 at index 0)
            neg_label = (scale * (alpha - 1.0)).reshape(1, 1).expand(n, 1)
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            direct = grad.dtype == cdt  # then softmax * coef is written into the gradient itself
            buf = None if direct else logits.new_empty((min(rows, n), logits.shape[1]), dtype=cdt)
            for s in range(0, n, rows):
                t = slice(s, s + rows)
                q = grad[t] if buf is None else buf[:grad[t].shape[0]]
                q.copy_(logits[t]).sub_(lse[t].unsqueeze(1)).exp_().mul_(coef[t])
                if alpha > 0.0:
                    q.scatter_add_(1, ids[t], neg_p[t])
                if alpha < 1.0:
                    q.scatter_add_(1, labels[t], neg_label[t])
                if buf is not None:
                    grad[t] = q
        return grad, None, None, None, None, None, None


def memory_loss(
    logits: torch.Tensor, tgt_ids: torch.Tensor, tgt_probs: torch.Tensor, labels: torch.Tensor, alpha: float,
    *, chunk_rows: int | None = None,
) -> LossOutput:
    """Mean over positions of alpha * KL(p_knn || q) + (1 - alpha) * CE(q, labels), with q = softmax(logits).

    logits (N, V) any float dtype; tgt_ids (N, K) int (pad -1, ids may repeat); tgt_probs (N, K) float (0 at pads);
    labels (N,) int. Computed in float32 (float64 for float64 logits), with a chunked custom backward that writes
    the gradient in the logits' dtype and never holds an (N, V) float32 tensor (see the module docstring).
    ``chunk_rows``: rows per chunk; by default as many as make a (rows, V) float32 buffer of about 32 MiB.
    Gradients flow to ``logits`` only: the targets are constants (unlike :func:`memory_loss_autograd`, no gradient
    reaches a ``tgt_probs`` that requires one).
    """
    _check(logits, tgt_ids, tgt_probs)
    _check_alpha_labels(logits, labels, alpha)
    cdt = torch.promote_types(logits.dtype, torch.float32)
    if chunk_rows is None:
        chunk_rows = _chunk_rows(logits.shape[1], cdt.itemsize)
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows: must be >= 1, got {chunk_rows}")
    valid = tgt_ids >= 0
    ids = tgt_ids.clamp(min=0).long()
    probs = torch.where(valid, tgt_probs.to(cdt), 0.0)
    loss, kl, ce = _MemoryLoss.apply(
        logits, ids, probs, valid, labels.long().unsqueeze(1), float(alpha), int(chunk_rows))
    return LossOutput(loss=loss, kl=kl, ce=ce)


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
    return dense_target_loss(logits, dense, labels, alpha)


def dense_target_loss(logits: torch.Tensor, dense: torch.Tensor, labels: torch.Tensor, alpha: float) -> LossOutput:
    """The loss against a dense (N, V) float32 target distribution: full log_softmax, KL and CE over V."""
    logq = F.log_softmax(logits.float(), dim=-1)
    kl = (torch.xlogy(dense, dense) - dense * logq).sum(1)
    ce = F.cross_entropy(logits.float(), labels.long(), reduction="none")
    return _combine(kl, ce, alpha)
