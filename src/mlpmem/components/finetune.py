"""Fine-tuning a causal LM on a token stream (all weights, or LoRA adapters through peft), independent of the run
directory: it gets token arrays, a :class:`FinetuneConfig` and a directory for its checkpoints.

The train stream is cut into the same sliding windows as extraction and evaluation
(:func:`mlpmem.components.data.plan_windows`), and the loss of a window is the next-token cross-entropy on its
scored positions ``[score_from, end)`` only: one pass over the windows trains on every train position exactly once,
each with at least ``context - stride`` tokens of context, as evaluation scores it. Determinism follows
:mod:`mlpmem.components.trainer` (whose schedule, batch plan and checkpoint helpers it reuses):

- the windows of step s are a pure function of (seed, s) (:class:`BatchPlan` over window indices);
- dropout (the model's and LoRA's) is reseeded from (seed, step, rank) at every step;
- the learning rate is a pure function of the step.

So a resumable checkpoint (``last/``) needs only the trainable tensors (safetensors), the AdamW state and the step,
and a run killed after a checkpoint ends bit-identical (CPU, fp32) to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mlpmem.components.data import Window, batch_windows, plan_windows
from mlpmem.components.trainer import STATE_NAME, BatchPlan, CheckpointMismatch, DivergenceWatch, is_distributed, \
    lr_at, make_optimizer, save_state, total_steps, truncate_metrics
from mlpmem.config import FinetuneConfig
from mlpmem.errors import ConfigError, StageError
from mlpmem.disk import disk_errors
from mlpmem.files import atomic_write_json, fingerprint, read_json, swapped_directory
from mlpmem.runtime import fault_point, progress

log = logging.getLogger(__name__)

WEIGHTS_NAME = "trainable.safetensors"  # the trainable tensors only (all weights, or the LoRA A/B matrices)
IGNORE = -100  # label of unscored and padded positions (torch's cross_entropy ignore_index)
# what a checkpoint that failed for lack of disk space tells the user (the previous checkpoint is intact)
RESUME_HINT = "free space and rerun the same command: fine-tuning resumes from the last checkpoint"


# ----------------------------------------------------------------------------- what trains

def _projection_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return torch.nn.Linear, Conv1D


def projection_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear projections inside the repeated decoder blocks (names with a layer index), e.g.
    q_proj ... down_proj for Llama, c_attn, c_proj, c_fc for GPT-2; the embeddings and the LM head are outside."""
    types = _projection_types()
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, types) and any(part.isdigit() for part in name.split("."))})


def lora_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Module names LoRA adapts: ``['auto']`` -> :func:`projection_names`; else the given names, each checked to
    name at least one linear module of ``model``."""
    found = projection_names(model)
    if list(targets) == ["auto"]:
        if not found:
            raise ConfigError(f"--finetune.lora_targets auto: {type(model).__name__} has no linear projections in "
                              "numbered decoder blocks; list the module names to adapt")
        return found
    types = _projection_types()
    linear = [n for n, m in model.named_modules() if isinstance(m, types)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise ConfigError(f"--finetune.lora_targets: no linear module named {', '.join(missing)} in "
                          f"{type(model).__name__}; its decoder projections are {', '.join(found) or 'none'}")
    return list(targets)


def make_trainable(model: torch.nn.Module, cfg: FinetuneConfig, seed: int) -> torch.nn.Module:
    """The model to train: ``model`` itself with every parameter unfrozen (full), or a peft LoRA wrapper around
    it whose adapters alone train (lora; adapter init seeded by ``seed``). ``model`` may come frozen."""
    if cfg.mode == "full":
        return model.requires_grad_(True)
    if cfg.mode != "lora":
        raise ConfigError(f"--finetune.mode {cfg.mode}: nothing to train (use full or lora)")
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, cfg.lora_targets)
    conv1d = _projection_types()[1]
    # GPT-2's Conv1D stores (in, out): peft must know, else it warns and guesses
    transposed = any(isinstance(m, conv1d) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                    fan_in_fan_out=transposed, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)  # peft calls it, not us
        torch.manual_seed(seed)
        return get_peft_model(model, lc)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of the trainable parameters (tied weights once: named_parameters deduplicates)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS_NAME))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params) or any(weights[n].shape != params[n].shape for n in params):
        raise CheckpointMismatch(f"{path / WEIGHTS_NAME} holds other tensors than this model trains (another base "
                                 "model or LoRA setting?): delete it (`mlpmem finetune --force` does)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def export_model(model: torch.nn.Module, tokenizer, path: Path) -> torch.nn.Module:
    """Write ``model`` (LoRA merged into its weights, so no peft is needed to load it) and ``tokenizer`` as one
    Hugging Face model directory at ``path``, switched in whole (:func:`swapped_directory`). Returns the plain
    model (a LoRA wrapper is unloaded: merging changes the base weights in place)."""
    plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    plain.requires_grad_(False).eval()
    with swapped_directory(path) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return plain


# ----------------------------------------------------------------------------- loss over windows

def window_labels(tokens: np.ndarray, group: list[Window], T: int) -> torch.Tensor:
    """(B, T) int64 labels of a batch of windows: position t's label is token t + 1 where t is scored
    (``score_from <= t < end``), IGNORE elsewhere (context already scored by an earlier window, and padding)."""
    labels = np.full((len(group), T), IGNORE, dtype=np.int64)
    for j, w in enumerate(group):
        a = w.score_from - w.begin
        labels[j, a:w.end - w.begin] = tokens[w.score_from + 1:w.end + 1]  # the +1: position t predicts t + 1
    return torch.from_numpy(labels)


def window_loss(model: torch.nn.Module, tokens: np.ndarray, group: list[Window], device: torch.device
                ) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over the scored positions of ``group``, float32 scalar; their count)."""
    ids, mask, _ = next(batch_windows(tokens, group, len(group)))
    labels = window_labels(tokens, group, ids.shape[1]).to(device)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    keep = labels != IGNORE
    # only the scored rows go to float32: (n, V), not (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: np.ndarray, windows: list[Window], micro_batch: int,
                    world_size: int = 1, rank: int = 0) -> float:
    """Mean next-token cross-entropy (nats) over the scored positions of ``windows``, without dropout; under
    torch.distributed each rank scores its share and the sums are all-reduced."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine = list(np.array_split(np.arange(len(windows)), world_size)[rank]) if is_distributed(world_size) else \
        range(len(windows))
    mine = [windows[i] for i in mine]
    sums = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), micro_batch):
        loss, n = window_loss(model, tokens, mine[i:i + micro_batch], device)
        sums += torch.tensor([loss.item(), n], dtype=torch.float64)
    if is_distributed(world_size):
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    return sums[0].item() / max(sums[1].item(), 1.0)


# ----------------------------------------------------------------------------- checkpoints

def _save_best(path: Path, model: torch.nn.Module, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    # weights and their step/loss switch in together; a full disk is judged while the partial version fills it
    with swapped_directory(path) as tmp, disk_errors(path, RESUME_HINT, written=tmp):
        save_file(trainable_state(model), str(tmp / WEIGHTS_NAME))
        atomic_write_json(tmp / "best.json", info)


def _save_last(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with swapped_directory(path) as tmp, disk_errors(path, RESUME_HINT, written=tmp):
        save_file(trainable_state(model), str(tmp / WEIGHTS_NAME))
        save_state(tmp / STATE_NAME, {"optimizer": opt.state_dict(), **state})
        fault_point("finetune.checkpoint")  # written, not yet switched in


def _load_last(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, fp: str) -> dict[str, Any]:
    missing = [n for n in (WEIGHTS_NAME, STATE_NAME) if not (path / n).is_file()]
    if missing:
        raise StageError(f"resume checkpoint {path} is incomplete: missing {', '.join(missing)}; delete it to "
                         "restart fine-tuning")
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)  # tensors and plain data only
    if state.get("fingerprint") != fp:
        raise CheckpointMismatch(f"resume checkpoint {path} was written with other fine-tuning settings, seed, base "
                                 f"model or train tokens (fingerprint {state.get('fingerprint')} != {fp}): delete "
                                 f"{path} (`mlpmem finetune --force` does) or choose another out_dir")
    _load_trainable(model, path)
    opt.load_state_dict(state.pop("optimizer"))
    return state


def _tokens_hash(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the loop

def finetune_lm(
    model: torch.nn.Module,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    cfg: FinetuneConfig,
    context: int,
    stride: int,
    out_dir: Path,
    seed: int,
    micro_batch: int = 8,
    world_size: int = 1,
    rank: int = 0,
    identity: str = "",
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (from :func:`make_trainable`) in place on ``train_tokens``; resume from ``out_dir/last``.

    train_tokens / val_tokens: (n,) int token streams. A step trains on ``cfg.batch_size`` windows of the train
    stream (``micro_batch`` per forward, gradients accumulated); the loss is the mean cross-entropy over the
    global batch's scored positions. Under torch.distributed with ``world_size > 1`` each rank takes its slice of
    the step's windows and gradients are summed, so the update equals single-process training (but for dropout
    masks, drawn per rank; rank 0 writes ``best/``, which every rank reads back at the end). The first
    ``cfg.val_windows`` validation windows are scored before training (step 0: the base model), every
    ``cfg.eval_every`` steps and at the end; the best step by validation loss is kept in ``out_dir/best`` and
    loaded into ``model`` on return. Rank 0 writes ``out_dir/metrics.jsonl`` and a resumable ``out_dir/last``
    every ``cfg.save_every`` steps and at the end. ``identity`` (e.g. the base model's fingerprint) is part of
    the checkpoint fingerprint. ``on_step(step)`` runs after each finished step (tests stop runs with it).
    Returns a summary dict (tokens seen, steps, epochs, losses, throughput).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    if len(train_tokens) < 2 or len(val_tokens) < 2:
        raise ValueError("train_tokens / val_tokens: need at least 2 tokens each")
    windows = plan_windows(len(train_tokens), context, stride)
    val_wins = plan_windows(len(val_tokens), context, stride)[: cfg.val_windows]
    ddp = is_distributed(world_size)
    main = rank == 0
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    n_pos = len(train_tokens) - 1
    total = total_steps(cfg, len(windows))
    plan = BatchPlan(np.arange(len(windows), dtype=np.int64), cfg.batch_size, seed)
    scored = np.array([w.end - w.score_from for w in windows], dtype=np.int64)
    # scored positions of each step's global batch: a pure function of the step, like the batch itself
    step_tokens = np.array([scored[plan.positions(s)].sum() for s in range(total)], dtype=np.int64)
    opt = make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model: has no trainable parameters (pass it through make_trainable)")
    trajectory = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    fp = fingerprint(trajectory, seed, context, stride, world_size, _tokens_hash(train_tokens),
                     _tokens_hash(val_tokens), shapes, identity)
    metrics_path, last_dir = out_dir / "metrics.jsonl", out_dir / "last"

    step, best_val, best_step, base_val, last_loss = 0, math.inf, -1, math.nan, math.nan
    if last_dir.exists():
        st = _load_last(last_dir, model, opt, fp)
        step, best_val, best_step = int(st["step"]), float(st["best_val_loss"]), int(st["best_step"])
        base_val, last_loss = float(st["base_val_loss"]), float(st.get("train_loss", math.nan))
        log.info("finetune: resuming from %s at step %d/%d", last_dir, step, total)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if step:
            truncate_metrics(metrics_path, step)  # the killed run's steps after the checkpoint
        else:
            metrics_path.unlink(missing_ok=True)  # killed before its first checkpoint: start the log over
    if ddp:  # every rank starts from rank 0's weights
        for p in trainable:
            dist.broadcast(p.data, src=0)

    def log_line(rec: dict[str, Any]) -> None:
        if main:  # a line cut short by a full disk is dropped on resume, with the others after the checkpoint
            with disk_errors(metrics_path, RESUME_HINT), open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def validate(at: int) -> float:
        v = validation_loss(model, val_tokens, val_wins, micro_batch, world_size, rank)
        log_line({"step": at, "epoch": int(step_tokens[:at].sum()) / n_pos, "split": "validation", "loss": v,
                  "ppl": math.exp(min(v, 700.0))})
        return v

    if step == 0:  # the base model, so the gain is visible; not a candidate for best (that would undo training)
        base_val = validate(0)
        log.info("finetune: base model validation loss %.4f (ppl %.2f)", base_val, math.exp(min(base_val, 700)))

    bar = progress(total=int(step_tokens.sum()), initial=int(step_tokens[:step].sum()), unit="tok",
                   unit_scale=True, desc=f"finetune ({cfg.mode})", show=main)
    acc = torch.zeros(2, dtype=torch.float32, device=device)  # loss, grad_norm summed since the last log line
    acc_steps, t_log, t0, start_step = 0, time.perf_counter(), time.perf_counter(), step
    diverged = DivergenceWatch(device, "fine-tuning", "finetune")

    model.train()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):  # reseeding dropout must not leak into the caller's RNG
            while step < total:
                lr = lr_at(step, cfg, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                glob = plan.positions(step)
                mine = np.array_split(glob, world_size)[rank] if ddp else glob
                n_glob = int(step_tokens[step])
                torch.manual_seed((seed * 1_000_003 + step) * max(world_size, 1) + rank)
                opt.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), dtype=torch.float32, device=device)
                for i in range(0, len(mine), micro_batch):
                    loss, _ = window_loss(model, train_tokens, [windows[w] for w in mine[i:i + micro_batch]],
                                          device)
                    (loss / n_glob).backward()  # a share of the global mean: summed over ranks it is the mean
                    loss_sum += loss.detach()
                if ddp:
                    for p in trainable:
                        if p.grad is None:  # a rank without windows this step still joins the all-reduce
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)
                    dist.all_reduce(loss_sum)
                mean = loss_sum / n_glob
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, scale by 1
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, clip)
                diverged.update(step + 1, mean, gnorm)
                opt.step()
                step += 1
                acc += torch.stack([mean, gnorm.detach().float()])
                acc_steps += 1
                bar.update(n_glob)

                if step == total or step % cfg.eval_every == 0 or step % cfg.save_every == 0:
                    diverged.check(lambda s: lr_at(s, cfg, total))
                    now = time.perf_counter()
                    a = (acc / acc_steps).tolist()
                    seen = int(step_tokens[:step].sum())
                    log_line({"step": step, "epoch": seen / n_pos, "lr": lr, "loss": a[0], "grad_norm": a[1],
                              "tokens": seen, "tokens_per_s": int(step_tokens[step - acc_steps:step].sum())
                              / max(now - t_log, 1e-9)})
                    bar.set_postfix(loss=f"{a[0]:.4f}", lr=f"{lr:.2e}")
                    acc.zero_()
                    acc_steps, t_log, last_loss = 0, now, a[0]
                if step % cfg.eval_every == 0 or step == total:
                    v = validate(step)
                    if v < best_val:
                        best_val, best_step = v, step
                        if main:
                            _save_best(out_dir / "best", model, {"step": step, "val_loss": v})
                if step % cfg.save_every == 0 or step == total:
                    if main:
                        _save_last(last_dir, model, opt, {"step": step, "best_val_loss": best_val,
                                                          "best_step": best_step, "base_val_loss": base_val,
                                                          "train_loss": last_loss, "fingerprint": fp,
                                                          "total_steps": total, "seed": seed})
                    if ddp:
                        dist.barrier()
                if on_step is not None:
                    on_step(step)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    done_tokens = int(step_tokens[start_step:step].sum())
    best = out_dir / "best"
    if ddp:
        dist.barrier()  # rank 0 has written best/ before the others read it
    if (best / WEIGHTS_NAME).is_file():  # always, after the final validation; its record is the authority
        _load_trainable(model, best)
        info = read_json(best / "best.json") or {}
        best_step, best_val = int(info.get("step", best_step)), float(info.get("val_loss", best_val))
    model.eval()
    if best_val > base_val:
        log.warning("finetune: the best fine-tuned validation loss %.4f is above the base model's %.4f (lower "
                    "--finetune.lr?)", best_val, base_val)
    return {
        "steps": step,
        "tokens": int(step_tokens[:step].sum()),
        "epochs": int(step_tokens[:step].sum()) / n_pos,
        "train_positions": n_pos,
        "train_windows": len(windows),
        "val_windows": len(val_wins),
        "val_positions": int(sum(w.end - w.score_from for w in val_wins)),
        "base_val_loss": base_val,
        "best_step": best_step,
        "best_val_loss": best_val,
        "final_train_loss": last_loss,
        "tokens_per_s": done_tokens / elapsed if done_tokens else 0.0,
        "seconds": elapsed,
    }
