"""Training loop for the MLP memory, independent of where its inputs come from.

Inputs come from an :class:`InputSource` (stored keys now, the frozen LM run on the fly later), targets from
:class:`Targets` (sparse kNN distributions + gold tokens, memory-mapped). Determinism is by construction:

- the positions of step s are a pure function of (seed, s): training is one stream over the train rows, epoch e
  visiting them in the order ``Generator(seed + e).permutation``, cut into consecutive batches of ``batch_size``
  (a batch may straddle two epochs, so every step has the same size);
- dropout is reseeded from (seed, step, rank) at every step;
- the learning rate is a pure function of the step.

So a resumable checkpoint needs only the weights, the AdamW state and the step, and a run killed after a checkpoint
and rerun ends bit-identical (on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from mlpmem.config import TrainConfig
from mlpmem.components.losses import memory_loss
from mlpmem.components.memory import MLPMemory, check_state_dict, write_pretrained
from mlpmem.errors import DivergedError, StageError
from mlpmem.disk import disk_errors
from mlpmem.files import atomic_file, atomic_write_json, atomic_write_text, fingerprint, swapped_directory
from mlpmem.runtime import fault_point, progress

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
# what a checkpoint that failed for lack of disk space tells the user (the previous checkpoint is intact)
RESUME_HINT = "free space and rerun the same command: training resumes from the last checkpoint"


# ----------------------------------------------------------------------------- inputs and targets

@runtime_checkable
class InputSource(Protocol):
    """Where the memory's input for a datastore row comes from."""

    def hidden(self, positions: np.ndarray) -> torch.Tensor:
        """positions: (n,) int64 datastore rows -> (n, d) float tensor, the memory input for those rows."""
        ...


class ArraySource:
    """Offline input: rows of a stored (N, d) float16 key array (usually a read-only memmap)."""

    def __init__(self, keys: np.ndarray):
        if keys.ndim != 2:
            raise ValueError(f"keys: expected an (N, d) array, got shape {keys.shape}")
        self.keys = keys

    def hidden(self, positions: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.keys[positions], dtype=np.float32))


class Targets:
    """Sparse kNN targets and gold next tokens for every datastore row.

    rows: :class:`mlpmem.components.sparse.CsrRows` (variable-length rows on disk) or ``FixedRows`` ((N, K) arrays
    padded with -1); labels: (N,) int32.
    """

    def __init__(self, rows, labels: np.ndarray):
        if labels.shape != (len(rows),):
            raise ValueError(f"labels: expected shape ({len(rows)},), got {labels.shape}")
        self.sparse, self.labels = rows, labels

    def __len__(self) -> int:
        return len(self.sparse)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """positions (n,) -> ids (n, K) int64, probs (n, K) float32, labels (n,) int64 (K: the batch's widest row).

        Probabilities are renormalised over each row's non-pad entries: float16 storage leaves sums a little off 1,
        which would otherwise bias the KL. A row without any entry keeps all-zero probabilities (KL term 0).
        """
        ids_np, probs_np = self.sparse.rows(positions)
        ids, probs = torch.from_numpy(ids_np), torch.from_numpy(probs_np)
        probs = torch.where(ids >= 0, probs, 0.0)
        probs = probs / probs.sum(1, keepdim=True).clamp(min=1e-12)
        labels = torch.from_numpy(np.asarray(self.labels[positions], dtype=np.int64))
        return ids, probs, labels


# ----------------------------------------------------------------------------- pure schedule helpers

def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of 0-based step ``step``: linear warm-up to cfg.lr, then linear decay towards 0 at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps  # +1: the first step already learns
    return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


class BatchPlan:
    """Global batch positions of step s as a pure function of (seed, s); caches one epoch's permutation."""

    def __init__(self, train_rows: np.ndarray, batch_size: int, seed: int):
        self.rows = train_rows
        self.batch_size = batch_size
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.rows)))
        return self._perm[1]

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / len(self.rows)

    def positions(self, step: int) -> np.ndarray:
        n = len(self.rows)
        start, end = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        while start < end:
            epoch, off = divmod(start, n)
            take = min(end - start, n - off)
            parts.append(self.rows[self._epoch_perm(epoch)[off:off + take]])
            start += take
        return np.concatenate(parts)


# ----------------------------------------------------------------------------- checkpoints

class CheckpointMismatch(StageError, ValueError):
    """A resume checkpoint made by other settings."""


def _save_best(path: Path, memory: MLPMemory) -> None:
    # a full disk is judged inside the swap, while the partial version still fills it (see disk.disk_errors)
    with swapped_directory(path) as tmp, disk_errors(path, RESUME_HINT, written=tmp):
        write_pretrained(memory, tmp)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a Python file: a full disk then keeps its OSError (ENOSPC) in the exception chain, where
    torch's own file writer would leave only a RuntimeError ("unexpected pos ...")."""
    with atomic_file(path) as f:
        torch.save(state, f)


def _save_last(path: Path, memory: MLPMemory, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    with swapped_directory(path) as tmp, disk_errors(path, RESUME_HINT, written=tmp):
        write_pretrained(memory, tmp)
        save_state(tmp / STATE_NAME, {"optimizer": opt.state_dict(), **state})
        fault_point("train.checkpoint")  # written, not yet switched in


def _load_last(path: Path, memory: MLPMemory, opt: torch.optim.Optimizer, fp: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    missing = [n for n in ("model.safetensors", STATE_NAME) if not (path / n).is_file()]
    if missing:
        raise StageError(f"resume checkpoint {path} is incomplete: missing {', '.join(missing)}; "
                         "delete it to restart training")
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fp:
        raise CheckpointMismatch(f"resume checkpoint {path} was written with other training settings, seed or train rows "
                         f"(fingerprint {state.get('fingerprint')} != {fp}): delete {path} "
                         "(`mlpmem train --force` does) or choose another out_dir")
    weights = load_file(str(path / "model.safetensors"))
    check_state_dict(memory, weights, where=str(path))
    memory.load_state_dict(weights)
    opt.load_state_dict(state.pop("optimizer"))
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (the killed run's lost steps)."""
    if not path.is_file():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= step:
                kept.append(ln)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _rows_hash(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the loop

class DivergenceWatch:
    """The first step whose loss or gradient norm was not finite, tracked on the device (no sync per step) and
    checked before anything is written (metrics, best, last), so a diverged run never leaves a checkpoint of its
    diverged steps or a complete manifest. ``what`` names the run and ``flags`` the config section in messages."""

    def __init__(self, device: torch.device, what: str, flags: str):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.vals = torch.zeros(2, dtype=torch.float32, device=device)
        self.what, self.flags = what, flags

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record step ``step`` (1-based) if it is the first non-finite one."""
        newly = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.step < 0)
        self.step = torch.where(newly, step, self.step)
        self.vals = torch.where(newly, torch.stack([loss.detach().float(), grad_norm.detach().float()]), self.vals)

    def check(self, lr_of: Callable[[int], float]) -> None:
        at = int(self.step.item())
        if at >= 0:
            loss_v, gn = self.vals.tolist()
            raise DivergedError(f"{self.what} diverged at step {at}: loss {loss_v:g}, gradient norm {gn:g} (lr "
                                f"{lr_of(at - 1):g}); nothing after the last good checkpoint was kept. Rerun with a "
                                f"lower --{self.flags}.lr (or more --{self.flags}.warmup_steps) and --force")


def is_distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


class StepTrace:
    """Test hook, off unless MLPMEM_TRACE names a directory: each rank appends one JSON line per training step to
    ``<dir>/train-rank<r>.jsonl`` with the positions its loss was actually computed on and that loss (this rank's
    mean, before the gradient all-reduce), so a test sees what every rank really trained on."""

    ENV = "MLPMEM_TRACE"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def from_env(cls, rank: int) -> StepTrace | None:
        d = os.environ.get(cls.ENV)
        if not d:
            return None  # the loop then passes no callback: steps pay nothing
        Path(d).mkdir(parents=True, exist_ok=True)
        return cls(Path(d) / f"train-rank{rank}.jsonl")

    def record(self, step: int, pos: np.ndarray, loss: torch.Tensor) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "positions": pos.tolist(), "loss": loss.item()}) + "\n")


def _step_loss(
    memory: MLPMemory, source: InputSource, targets: Targets, pos: np.ndarray, alpha: float, bf16: bool,
    device: torch.device, trace: Callable[[np.ndarray, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss, kl, ce over ``pos`` (sorted first: memmap reads go faster in file order; the mean is unaffected).
    ``trace(pos, loss)``, if given, sees the positions read and the loss computed from them."""
    pos = np.sort(pos)
    x = source.hidden(pos).to(device, non_blocking=True)
    ids, probs, labels = (t.to(device, non_blocking=True) for t in targets.batch(pos))
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = memory(x)
    out = memory_loss(logits, ids, probs, labels, alpha)  # float32, outside autocast
    if trace is not None:
        trace(pos, out.loss)
    return out.loss, out.kl, out.ce


@torch.no_grad()
def evaluate(
    memory: MLPMemory, source: InputSource, targets: Targets, rows: np.ndarray, cfg: TrainConfig,
    world_size: int = 1, rank: int = 0,
) -> dict[str, float]:
    """Validation loss / KL / CE (position-weighted means) over ``rows`` in a fixed order, without dropout."""
    device = next(memory.parameters()).device
    was_training = memory.training
    memory.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, kl, ce, n
    mine = np.array_split(rows, world_size)[rank] if is_distributed(world_size) else rows
    for i in range(0, len(mine), cfg.batch_size):
        pos = mine[i:i + cfg.batch_size]
        loss, kl, ce = _step_loss(memory, source, targets, pos, cfg.alpha, cfg.bf16, device)
        n = len(pos)
        sums += torch.tensor([loss.item() * n, kl.item() * n, ce.item() * n, n], dtype=torch.float64)
    if is_distributed(world_size):
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    memory.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "kl": sums[1].item() / n, "ce": sums[2].item() / n}


def make_optimizer(memory: MLPMemory, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in memory.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_memory(
    memory: MLPMemory,
    source: InputSource,
    targets: Targets,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    on_step: Callable[[int], None] | None = None,
    plan: BatchPlan | None = None,
) -> dict[str, Any]:
    """Train ``memory`` in place; resume from ``out_dir/last`` if present.

    train_rows / val_rows: (n,) int datastore rows; the first ``cfg.val_positions`` validation rows are scored, in
    the given order, at every ``cfg.eval_every`` steps and at the end. Under torch.distributed with
    ``world_size > 1`` each rank trains on its slice of every global batch and gradients are summed so the update
    equals single-process training. Writes (rank 0 only) ``out_dir/metrics.jsonl`` (training lines, and validation
    lines with loss, kl and ce), the best model by ``cfg.select_by`` (validation loss, or validation CE alone, the
    same criterion for every alpha) in ``out_dir/best`` (+ ``best.json``), and a resumable ``out_dir/last`` every
    ``cfg.save_every`` steps and at the end. ``on_step(step)`` is called after each finished step (1-based, after
    any checkpoint), e.g. to stop a run early in tests. ``plan`` orders the rows (default: a seeded shuffle of
    single rows; online training passes a window-grouped plan). Returns a summary dict.
    """
    train_rows = np.asarray(train_rows, dtype=np.int64)
    val_rows = np.asarray(val_rows, dtype=np.int64)[: cfg.val_positions]
    if len(train_rows) == 0:
        raise ValueError("train_rows: must not be empty")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    ddp = is_distributed(world_size)
    main = rank == 0
    out_dir = Path(out_dir)
    device = next(memory.parameters()).device
    total = total_steps(cfg, len(train_rows))
    plan = plan or BatchPlan(train_rows, cfg.batch_size, seed)
    opt = make_optimizer(memory, cfg)
    # seed is fingerprinted on its own (the one in use); select_by only when not the default (see fingerprinted)
    trajectory = {k: v for k, v in cfg.fingerprinted().items() if k not in ("eval_every", "save_every", "log_every")}
    fp = fingerprint(trajectory, seed, _rows_hash(train_rows), memory.config.to_dict())
    metrics_path, last_dir = out_dir / "metrics.jsonl", out_dir / "last"

    # best_val: the best validation value of the criterion cfg.select_by ('loss' or 'ce'); best_rec: that pass's
    # loss, kl and ce
    step, best_val, best_step, last_loss, resumed_acc = 0, math.inf, -1, math.nan, None
    best_rec: dict[str, float] = {}
    if last_dir.exists():
        st = _load_last(last_dir, memory, opt, fp)
        step, best_val, best_step = int(st["step"]), float(st["best_val_loss"]), int(st["best_step"])
        best_rec = dict(st.get("best_record") or {})
        last_loss = float(st.get("train_loss", math.nan))
        resumed_acc = st.get("log_acc")
        log.info("resuming from %s at step %d/%d", last_dir, step, total)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if step:
            truncate_metrics(metrics_path, step)  # the lines a failed or killed run wrote after its checkpoint
        else:
            metrics_path.unlink(missing_ok=True)  # it failed before its first checkpoint: start the log over
    if ddp:  # every rank starts from rank 0's weights (they differ when ranks initialised with other seeds)
        for t in memory.state_dict().values():
            dist.broadcast(t, src=0)

    def log_line(rec: dict[str, Any]) -> None:
        if main:  # a line cut short by a full disk is dropped on resume, with the others after the checkpoint
            with disk_errors(metrics_path, RESUME_HINT), open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def validate_and_select(at: int) -> None:
        nonlocal best_val, best_step, best_rec
        if len(val_rows) == 0:
            return
        v = evaluate(memory, source, targets, val_rows, cfg, world_size, rank)
        log_line({"step": at, "epoch": plan.epoch_of(at), "split": "validation", **v})
        if v[cfg.select_by] < best_val:
            best_val, best_step, best_rec = v[cfg.select_by], at, dict(v)
            if main:  # weights first, then the pointer: best.json never names missing weights
                _save_best(out_dir / "best", memory)
                atomic_write_json(out_dir / "best.json", {"step": at, "val_loss": v["loss"], "val_kl": v["kl"],
                                                          "val_ce": v["ce"], "select_by": cfg.select_by,
                                                          "value": v[cfg.select_by]})

    def checkpoint(at: int, train_loss: float) -> None:
        if main:
            # best_val_loss holds the criterion's value (the loss unless --train.select_by ce)
            _save_last(last_dir, memory, opt, {"step": at, "best_val_loss": best_val, "best_step": best_step,
                                               "best_record": best_rec,
                                               "fingerprint": fp, "total_steps": total, "seed": seed,
                                               "train_loss": train_loss,
                                               "log_acc": {"sums": acc.tolist(), "steps": acc_steps}})
        if ddp:
            dist.barrier()

    memory.train()
    bar = progress(total=total * cfg.batch_size, initial=step * cfg.batch_size, unit="pos", unit_scale=True,
                   desc="train memory", show=main)
    # loss, kl, ce, grad_norm summed since the last log line; kept on the device so steps never wait for a .item()
    acc = torch.zeros(4, dtype=torch.float32, device=device)
    acc_steps, t_log, t0, start_step = 0, time.perf_counter(), time.perf_counter(), step
    if resumed_acc is not None:  # steps since the last log line before the checkpoint: the next line averages them
        acc += torch.tensor(resumed_acc["sums"], dtype=torch.float32, device=device)
        acc_steps = int(resumed_acc["steps"])
    diverged = DivergenceWatch(device, "training", "train")
    step_trace = StepTrace.from_env(rank)

    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):  # reseeding dropout must not leak into the caller's RNG
            while step < total:
                lr = lr_at(step, cfg, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                glob = plan.positions(step)
                mine = np.array_split(glob, world_size)[rank] if ddp else glob
                torch.manual_seed((seed * 1_000_003 + step) * max(world_size, 1) + rank)
                fed = functools.partial(step_trace.record, step + 1) if step_trace is not None else None
                loss, kl, ce = _step_loss(memory, source, targets, mine, cfg.alpha, cfg.bf16, device, fed)
                # scale to a share of the global mean: summed over ranks the gradients equal single-process training
                opt.zero_grad(set_to_none=True)
                (loss * (len(mine) / len(glob))).backward()
                stats = torch.stack([loss.detach(), kl, ce]) * (len(mine) / len(glob))
                if ddp:
                    for p in memory.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                    dist.all_reduce(stats)
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, scale by 1
                gnorm = torch.nn.utils.clip_grad_norm_(memory.parameters(), clip)
                diverged.update(step + 1, stats[0], gnorm)
                opt.step()
                step += 1
                last = stats[0]
                acc += torch.cat([stats, gnorm.detach().float().reshape(1)])
                acc_steps += 1
                bar.update(cfg.batch_size)

                boundary = step == total or not (step % cfg.log_every and step % cfg.eval_every and
                                                 step % cfg.save_every)
                if boundary:
                    diverged.check(lambda s: lr_at(s, cfg, total))
                if step % cfg.log_every == 0 or step == total:
                    now = time.perf_counter()
                    rate = acc_steps * cfg.batch_size / max(now - t_log, 1e-9)
                    a = (acc / acc_steps).tolist()
                    log_line({"step": step, "epoch": plan.epoch_of(step), "lr": lr, "loss": a[0], "kl": a[1],
                              "ce": a[2], "grad_norm": a[3], "tokens_per_s": rate})
                    bar.set_postfix(loss=f"{a[0]:.4f}", lr=f"{lr:.2e}")
                    acc.zero_()
                    acc_steps, t_log = 0, now
                if step % cfg.eval_every == 0 or step == total:
                    validate_and_select(step)
                if step % cfg.save_every == 0 or step == total:
                    last_loss = last.item()
                    checkpoint(step, last_loss)
                if on_step is not None:
                    on_step(step)
    finally:
        bar.close()
    if step > start_step:
        last_loss = last.item()
    elapsed = time.perf_counter() - t0
    done = step - start_step
    return {
        "steps": step,
        "best_step": best_step,
        # the validation loss of the chosen checkpoint, whichever criterion chose it
        "best_val_loss": best_rec.get("loss", best_val),
        "best_val_ce": best_rec.get("ce"),
        "select_by": cfg.select_by,  # the criterion that chose it, and its value there
        "best_val_criterion": best_val,
        "final_train_loss": last_loss,
        "tokens_per_s": done * cfg.batch_size / elapsed if done else 0.0,
    }
