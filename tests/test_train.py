"""The training loop: targets, batch plan, schedule, overfitting, exact resume, best-checkpoint selection."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.format import open_memmap

from mlpmem.config import TrainConfig
from mlpmem.components.memory import MLPMemory, MLPMemoryConfig
from mlpmem.components.sparse import FixedRows
from mlpmem.components.trainer import ArraySource, BatchPlan, InputSource, Targets, evaluate, lr_at, train_memory

V, D, K = 99, 32, 8



def tiny_memory(family: str = "gpt2", dropout: float = 0.0, seed: int = 0) -> MLPMemory:
    torch.manual_seed(seed)
    return MLPMemory(MLPMemoryConfig(family=family, input_size=D, hidden_size=D, intermediate_size=64,
                                     num_blocks=2, vocab_size=V, dropout=dropout))


def tiny_data(tmp: Path, n: int, seed: int = 0) -> tuple[ArraySource, Targets]:
    """Stored keys (float16 memmap) and sparse targets as the knn stage writes them."""
    rng = np.random.default_rng(seed)
    keys = open_memmap(tmp / "keys.npy", mode="w+", dtype=np.float16, shape=(n, D))
    keys[:] = rng.standard_normal((n, D))
    ids = np.full((n, K), -1, dtype=np.int32)
    probs = np.zeros((n, K), dtype=np.float16)
    for i in range(n):
        k = rng.integers(1, K + 1)
        ids[i, :k] = rng.choice(V, size=k, replace=False)
        p = rng.random(k) ** 2 + 0.05
        probs[i, :k] = p / p.sum()
    labels = ids[:, 0].copy()  # the gold token is among the neighbours' tokens, as usual
    return ArraySource(keys), Targets(FixedRows(ids, probs), labels)


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-2, warmup_steps=2, batch_size=8, max_steps=12, bf16=False, eval_every=4, save_every=4,
                log_every=1, val_positions=1000)
    base.update(kw)
    return TrainConfig(**base)


def weights(m: MLPMemory) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_targets_batch_renormalises(tmp_path) -> None:
    src, tg = tiny_data(tmp_path, 10)
    assert isinstance(src, InputSource)
    pos = np.array([3, 1, 7])
    x = src.hidden(pos)
    assert x.shape == (3, D) and x.dtype == torch.float32
    ids, probs, labels = tg.batch(pos)
    assert ids.dtype == labels.dtype == torch.int64 and probs.dtype == torch.float32
    assert torch.equal(ids, torch.from_numpy(tg.sparse.ids[pos].astype(np.int64)))
    torch.testing.assert_close(probs.sum(1), torch.ones(3), rtol=0, atol=1e-6)  # float16 sums were off
    assert torch.all(probs[ids < 0] == 0)
    with pytest.raises(ValueError, match="labels"):
        Targets(tg.sparse, tg.labels[:5])


def test_batch_plan_is_pure_and_covers_each_epoch() -> None:
    rows = np.arange(100, 130)  # 30 rows, batches of 8 straddle epoch boundaries
    a, b = BatchPlan(rows, 8, seed=3), BatchPlan(rows, 8, seed=3)
    stream = np.concatenate([a.positions(s) for s in range(15)])  # 120 positions = 4 epochs
    for e in range(4):
        assert sorted(stream[30 * e:30 * (e + 1)]) == list(rows)
    assert not np.array_equal(stream[:30], stream[30:60])  # reshuffled each epoch
    assert np.array_equal(b.positions(9), a.positions(9))  # no hidden state: any step, any order
    assert not np.array_equal(BatchPlan(rows, 8, seed=4).positions(0), a.positions(0))


def test_lr_schedule() -> None:
    c = cfg(lr=1.0, warmup_steps=4)
    lrs = [lr_at(s, c, 12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(x > y for x, y in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1 / 8)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memory_overfits_a_few_dozen_positions(tmp_path, family: str) -> None:
    src, tg = tiny_data(tmp_path, 32)
    rows = np.arange(32)
    alpha = 0.5
    # the loss's minimum: q = alpha * p + (1 - alpha) * onehot(gold), where it equals H(q) - alpha * H(p)
    ids, probs, labels = tg.batch(rows)
    p = torch.zeros(32, V).scatter_add_(1, ids.clamp(min=0), probs)
    q = alpha * p + (1 - alpha) * torch.nn.functional.one_hot(labels, V).float()
    optimum = (-(torch.xlogy(q, q).sum(1)) + alpha * torch.xlogy(p, p).sum(1)).mean().item()

    m = tiny_memory(family)
    c = cfg(alpha=alpha, lr=1e-2, warmup_steps=10, batch_size=32, max_steps=120, eval_every=1000, save_every=1000,
            log_every=50)
    before = evaluate(m, src, tg, rows, c)["loss"]
    summary = train_memory(m, src, tg, rows, rows, c, tmp_path / "run", seed=0)
    after = evaluate(m, src, tg, rows, c)
    assert before - optimum > 2.0
    assert after["loss"] - optimum < 0.05, (before, after, optimum)
    assert summary["steps"] == 120 and summary["best_val_loss"] == pytest.approx(after["loss"], rel=1e-5)


def test_resume_after_kill_is_exact(tmp_path) -> None:
    src, tg = tiny_data(tmp_path, 60)
    train, val = np.arange(0, 44), np.arange(44, 60)  # 44 rows / 8: batches straddle epochs
    c = cfg(bf16=True)  # bf16 autocast and dropout both on: resume must still be bit-exact

    ref = tiny_memory(dropout=0.1)
    ref_summary = train_memory(ref, src, tg, train, val, c, tmp_path / "a", seed=7)

    class Killed(Exception):
        pass

    def kill_at_6(step: int) -> None:
        if step == 6:  # two steps after the checkpoint at step 4: their work is lost
            raise Killed

    m = tiny_memory(dropout=0.1)
    with pytest.raises(Killed):
        train_memory(m, src, tg, train, val, c, tmp_path / "b", seed=7, on_step=kill_at_6)
    state = torch.load(tmp_path / "b" / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4
    # rerun on the same (now step-6) module object: it must reload step 4, not continue from what it holds
    summary = train_memory(m, src, tg, train, val, c, tmp_path / "b", seed=7)
    ref_w, got_w = weights(ref), weights(m)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert summary["steps"] == ref_summary["steps"] == 12
    assert summary["best_val_loss"] == ref_summary["best_val_loss"]
    # the metrics log has each step once, as if the run had never been killed
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x.get("split")) for x in lines] == [(x["step"], x.get("split")) for x in ref_lines]
    assert [x["loss"] for x in lines] == [x["loss"] for x in ref_lines]
    # a different seed is refused instead of silently mixing runs
    with pytest.raises(ValueError, match="other training settings"):
        train_memory(m, src, tg, train, val, c, tmp_path / "b", seed=8)


def test_without_a_kill_resume_changes_nothing(tmp_path) -> None:
    """Control for the test above: without reloading, a module trained further would differ."""
    src, tg = tiny_data(tmp_path, 60)
    train, val = np.arange(0, 44), np.arange(44, 60)
    a = tiny_memory()
    train_memory(a, src, tg, train, val, cfg(max_steps=4), tmp_path / "a", seed=7)
    b = tiny_memory()
    train_memory(b, src, tg, train, val, cfg(max_steps=6), tmp_path / "b", seed=7)
    assert not all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(b).values()))


def test_validation_picks_the_best_checkpoint(tmp_path) -> None:
    src, tg = tiny_data(tmp_path, 48)
    # validation rows share the train rows' inputs but have other targets: the more the memory fits the train
    # targets, the worse validation gets, so the best checkpoint is an early one, not the last
    val_tg_ids = np.roll(tg.sparse.ids, 1, axis=1)
    val_tg_ids[val_tg_ids >= 0] = (val_tg_ids[val_tg_ids >= 0] + 50) % V
    ids = np.concatenate([tg.sparse.ids[:24], val_tg_ids[:24]])
    probs = np.concatenate([tg.sparse.probs[:24], tg.sparse.probs[:24]])
    labels = np.concatenate([tg.labels[:24], (tg.labels[:24] + 50) % V]).astype(np.int32)
    keys = np.concatenate([src.keys[:24], src.keys[:24]])
    src, tg = ArraySource(keys), Targets(FixedRows(ids.astype(np.int32), probs), labels)
    train, val = np.arange(24), np.arange(24, 48)

    m = tiny_memory()
    c = cfg(lr=1e-2, warmup_steps=0, batch_size=24, max_steps=20, eval_every=2, save_every=5)
    summary = train_memory(m, src, tg, train, val, c, tmp_path / "run", seed=0)
    val_lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x).get("split") == "validation"]
    assert [x["step"] for x in val_lines] == list(range(2, 21, 2))
    best = min(val_lines, key=lambda x: x["loss"])
    best_json = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best_json["step"] == best["step"] == summary["best_step"] < 20
    assert best_json["val_loss"] == best["loss"] == summary["best_val_loss"]
    # the saved weights are those of that step: re-scoring them reproduces the logged validation loss
    restored = MLPMemory.from_pretrained(tmp_path / "run" / "best")
    assert evaluate(restored, src, tg, val, c)["loss"] == pytest.approx(best["loss"], rel=1e-6)
    assert not torch.equal(restored.head.weight, m.head.weight)  # not simply the final weights
    train_lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                   if "split" not in json.loads(x)]
    assert len(train_lines) == 20
    assert set(train_lines[0]) >= {"step", "epoch", "lr", "loss", "kl", "ce", "grad_norm", "tokens_per_s"}


def test_select_by_ce_picks_the_checkpoint_by_validation_ce(tmp_path, monkeypatch) -> None:
    """--train.select_by: 'loss' picks the pass with the lowest alpha * KL + (1 - alpha) * CE, 'ce' the one with the
    lowest CE (the same criterion for every alpha); best.json and the summary say which criterion and its value."""
    import mlpmem.components.trainer as trainer

    src, tg = tiny_data(tmp_path, 40)
    train, val = np.arange(32), np.arange(32, 40)
    # scripted validation passes at steps 4, 8, 12: the loss is lowest at 4, the CE at 8
    script = iter([{"loss": 1.0, "kl": 0.5, "ce": 3.0}, {"loss": 2.0, "kl": 2.5, "ce": 1.5},
                   {"loss": 3.0, "kl": 3.0, "ce": 2.5}] * 2)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **kw: dict(next(script)))
    for select_by, step, value in (("loss", 4, 1.0), ("ce", 8, 1.5)):
        out = tmp_path / select_by
        summary = train_memory(tiny_memory(), src, tg, train, val, cfg(select_by=select_by), out, seed=0)
        best = json.loads((out / "best.json").read_text())
        assert best["step"] == summary["best_step"] == step
        assert best["select_by"] == summary["select_by"] == select_by
        assert best["value"] == summary["best_val_criterion"] == value
        assert summary["best_val_loss"] == best["val_loss"] and summary["best_val_ce"] == best["val_ce"]


def test_validation_lines_record_ce_and_select_by_ce_uses_it(tmp_path) -> None:
    src, tg = tiny_data(tmp_path, 48, seed=3)
    train, val = np.arange(36), np.arange(36, 48)
    c = cfg(select_by="ce", eval_every=2, max_steps=10, alpha=0.9)
    summary = train_memory(tiny_memory(), src, tg, train, val, c, tmp_path / "run", seed=0)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_lines = [x for x in lines if x.get("split") == "validation"]
    assert len(val_lines) == 5 and all({"loss", "kl", "ce"} <= set(x) for x in val_lines)
    best = min(val_lines, key=lambda x: x["ce"])
    assert summary["best_step"] == best["step"] and summary["best_val_criterion"] == best["ce"]
    restored = MLPMemory.from_pretrained(tmp_path / "run" / "best")
    assert evaluate(restored, src, tg, val, c)["ce"] == pytest.approx(best["ce"], rel=1e-6)


def test_new_train_options_keep_old_fingerprints(tmp_path) -> None:
    """At their defaults, --train.seed and --train.select_by are not in what fingerprints see (the stage's and the
    resume checkpoint's), so runs made before them stay up to date; select_by ce is, and refuses a resume."""
    old_keys = {"input", "alpha", "lr", "weight_decay", "warmup_steps", "batch_size", "epochs", "max_steps",
                "grad_clip", "bf16", "eval_every", "save_every", "val_positions", "log_every"}
    assert set(TrainConfig().fingerprinted()) == old_keys
    assert TrainConfig(seed=3).fingerprinted() == TrainConfig().fingerprinted()
    assert TrainConfig(seed=3).seed_or(42) == 3 and TrainConfig().seed_or(42) == 42
    assert TrainConfig(select_by="ce").fingerprinted()["select_by"] == "ce"
    src, tg = tiny_data(tmp_path, 40)
    train, val = np.arange(32), np.arange(32, 40)
    train_memory(tiny_memory(), src, tg, train, val, cfg(max_steps=4), tmp_path / "a", seed=0)
    from mlpmem.components.trainer import CheckpointMismatch

    with pytest.raises(CheckpointMismatch):
        train_memory(tiny_memory(), src, tg, train, val, cfg(max_steps=8, select_by="ce"), tmp_path / "a", seed=0)


def test_a_position_without_neighbours_trains_on_ce_alone(tmp_path) -> None:
    """--knn.exclude document can leave a position no neighbour: its row is empty, its KL term 0 and its loss
    (1 - alpha) * CE, with finite gradients."""
    from mlpmem.components.losses import memory_loss

    ids = np.full((2, K), -1, dtype=np.int32)
    probs = np.zeros((2, K), dtype=np.float16)
    ids[1, :2], probs[1, :2] = [3, 5], [0.75, 0.25]
    tg = Targets(FixedRows(ids, probs), np.array([7, 3], dtype=np.int32))
    t_ids, t_probs, labels = tg.batch(np.array([0]))
    assert (t_probs == 0).all()
    logits = torch.randn(1, V, requires_grad=True)
    out = memory_loss(logits, t_ids, t_probs, labels, 0.3)
    ce = torch.nn.functional.cross_entropy(logits.detach(), labels)
    assert out.kl.item() == 0.0
    torch.testing.assert_close(out.loss.detach(), 0.7 * ce)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()
