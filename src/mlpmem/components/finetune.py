"""Fine-tuning a causal LM on a token stream (all weights, or LoRA adapters through peft), independent of the run
directory: it gets token arrays, a :class:`FinetuneConfig` and a directory for its checkpoints.

The train stream is cut into the same sliding windows as extraction and evaluation
(:func:`mlpmem.components.data.plan_windows`), and the loss of a window is the next-token cross-entropy on its
scored positions ``[score_from, end)`` only: one pass over the windows trains on every train position exactly once,
each with at least ``context - stride`` tokens of context, as evaluation scores it. The loop is
:class:`mlpmem.components.loop.TrainLoop` (as for the memory): this module supplies the step (the windows of step s
a pure function of (seed, s), a :class:`BatchPlan` over window indices; the loss accumulated over micro-batches)
and the validation. So a resumable checkpoint (``last/``) needs only the trainable tensors (safetensors), the AdamW
state and the step, and a run killed after a checkpoint ends bit-identical (CPU, fp32) to an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mlpmem.components.data import Window, batch_windows, plan_windows
from mlpmem.components.loop import STATE_NAME, BatchPlan, CheckpointMismatch, LoopSpec, StepOut, TrainLoop, \
    is_distributed, lr_at, make_optimizer, read_state, save_state, show, total_steps
from mlpmem.config import FinetuneConfig
from mlpmem.errors import ConfigError
from mlpmem.disk import disk_errors
from mlpmem.files import atomic_write_json, fingerprint, read_json, swapped_directory
from mlpmem.runtime import fault_point

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
    state = read_state(path, WEIGHTS_NAME, fp, "fine-tuning", "seed, base model or train tokens", "finetune")
    _load_trainable(model, path)
    opt.load_state_dict(state.pop("optimizer"))
    return state


def _tokens_hash(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the loop

class _FinetuneTask:
    """Fine-tuning's part of the :class:`TrainLoop`: a step on this rank's slice of the step's windows
    (``micro_batch`` per forward), validation on ``val_wins``, and the trainable tensors' checkpoint files."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, train_tokens: np.ndarray,
                 windows: list[Window], val_tokens: np.ndarray, val_wins: list[Window], plan: BatchPlan,
                 step_tokens: np.ndarray, micro_batch: int, fp: str, world_size: int, rank: int):
        self.model, self.opt, self.fp = model, opt, fp
        self.train_tokens, self.windows, self.val_tokens, self.val_wins = train_tokens, windows, val_tokens, val_wins
        self.plan, self.micro_batch, self.world_size, self.rank = plan, micro_batch, world_size, rank
        self.step_tokens = step_tokens
        self.seen = np.concatenate([[0], np.cumsum(step_tokens)])  # scored positions of steps [0, s)
        self.n_pos = len(train_tokens) - 1
        self.device = next(model.parameters()).device

    def step(self, step: int) -> StepOut:
        glob = self.plan.positions(step)
        mine = np.array_split(glob, self.world_size)[self.rank] if is_distributed(self.world_size) else glob
        n_glob = int(self.step_tokens[step])
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for i in range(0, len(mine), self.micro_batch):
            group = [self.windows[w] for w in mine[i:i + self.micro_batch]]
            loss, _ = window_loss(self.model, self.train_tokens, group, self.device)
            (loss / n_glob).backward()  # a share of the global mean: summed over ranks it is the mean
            loss_sum += loss.detach()
        return StepOut(loss_sum.reshape(1), count=n_glob)

    def evaluate(self, step: int) -> dict[str, float]:
        v = validation_loss(self.model, self.val_tokens, self.val_wins, self.micro_batch, self.world_size, self.rank)
        return {"loss": v, "ppl": math.exp(min(v, 700.0))}

    def save_best(self, path: Path, step: int, record: dict[str, float]) -> None:
        _save_best(path, self.model, {"step": step, "val_loss": record["loss"]})

    def save_last(self, path: Path, state: dict[str, Any]) -> None:
        _save_last(path, self.model, self.opt, state)

    def load_last(self, path: Path) -> dict[str, Any]:
        return _load_last(path, self.model, self.opt, self.fp)

    def units(self, step: int) -> int:
        return int(self.seen[step])

    def epoch(self, step: int) -> float:
        return int(self.seen[step]) / self.n_pos


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
    out_dir = Path(out_dir)
    total = total_steps(cfg, len(windows))
    plan = BatchPlan(np.arange(len(windows), dtype=np.int64), cfg.batch_size, seed)
    scored = np.array([w.end - w.score_from for w in windows], dtype=np.int64)
    # scored positions of each step's global batch: a pure function of the step, like the batch itself
    step_tokens = np.array([scored[plan.positions(s)].sum() for s in range(total)], dtype=np.int64)
    opt = make_optimizer(model, cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model: has no trainable parameters (pass it through make_trainable)")
    trajectory = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    fp = fingerprint(trajectory, seed, context, stride, world_size, _tokens_hash(train_tokens),
                     _tokens_hash(val_tokens), shapes, identity)
    spec = LoopSpec(out_dir=out_dir, total=total, seed=seed, fingerprint=fp,
                    lr_at=functools.partial(lr_at, cfg=cfg, total=total), grad_clip=cfg.grad_clip,
                    eval_every=cfg.eval_every, save_every=cfg.save_every, log_every=None, stat_names=("loss",),
                    select_by="loss", train_loss="log", units_key="tokens", what="fine-tuning", flags="finetune",
                    desc=f"finetune ({cfg.mode})", unit="tok", resume_hint=RESUME_HINT)
    task = _FinetuneTask(model, opt, train_tokens, windows, val_tokens, val_wins, plan, step_tokens, micro_batch,
                         fp, world_size, rank)
    loop = TrainLoop(model, opt, spec, task, world_size, rank)
    st = loop.resume()
    if loop.step == 0:  # the base model, so the gain is visible; not a candidate for best (that would undo training)
        base = loop.validate(0, select=False)
        assert base is not None  # fine-tuning always validates
        base_val = base["loss"]
        log.info("finetune: base model validation loss %s (ppl %s)", show(base_val),
                 show(math.exp(min(base_val, 700)), ".2f"))
    else:
        base_val = float(st["base_val_loss"])
    res = loop.run(extra_state={"base_val_loss": base_val}, on_step=on_step)

    best_step, best_val = res.best_step, res.best_val
    best = out_dir / "best"
    if is_distributed(world_size):
        dist.barrier()  # rank 0 has written best/ before the others read it
    if (best / WEIGHTS_NAME).is_file():  # always, after the final validation; its record is the authority
        _load_trainable(model, best)
        info = read_json(best / "best.json") or {}
        best_step, best_val = int(info.get("step", best_step)), float(info.get("val_loss", best_val))
    model.eval()
    if best_val > base_val:
        log.warning("finetune: the best fine-tuned validation loss %s is above the base model's %s (lower "
                    "--finetune.lr?)", show(best_val), show(base_val))
    return {
        "steps": res.steps,
        "tokens": task.units(res.steps),
        "epochs": task.epoch(res.steps),
        "train_positions": task.n_pos,
        "train_windows": len(windows),
        "val_windows": len(val_wins),
        "val_positions": int(sum(w.end - w.score_from for w in val_wins)),
        "base_val_loss": base_val,
        "best_step": best_step,
        "best_val_loss": best_val,
        "final_train_loss": res.train_loss,
        "tokens_per_s": res.units_per_s,
        "seconds": res.seconds,
    }
