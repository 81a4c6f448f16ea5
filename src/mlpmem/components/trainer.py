"""Training the MLP memory, independent of where its inputs come from.

Inputs come from an :class:`InputSource` (stored keys now, the frozen LM run on the fly later), targets from
:class:`Targets` (sparse kNN distributions + gold tokens, memory-mapped). The loop itself (resume, schedule,
per-step seeds, gradient all-reduce, clipping, divergence watch, metrics, best/last checkpoints) is
:class:`mlpmem.components.loop.TrainLoop`; this module supplies the memory's step (a :class:`BatchPlan` slice of
the train rows) and its validation, so a run killed after a checkpoint and rerun ends bit-identical (on CPU) to an
uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from mlpmem.config import TrainConfig
from mlpmem.components.loop import STATE_NAME, BatchPlan, LoopSpec, StepOut, TrainLoop, is_distributed, lr_at, \
    make_optimizer, read_state, save_state, total_steps
from mlpmem.components.loop import CheckpointMismatch  # noqa: F401  (re-exported: callers catch it from here)
from mlpmem.components.losses import memory_loss
from mlpmem.components.memory import MLPMemory, check_state_dict, write_pretrained
from mlpmem.disk import disk_errors
from mlpmem.files import atomic_write_json, fingerprint, swapped_directory
from mlpmem.runtime import fault_point

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


# ----------------------------------------------------------------------------- checkpoints

def _save_best(path: Path, memory: MLPMemory) -> None:
    # a full disk is judged inside the swap, while the partial version still fills it (see disk.disk_errors)
    with swapped_directory(path) as tmp, disk_errors(path, RESUME_HINT, written=tmp):
        write_pretrained(memory, tmp)


def _save_last(path: Path, memory: MLPMemory, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    with swapped_directory(path) as tmp, disk_errors(path, RESUME_HINT, written=tmp):
        write_pretrained(memory, tmp)
        save_state(tmp / STATE_NAME, {"optimizer": opt.state_dict(), **state})
        fault_point("train.checkpoint")  # written, not yet switched in


def _load_last(path: Path, memory: MLPMemory, opt: torch.optim.Optimizer, fp: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = read_state(path, "model.safetensors", fp, "training", "seed or train rows", "train")
    weights = load_file(str(path / "model.safetensors"))
    check_state_dict(memory, weights, where=str(path))
    memory.load_state_dict(weights)
    opt.load_state_dict(state.pop("optimizer"))
    return state


def _rows_hash(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- step and evaluation

def _step_loss(
    memory: MLPMemory, source: InputSource, targets: Targets, pos: np.ndarray, alpha: float, bf16: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss, kl, ce over ``pos`` (sorted first: memmap reads go faster in file order; the mean is unaffected)."""
    pos = np.sort(pos)
    x = source.hidden(pos).to(device, non_blocking=True)
    ids, probs, labels = (t.to(device, non_blocking=True) for t in targets.batch(pos))
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = memory(x)
    out = memory_loss(logits, ids, probs, labels, alpha)  # float32, outside autocast
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


class _MemoryTask:
    """The memory's part of the :class:`TrainLoop`: a step on this rank's slice of the step's positions, validation
    on ``val_rows``, and the memory's checkpoint files."""

    def __init__(self, memory: MLPMemory, opt: torch.optim.Optimizer, source: InputSource, targets: Targets,
                 val_rows: np.ndarray, plan: BatchPlan, cfg: TrainConfig, out_dir: Path, fp: str,
                 world_size: int, rank: int):
        self.memory, self.opt, self.source, self.targets = memory, opt, source, targets
        self.val_rows, self.plan, self.cfg, self.out_dir, self.fp = val_rows, plan, cfg, out_dir, fp
        self.world_size, self.rank = world_size, rank
        self.device = next(memory.parameters()).device

    def step(self, step: int) -> StepOut:
        glob = self.plan.positions(step)
        mine = np.sort(np.array_split(glob, self.world_size)[self.rank] if is_distributed(self.world_size) else glob)
        loss, kl, ce = _step_loss(self.memory, self.source, self.targets, mine, self.cfg.alpha, self.cfg.bf16,
                                  self.device)
        # scale to a share of the global mean: summed over ranks the gradients equal single-process training
        share = len(mine) / len(glob)
        (loss * share).backward()
        return StepOut(torch.stack([loss.detach(), kl, ce]) * share, positions=mine, rank_loss=loss)

    def evaluate(self, step: int) -> dict[str, float] | None:
        if len(self.val_rows) == 0:
            return None
        return evaluate(self.memory, self.source, self.targets, self.val_rows, self.cfg, self.world_size, self.rank)

    def save_best(self, path: Path, step: int, record: dict[str, float]) -> None:
        _save_best(path, self.memory)  # weights first, then the pointer: best.json never names missing weights
        atomic_write_json(self.out_dir / "best.json", {"step": step, "val_loss": record["loss"],
                                                       "val_kl": record["kl"], "val_ce": record["ce"],
                                                       "select_by": self.cfg.select_by,
                                                       "value": record[self.cfg.select_by]})

    def save_last(self, path: Path, state: dict[str, Any]) -> None:
        _save_last(path, self.memory, self.opt, state)

    def load_last(self, path: Path) -> dict[str, Any]:
        return _load_last(path, self.memory, self.opt, self.fp)

    def units(self, step: int) -> int:
        return step * self.cfg.batch_size

    def epoch(self, step: int) -> float:
        return self.plan.epoch_of(step)


# ----------------------------------------------------------------------------- training

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
    out_dir = Path(out_dir)
    total = total_steps(cfg, len(train_rows))
    plan = plan or BatchPlan(train_rows, cfg.batch_size, seed)
    opt = make_optimizer(memory, cfg)
    # seed is fingerprinted on its own (the one in use); select_by only when not the default (see fingerprinted)
    trajectory = {k: v for k, v in cfg.fingerprinted().items() if k not in ("eval_every", "save_every", "log_every")}
    fp = fingerprint(trajectory, seed, _rows_hash(train_rows), memory.config.to_dict())
    spec = LoopSpec(out_dir=out_dir, total=total, seed=seed, fingerprint=fp,
                    lr_at=functools.partial(lr_at, cfg=cfg, total=total), grad_clip=cfg.grad_clip,
                    eval_every=cfg.eval_every, save_every=cfg.save_every, log_every=cfg.log_every,
                    stat_names=("loss", "kl", "ce"), select_by=cfg.select_by, train_loss="step",
                    what="training", flags="train", desc="train memory", unit="pos", resume_hint=RESUME_HINT,
                    trace="train")
    task = _MemoryTask(memory, opt, source, targets, val_rows, plan, cfg, out_dir, fp, world_size, rank)
    loop = TrainLoop(memory, opt, spec, task, world_size, rank)
    loop.resume()
    res = loop.run(on_step=on_step)
    return {
        "steps": res.steps,
        "best_step": res.best_step,
        # the validation loss of the chosen checkpoint, whichever criterion chose it
        "best_val_loss": res.best_record.get("loss", res.best_val),
        "best_val_ce": res.best_record.get("ce"),
        "select_by": cfg.select_by,  # the criterion that chose it, and its value there
        "best_val_criterion": res.best_val,
        "final_train_loss": res.train_loss,
        "tokens_per_s": res.units_per_s,
    }
