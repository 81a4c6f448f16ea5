"""The training loop shared by the memory trainer (:mod:`.trainer`) and LM fine-tuning (:mod:`.finetune`).

A caller supplies what differs, its step and its validation (a :class:`LoopTask`); :class:`TrainLoop` does the
rest, so both train, resume and fail alike:

- resume from ``out_dir/last`` (the task's reader checks the fingerprint) and cut ``metrics.jsonl`` back to it;
- each step: its learning rate, dropout reseeded from (seed, step, rank), gradients summed over ranks, clipped,
  watched for divergence, the optimizer step;
- at the log / eval / save boundaries: a metrics line, a validation pass that may switch in a new ``best``, the
  resumable ``last`` (rank 0 writes, every rank waits); nothing is written after a diverged step;
- the MLPMEM_TRACE step trace and a progress bar with its throughput.

Determinism is by construction: the caller's batch of step s is a pure function of (seed, s) (:class:`BatchPlan`),
dropout is reseeded at every step and the learning rate is a pure function of the step. So a resumable checkpoint
needs only the trainable weights, the AdamW state and the step, and a run killed after a checkpoint and rerun ends
bit-identical (on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist

from mlpmem.config import FinetuneConfig, TrainConfig
from mlpmem.disk import disk_errors
from mlpmem.errors import DivergedError, StageError
from mlpmem.files import atomic_file, atomic_write_text
from mlpmem.runtime import progress

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"  # step, best so far, optimizer state: what a resumed run needs besides the weights


# ----------------------------------------------------------------------------- schedule

def total_steps(cfg: TrainConfig | FinetuneConfig, n_train: int) -> int:
    """Optimizer steps of a run: ``cfg.max_steps``, else ``cfg.epochs`` passes over ``n_train`` items."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))


def lr_at(step: int, cfg: TrainConfig | FinetuneConfig, total: int) -> float:
    """Learning rate of 0-based step ``step``: linear warm-up to cfg.lr, then linear decay towards 0 at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps  # +1: the first step already learns
    return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


class BatchPlan:
    """Global batch positions of step s as a pure function of (seed, s): one stream over ``train_rows``, epoch e
    visiting them in the order ``Generator(seed + e).permutation``, cut into consecutive batches of ``batch_size``
    (a batch may straddle two epochs, so every step has the same size). Caches one epoch's permutation."""

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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig | FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad (fused where the device supports it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def is_distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------- checkpoints and metrics

class CheckpointMismatch(StageError, ValueError):
    """A resume checkpoint made by other settings."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a Python file: a full disk then keeps its OSError (ENOSPC) in the exception chain, where
    torch's own file writer would leave only a RuntimeError ("unexpected pos ...")."""
    with atomic_file(path) as f:
        torch.save(state, f)


def read_state(path: Path, weights: str, fp: str, what: str, inputs: str, command: str) -> dict[str, Any]:
    """The resume state in checkpoint ``path`` (:data:`STATE_NAME`; its optimizer state still in it), once its
    ``weights`` file is there too and it was written by the run of fingerprint ``fp``. Messages name the run
    (``what``: "training"), what else the fingerprint covers (``inputs``) and the command whose --force deletes it."""
    missing = [n for n in (weights, STATE_NAME) if not (path / n).is_file()]
    if missing:
        raise StageError(f"resume checkpoint {path} is incomplete: missing {', '.join(missing)}; delete it to "
                         f"restart {what}")
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)  # tensors and plain data only
    if state.get("fingerprint") != fp:
        raise CheckpointMismatch(f"resume checkpoint {path} was written with other {what} settings, {inputs} "
                                 f"(fingerprint {state.get('fingerprint')} != {fp}): delete {path} "
                                 f"(`mlpmem {command} --force` does) or choose another out_dir")
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


def show(x: float | None, fmt: str = ".4f") -> str:
    """A number for a log line or a progress bar: "-" where there is none yet (no step, no validation)."""
    return format(x, fmt) if x is not None and math.isfinite(x) else "-"


# ----------------------------------------------------------------------------- watch and trace

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


class StepTrace:
    """Test hook, off unless MLPMEM_TRACE names a directory: each rank appends one JSON line per training step to
    ``<dir>/<name>-rank<r>.jsonl`` with the positions its loss was actually computed on and that loss (this rank's
    mean, before the gradient all-reduce), so a test sees what every rank really trained on."""

    ENV = "MLPMEM_TRACE"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def from_env(cls, name: str, rank: int) -> StepTrace | None:
        d = os.environ.get(cls.ENV)
        if not d:
            return None  # then steps pay nothing (no .item(), no .tolist())
        Path(d).mkdir(parents=True, exist_ok=True)
        return cls(Path(d) / f"{name}-rank{rank}.jsonl")

    def record(self, step: int, pos: np.ndarray, loss: torch.Tensor) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "positions": pos.tolist(), "loss": loss.item()}) + "\n")


# ----------------------------------------------------------------------------- the loop

@dataclass
class StepOut:
    """What a task's step computed on this rank, its gradients already accumulated by ``backward``.

    sums: (k,) float32, this rank's share of the step's statistics (loss first, then ``LoopSpec.stat_names[1:]``);
    the loop sums them over ranks and divides by ``count`` (e.g. the global batch's scored positions; 1 when the
    shares are already fractions of the global mean). positions / rank_loss: what MLPMEM_TRACE records (the rows
    this rank's loss was computed on, and that loss before the all-reduce); None: the step is not traced."""

    sums: torch.Tensor
    count: float = 1.0
    positions: np.ndarray | None = None
    rank_loss: torch.Tensor | None = None


class LoopTask(Protocol):
    """What a caller of :class:`TrainLoop` supplies: its step, its validation and its checkpoint files."""

    def step(self, step: int) -> StepOut:
        """Forward + backward of this rank's share of the global batch of 0-based ``step``, gradients scaled so
        that summed over ranks they are those of the global mean loss."""
        ...

    def evaluate(self, step: int) -> dict[str, float] | None:
        """The validation record after ``step`` steps (every rank calls it), or None when there is nothing to
        validate on."""
        ...

    def save_best(self, path: Path, step: int, record: dict[str, float]) -> None:
        """Write the current weights as the best ones (rank 0), ``record`` being their validation record."""
        ...

    def save_last(self, path: Path, state: dict[str, Any]) -> None:
        """Write the resumable checkpoint: the trainable weights, the optimizer state and ``state`` (rank 0)."""
        ...

    def load_last(self, path: Path) -> dict[str, Any]:
        """Load what :meth:`save_last` wrote into the model and the optimizer; return its ``state``."""
        ...

    def units(self, step: int) -> int:
        """Positions (or tokens) trained in steps ``[0, step)``: the progress bar's and the throughput's unit."""
        ...

    def epoch(self, step: int) -> float:
        """Passes over the train data after ``step`` steps."""
        ...


@dataclass(frozen=True)
class LoopSpec:
    """The loop's settings. ``log_every`` None: a metrics line at every eval and save boundary. ``select_by``: the
    key of the validation record that picks the best step (lowest). ``train_loss``: the train loss a checkpoint and
    the summary report, the last step's ("step") or the mean over the steps of the last metrics line ("log").
    ``units_key``: a name under which metrics lines also record :meth:`LoopTask.units`. ``what`` / ``flags`` name
    the run and its config section in messages, ``trace`` its MLPMEM_TRACE file (None: not traced)."""

    out_dir: Path
    total: int
    seed: int
    fingerprint: str
    lr_at: Callable[[int], float]
    grad_clip: float
    eval_every: int
    save_every: int
    log_every: int | None = None
    stat_names: tuple[str, ...] = ("loss",)
    select_by: str = "loss"
    train_loss: Literal["step", "log"] = "step"
    units_key: str | None = None
    what: str = "training"
    flags: str = "train"
    desc: str = "train"
    unit: str = "pos"
    resume_hint: str = "free space and rerun the same command: training resumes from the last checkpoint"
    trace: str | None = None


@dataclass
class LoopResult:
    steps: int
    start_step: int
    best_val: float  # the best value of the criterion select_by (inf: never validated)
    best_step: int  # -1: never validated
    best_record: dict[str, float] = field(default_factory=dict)
    train_loss: float = math.nan
    seconds: float = 0.0
    units: int = 0  # trained in this call

    @property
    def units_per_s(self) -> float:
        return self.units / self.seconds if self.units else 0.0


class TrainLoop:
    """Trains ``model``'s trainable parameters with ``opt`` on ``task``'s steps; see the module docstring.

    Use: ``loop.resume()`` (the resumed state, or {}), optionally ``loop.validate(0, select=False)`` for a reference
    before training, then ``loop.run()``. Under torch.distributed with ``world_size > 1`` every rank runs it; rank 0
    alone writes ``out_dir/metrics.jsonl``, ``best`` and ``last``."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, spec: LoopSpec, task: LoopTask,
                 world_size: int = 1, rank: int = 0):
        self.model, self.opt, self.spec, self.task = model, opt, spec, task
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next(model.parameters()).device
        self.ddp, self.rank, self.world_size = is_distributed(world_size), rank, world_size
        self.main = rank == 0
        self.out_dir = Path(spec.out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.step, self.best_val, self.best_step, self.train_loss = 0, math.inf, -1, math.nan
        self.best_record: dict[str, float] = {}
        # the stats and grad_norm summed since the last metrics line; on the device so steps never wait for .item()
        self.acc = torch.zeros(len(spec.stat_names) + 1, dtype=torch.float32, device=self.device)
        self.acc_steps = 0

    def resume(self) -> dict[str, Any]:
        """Load ``out_dir/last`` if there is one, drop the metrics lines written after it, and start every rank from
        rank 0's weights. Returns the checkpoint's state ({} when starting afresh)."""
        last_dir = self.out_dir / "last"
        st: dict[str, Any] = {}
        if last_dir.exists():
            st = self.task.load_last(last_dir)
            self.step, self.best_val, self.best_step = int(st["step"]), float(st["best_val_loss"]), int(st["best_step"])
            self.best_record = dict(st.get("best_record") or {})
            self.train_loss = float(st.get("train_loss", math.nan))
            acc = st.get("log_acc")  # steps since the last metrics line before the checkpoint: the next line has them
            if acc is not None:
                self.acc += torch.tensor(acc["sums"], dtype=torch.float32, device=self.device)
                self.acc_steps = int(acc["steps"])
            log.info("%s: resuming from %s at step %d/%d", self.spec.desc, last_dir, self.step, self.spec.total)
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.step:
                truncate_metrics(self.metrics_path, self.step)  # the lines a failed or killed run wrote after it
            else:
                self.metrics_path.unlink(missing_ok=True)  # it failed before its first checkpoint: start over
        if self.ddp:  # every rank starts from rank 0's weights (they differ when ranks initialised with other seeds)
            for p in self.params:
                dist.broadcast(p.data, src=0)
        return st

    def log_line(self, rec: dict[str, Any]) -> None:
        """Append one metrics line (rank 0), leaving out values that are not finite numbers (none yet)."""
        if self.main:  # a line cut short by a full disk is dropped on resume, with the others after the checkpoint
            rec = {k: v for k, v in rec.items() if not (isinstance(v, float) and not math.isfinite(v))}
            with disk_errors(self.metrics_path, self.spec.resume_hint), open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def validate(self, step: int, select: bool = True) -> dict[str, float] | None:
        """Score the task's validation data after ``step`` steps and log it; with ``select``, a new lowest
        ``select_by`` becomes ``best`` (weights first, inside the task's writer)."""
        rec = self.task.evaluate(step)
        if rec is None:
            return None
        self.log_line({"step": step, "epoch": self.task.epoch(step), "split": "validation", **rec})
        if select and rec[self.spec.select_by] < self.best_val:
            self.best_val, self.best_step, self.best_record = rec[self.spec.select_by], step, dict(rec)
            if self.main:
                self.task.save_best(self.out_dir / "best", step, rec)
        return rec

    def run(self, extra_state: dict[str, Any] | None = None,
            on_step: Callable[[int], None] | None = None) -> LoopResult:
        """Train from the current step to ``spec.total``. ``extra_state`` joins every checkpoint's state;
        ``on_step(step)`` runs after each finished step (1-based, after any checkpoint), e.g. to stop a test run."""
        spec, task = self.spec, self.task
        self.model.train()
        bar = progress(total=task.units(spec.total), initial=task.units(self.step), unit=spec.unit,
                       unit_scale=True, desc=spec.desc, show=self.main)
        diverged = DivergenceWatch(self.device, spec.what, spec.flags)
        trace = StepTrace.from_env(spec.trace, self.rank) if spec.trace else None
        start_step, last = self.step, None
        t0 = t_log = time.perf_counter()
        fork_devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=fork_devices):  # reseeding dropout must not leak into the caller's RNG
                while self.step < spec.total:
                    last = self._train_step(self.step, diverged, trace)
                    step = self.step = self.step + 1
                    bar.update(task.units(step) - task.units(step - 1))
                    at_eval = step % spec.eval_every == 0 or step == spec.total
                    at_save = step % spec.save_every == 0 or step == spec.total
                    at_log = step == spec.total or (step % spec.log_every == 0 if spec.log_every
                                                    else at_eval or at_save)
                    if at_log or at_eval or at_save:
                        diverged.check(spec.lr_at)
                    if at_log:
                        t_log = self._log_train(step, bar, t_log)
                    if at_eval:
                        self.validate(step)
                    if at_save:
                        self._checkpoint(step, last, extra_state or {})
                    if on_step is not None:
                        on_step(step)
        finally:
            bar.close()
        if spec.train_loss == "step" and last is not None:
            self.train_loss = last.item()
        seconds = time.perf_counter() - t0
        return LoopResult(steps=self.step, start_step=start_step, best_val=self.best_val, best_step=self.best_step,
                          best_record=self.best_record, train_loss=self.train_loss, seconds=seconds,
                          units=task.units(self.step) - task.units(start_step))

    def _train_step(self, step: int, diverged: DivergenceWatch, trace: StepTrace | None) -> torch.Tensor:
        """One optimizer step of 0-based ``step``; returns its loss (global mean, on the device)."""
        lr = self.spec.lr_at(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        torch.manual_seed((self.spec.seed * 1_000_003 + step) * max(self.world_size, 1) + self.rank)
        self.opt.zero_grad(set_to_none=True)
        out = self.task.step(step)
        if trace is not None and out.positions is not None and out.rank_loss is not None:
            trace.record(step + 1, out.positions, out.rank_loss)
        stats = out.sums.detach()
        if self.ddp:
            for p in self.params:
                if p.grad is None:  # a rank without data this step still joins the all-reduce
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            dist.all_reduce(stats)
        stats = stats / out.count
        clip = self.spec.grad_clip if self.spec.grad_clip > 0 else math.inf  # inf: measure the norm, scale by 1
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        diverged.update(step + 1, stats[0], gnorm)
        self.opt.step()
        self.acc += torch.cat([stats, gnorm.detach().float().reshape(1)])
        self.acc_steps += 1
        return stats[0]

    def _log_train(self, step: int, bar, t_log: float) -> float:
        """The metrics line of the steps since the last one (none: no line); returns its time."""
        now = time.perf_counter()
        if not self.acc_steps:
            return now
        spec, task = self.spec, self.task
        lr = spec.lr_at(step - 1)
        a = (self.acc / self.acc_steps).tolist()
        rec = {"step": step, "epoch": task.epoch(step), "lr": lr, **dict(zip(spec.stat_names, a)), "grad_norm": a[-1]}
        if spec.units_key:
            rec[spec.units_key] = task.units(step)
        rec["tokens_per_s"] = (task.units(step) - task.units(step - self.acc_steps)) / max(now - t_log, 1e-9)
        self.log_line(rec)
        bar.set_postfix(loss=show(a[0]), lr=f"{lr:.2e}")
        self.acc.zero_()
        self.acc_steps = 0
        if spec.train_loss == "log":
            self.train_loss = a[0]
        return now

    def _checkpoint(self, step: int, last: torch.Tensor, extra_state: dict[str, Any]) -> None:
        if self.spec.train_loss == "step":
            self.train_loss = last.item()
        if self.main:
            # best_val_loss holds the criterion's value (the loss unless select_by says otherwise)
            self.task.save_last(self.out_dir / "last", {
                "step": step, "best_val_loss": self.best_val, "best_step": self.best_step,
                "best_record": self.best_record, "fingerprint": self.spec.fingerprint, "total_steps": self.spec.total,
                "seed": self.spec.seed, "train_loss": self.train_loss,
                "log_acc": {"sums": self.acc.tolist(), "steps": self.acc_steps}, **extra_state})
        if self.ddp:
            dist.barrier()
