"""Sparse KL + CE: sanity (KL = 0 at the target) and equivalence with the dense reference."""

import math

import pytest
import torch

from mlpmem.losses import dense_memory_loss, memory_loss, sparse_kl

V = 99



def random_targets(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) distinct ids per row with a random number of -1 pads at the end, probs summing to 1 (0 at pads)."""
    ids = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(n)])
    probs = torch.rand(n, k, generator=gen) ** 3
    n_valid = torch.randint(1, k + 1, (n,), generator=gen)
    pad = torch.arange(k).unsqueeze(0) >= n_valid.unsqueeze(1)
    ids[pad] = -1
    probs[pad] = 0.0
    return ids, probs / probs.sum(1, keepdim=True)


def test_kl_is_zero_when_student_equals_target() -> None:
    gen = torch.Generator().manual_seed(0)
    ids, probs = random_targets(8, 12, gen)
    logits = torch.full((8, V), -1e4)  # essentially no mass off the support
    for i in range(8):
        ok = ids[i] >= 0
        logits[i, ids[i][ok]] = probs[i][ok].log()
    kl = sparse_kl(logits, ids, probs)
    assert kl.dtype == torch.float32 and kl.shape == (8,)
    assert kl.abs().max().item() < 1e-5
    # and it is clearly positive once the student moves away from the target (mass off the support, other shape)
    assert (sparse_kl(logits.clamp(min=-3.0) + torch.randn(8, V, generator=gen), ids, probs) > 1e-3).all()


def test_kl_hand_computed() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ids = torch.tensor([[3, 1, -1]])
    probs = torch.tensor([[0.75, 0.25, 0.0]])
    logq = torch.log_softmax(logits, -1)[0]
    want = 0.75 * (math.log(0.75) - logq[3]) + 0.25 * (math.log(0.25) - logq[1])
    assert sparse_kl(logits, ids, probs).item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sparse_equals_dense_values_and_grads(alpha: float) -> None:
    gen = torch.Generator().manual_seed(1)
    ids, probs = random_targets(16, 10, gen)
    labels = torch.randint(0, V, (16,), generator=gen)
    base = torch.randn(16, V, generator=gen) * 3
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    sp = memory_loss(a, ids, probs, labels, alpha)
    de = dense_memory_loss(b, ids, probs, labels, alpha)
    sp.loss.backward()
    de.loss.backward()
    torch.testing.assert_close(sp.loss, de.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sp.kl, de.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sp.ce, de.ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert not sp.kl.requires_grad and not sp.ce.requires_grad


def test_bf16_logits_give_float32_loss() -> None:
    gen = torch.Generator().manual_seed(2)
    ids, probs = random_targets(4, 6, gen)
    labels = torch.randint(0, V, (4,), generator=gen)
    logits = torch.randn(4, V, generator=gen)
    out = memory_loss(logits.bfloat16(), ids, probs, labels, 0.5)
    ref = dense_memory_loss(logits.bfloat16().float(), ids, probs, labels, 0.5)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named() -> None:
    logits = torch.zeros(2, V)
    ids = torch.zeros(2, 3, dtype=torch.long)
    probs = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha"):
        memory_loss(logits, ids, probs, torch.zeros(2, dtype=torch.long), 1.5)
    with pytest.raises(ValueError, match="tgt_ids"):
        sparse_kl(logits, ids[:1], probs)
    with pytest.raises(ValueError, match="labels"):
        memory_loss(logits, ids, probs, torch.zeros(3, dtype=torch.long), 0.5)
