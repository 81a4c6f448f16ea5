"""Sparse KL + CE: sanity (KL = 0 at the target), equivalence of the chunked custom backward with the autograd and
dense references (values and gradients), and that its backward never builds a float32 (N, V) tensor."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mlpmem.components import losses
from mlpmem.components.losses import dense_memory_loss, memory_loss, memory_loss_autograd, sparse_kl

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


# ----------------------------------------------------------------------------- the chunked custom backward

def messy_targets(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids that repeat within rows, pads (-1, prob 0) anywhere in a row, one row all pads, sums in [0.5, 1.2]."""
    ids = torch.randint(0, V, (n, k), generator=gen)
    ids[::2, 1] = ids[::2, 0]  # duplicates in every other row
    ids[::3, 2] = ids[::3, 0]
    probs = torch.rand(n, k, generator=gen)
    pad = torch.rand(n, k, generator=gen) < 0.3
    pad[:, 0] = False
    pad[-1] = True  # a position without any target: KL 0, only the CE term
    ids[pad] = -1
    probs[pad] = 0.0
    total = 0.5 + 0.7 * torch.rand(n, 1, generator=gen)
    probs = probs / probs.sum(1, keepdim=True).clamp(min=1e-12) * total
    return ids, probs


def _problem(n: int, k: int, seed: int, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    ids, probs = messy_targets(n, k, gen)
    labels = torch.randint(0, V, (n,), generator=gen)
    logits = torch.randn(n, V, generator=gen) * scale
    return logits, ids, probs, labels


def _run(fn, base: torch.Tensor, *args, **kw):
    z = base.clone().requires_grad_(True)
    out = fn(z, *args, **kw)
    out.loss.backward()
    return out, z.grad


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_chunked_equals_autograd_and_dense(alpha: float) -> None:
    torch.manual_seed(0)
    logits, ids, probs, labels = _problem(37, 12, seed=3)  # 37 rows in chunks of 8: a short last chunk
    new, g_new = _run(memory_loss, logits, ids, probs, labels, alpha, chunk_rows=8)
    # the sparse KL takes each (id, p) entry's p log p on its own, the dense one merges repeated ids first: the
    # two differ by that constant (no gradient), which is added back to the dense values here
    dense_p = torch.zeros(len(ids), V).scatter_add_(1, ids.clamp(min=0), probs)
    dup = (torch.xlogy(probs, probs).sum(1) - torch.xlogy(dense_p, dense_p).sum(1)).mean()
    assert dup.abs() > 1e-2  # the targets do repeat ids
    for ref_fn, kl_shift in ((memory_loss_autograd, 0.0), (dense_memory_loss, dup)):
        ref, g_ref = _run(ref_fn, logits, ids, probs, labels, alpha)
        torch.testing.assert_close(new.loss, ref.loss + alpha * kl_shift, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new.kl, ref.kl + kl_shift, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new.ce, ref.ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_new, g_ref, rtol=1e-5, atol=1e-5)
    assert new.loss.dtype == new.kl.dtype == new.ce.dtype == torch.float32 and new.loss.dim() == 0
    assert new.loss.requires_grad and not new.kl.requires_grad and not new.ce.requires_grad
    assert g_new.dtype == torch.float32


def test_chunk_size_does_not_change_the_result() -> None:
    torch.manual_seed(0)
    logits, ids, probs, labels = _problem(10, 6, seed=4)
    want, g_want = _run(memory_loss, logits, ids, probs, labels, 0.4)  # default: one chunk here
    for rows in (1, 3, 10, 1000):
        got, g_got = _run(memory_loss, logits, ids, probs, labels, 0.4, chunk_rows=rows)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_rows"):
        memory_loss(logits, ids, probs, labels, 0.4, chunk_rows=0)


def test_duplicate_ids_add_up_and_pads_contribute_nothing() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    labels = torch.tensor([1])
    merged, g_merged = _run(memory_loss, logits, torch.tensor([[2, 0]]), torch.tensor([[0.6, 0.3]]), labels, 0.7)
    split, g_split = _run(memory_loss, logits, torch.tensor([[2, -1, 0, 2]]),
                          torch.tensor([[0.2, 0.0, 0.3, 0.4]]), labels, 0.7)
    # the same target mass on the same ids gives the same gradient (the KL differs only by the entropy term)
    torch.testing.assert_close(g_split, g_merged, rtol=1e-6, atol=1e-7)
    ref, g_ref = _run(memory_loss_autograd, logits, torch.tensor([[2, -1, 0, 2]]),
                      torch.tensor([[0.2, 0.0, 0.3, 0.4]]), labels, 0.7)
    torch.testing.assert_close(split.loss, ref.loss)
    torch.testing.assert_close(g_split, g_ref, rtol=1e-6, atol=1e-7)
    # a pad is ignored even if its probability is not 0
    stray, g_stray = _run(memory_loss, logits, torch.tensor([[2, -1, 0, 2]]),
                          torch.tensor([[0.2, 0.9, 0.3, 0.4]]), labels, 0.7)
    torch.testing.assert_close(stray.loss, split.loss, rtol=0, atol=0)
    torch.testing.assert_close(g_stray, g_split, rtol=0, atol=0)


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([[1, 1, -1, 4], [0, 6, 2, -1], [-1, -1, -1, -1], [3, 5, 5, 0], [2, -1, 6, 6]])
    probs = torch.rand(5, 4, generator=gen, dtype=torch.float64) * (ids >= 0)
    labels = torch.tensor([0, 6, 3, 3, 1])
    logits = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    for alpha in (0.0, 0.3, 1.0):
        out = memory_loss(logits, ids, probs, labels, alpha, chunk_rows=2)
        assert out.loss.dtype == torch.float64
        torch.autograd.gradcheck(lambda z: memory_loss(z, ids, probs, labels, alpha, chunk_rows=2).loss, (logits,))


def test_bf16_logits_match_autograd_on_the_same_logits() -> None:
    torch.manual_seed(0)
    logits, ids, probs, labels = _problem(33, 10, seed=6)
    z16 = logits.bfloat16()
    new, g_new = _run(memory_loss, z16, ids, probs, labels, 0.3, chunk_rows=7)
    ref, g_ref = _run(memory_loss_autograd, z16, ids, probs, labels, 0.3)
    assert new.loss.dtype == torch.float32 and g_new.dtype == torch.bfloat16
    for name in ("loss", "kl", "ce"):
        torch.testing.assert_close(getattr(new, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    # both round the same float32 gradient to bf16; at most one bf16 step apart
    torch.testing.assert_close(g_new, g_ref, rtol=2**-7, atol=1e-7)


def test_bf16_logits_from_autocast_as_in_the_trainer() -> None:
    torch.manual_seed(0)
    _, ids, probs, labels = _problem(24, 8, seed=7)
    x = torch.randn(24, 16)
    grads = {}
    for fn in (memory_loss, memory_loss_autograd):
        torch.manual_seed(1)
        head = torch.nn.Linear(16, V)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(x)
        assert logits.dtype == torch.bfloat16
        out = fn(logits, ids, probs, labels, 0.5)  # outside autocast, like _step_loss
        out.loss.backward()
        grads[fn] = (out.loss.detach(), head.weight.grad)
    (l_new, w_new), (l_ref, w_ref) = grads[memory_loss], grads[memory_loss_autograd]
    torch.testing.assert_close(l_new, l_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_new, w_ref, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_called_inside_autocast_gives_the_same(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits, ids, probs, labels = _problem(12, 6, seed=8)
    logits = logits.to(dtype)
    want, g_want = _run(memory_loss, logits, ids, probs, labels, 0.3, chunk_rows=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, g_got = _run(memory_loss, logits, ids, probs, labels, 0.3, chunk_rows=5)
    assert got.loss.dtype == torch.float32 and g_got.dtype == dtype
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)


def test_logits_without_grad_just_give_values() -> None:
    torch.manual_seed(0)
    logits, ids, probs, labels = _problem(9, 5, seed=9)
    ref = memory_loss_autograd(logits, ids, probs, labels, 0.6)
    out = memory_loss(logits, ids, probs, labels, 0.6, chunk_rows=4)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        out = memory_loss(logits.clone().requires_grad_(True), ids, probs, labels, 0.6)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor (in elements) that any op below autograd returns, backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_float32_n_by_v_tensor_in_forward_or_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    n, rows = 64, 16
    logits, ids, probs, labels = _problem(n, 8, seed=10)
    # the default chunk size, shrunk so that this small case is split into 16-row chunks
    monkeypatch.setattr(losses, "_CHUNK_BYTES", rows * V * 4)
    largest = {}
    for fn in (memory_loss, memory_loss_autograd):
        z = logits.bfloat16().requires_grad_(True)
        with _LargestFloat32() as probe:
            fn(z, ids, probs, labels, 0.3).loss.backward()
        assert z.grad.dtype == torch.bfloat16
        largest[fn] = probe.largest
    assert largest[memory_loss] <= rows * V
    assert largest[memory_loss_autograd] >= n * V  # the probe does see the reference's (N, V) float32 tensors


def test_both_versions_reject_the_same_arguments() -> None:
    logits = torch.zeros(2, V)
    ids = torch.zeros(2, 3, dtype=torch.long)
    probs = torch.zeros(2, 3)
    labels = torch.zeros(2, dtype=torch.long)
    bad = [
        (logits[0], ids, probs, labels, 0.5),
        (logits, ids[:1], probs, labels, 0.5),
        (logits, probs, probs, labels, 0.5),
        (logits, ids, probs, labels, -0.1),
        (logits, ids, probs, labels[:1], 0.5),
    ]
    for args in bad:
        with pytest.raises(ValueError) as want:
            memory_loss_autograd(*args)
        with pytest.raises(ValueError) as got:
            memory_loss(*args)
        assert str(got.value) == str(want.value)
