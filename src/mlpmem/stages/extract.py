"""Stage `extract`: the kNN-LM datastore of the frozen base LM over the train split.

Row t of the datastore is position t of the train stream: ``keys[t]`` = the hidden state captured at the hook
point (default: the last decoder layer's pre-FFN norm output) while the LM reads token t with the window plan's
context, and ``vals[t]`` = token t + 1 (the next token, int32). Rows are split into shards over contiguous
window groups planned up front; under torchrun each process writes its own shards (nothing is gathered) and the
manifest only lists them. Only the decoder body up to the hook runs: no LM head, no later layers.

Resume: per shard, the number of finished windows is persisted after the keys are flushed; a rerun continues
from there and produces files identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mlpmem.artifacts import DATA, DATASTORE, DATASTORE_VAL, base_model, invalidate, load_split, should_skip, \
    verify_chain, write_manifest
from mlpmem.components.capture import resolve_hook
from mlpmem.components.data import plan_windows, shard_windows
from mlpmem.components.extraction import extract_keys, reopen_keys
from mlpmem.components.lm import LoadedLM, check_context, load_lm
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import Progress, atomic_write_json, fingerprint, read_json
from mlpmem.runtime import barrier, dist_info, fault_point
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)

FLUSH_EVERY = 8  # batches between checkpoints of a shard's progress


def extract_fingerprint(cfg: Config, lm: LoadedLM, hook: str, data_fp: str) -> str:
    return fingerprint("extract", lm.identity["fingerprint"], data_fp, cfg.model.dtype, hook,
                       cfg.window.context, cfg.window.stride, cfg.extract.shards)


def extract_shard(lm: LoadedLM, hook, tokens: np.ndarray, windows, out: Path, shard: int, n_shards: int,
                  batch_size: int, fp: str, split: str = "train") -> dict:
    """Write keys/vals of one shard (:func:`mlpmem.components.extraction.extract_keys`), resumable: the windows
    done are recorded in ``.progress-SSSSS.json`` after every flush of the keys (every FLUSH_EVERY batches), and
    ``.shard-SSSSS.json`` marks the shard finished."""
    prog = Progress(out / f".progress-{shard:05d}.json", fp)

    def flushed(done_w: int) -> None:
        prog.update(done_w)
        fault_point("extract.flush")

    info = extract_keys(lm, hook, tokens, windows, out, shard, n_shards, batch_size, split=split, done=prog.done,
                        flush_every=FLUSH_EVERY, on_flush=flushed)
    atomic_write_json(out / f".shard-{shard:05d}.json", {"fingerprint": fp, **info})
    prog.clear()
    return info


def _shard_whole(out: Path, sm: dict) -> bool:
    """Whether a finished shard's files are still there whole (a deleted or truncated one is extracted again)."""
    rows = sm["stop"] - sm["start"]
    try:
        vals = np.load(out / sm["vals"], mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return vals.shape == (rows,) and reopen_keys(out / sm["keys"], rows) is not None


def run(cfg: Config, lm: LoadedLM | None = None) -> dict:
    """Datastore over the train split, plus the keys of the first --train.val_positions validation positions
    (the memory's validation inputs) in ``datastore/validation``."""
    mcfg, model_up = base_model(cfg)
    lm = lm or load_lm(mcfg)
    check_context(lm, cfg.window.context)
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    m = _extract_split(cfg, lm, hook, "train", cfg.run_dir / DATASTORE, None, model_up)
    _extract_split(cfg, lm, hook, "validation", cfg.run_dir / DATASTORE_VAL, cfg.train.val_positions, model_up)
    return m


def _extract_split(cfg: Config, lm: LoadedLM, hook, split: str, out: Path, max_positions: int | None,
                   model_up: dict) -> dict:
    dist = dist_info()
    data_m = verify_chain(cfg.run_dir, DATA, "prepare")
    upstream = {DATA: data_m["fingerprint"], **model_up}
    fp = fingerprint(extract_fingerprint(cfg, lm, str(hook), data_m["fingerprint"]), split, max_positions)
    done = should_skip(out, "extract", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        return done
    tokens, _ = load_split(cfg.run_dir, split, lm.identity["tokenizer_hash"])
    if max_positions is not None:
        tokens = tokens[: max_positions + 1]
    windows = plan_windows(len(tokens), cfg.window.context, cfg.window.stride)
    n_shards = max(cfg.extract.shards, dist.world_size) if split == "train" else 1
    if n_shards % dist.world_size and split == "train":
        raise StageError(f"--extract.shards {n_shards} must be a multiple of the {dist.world_size} processes")
    groups = shard_windows(windows, n_shards)
    if not all(groups):  # more shards than windows (or very uneven windows): a shard would hold no rows
        raise StageError(f"--extract.shards {n_shards}: the {split} split has only {len(windows)} windows "
                         f"({len(tokens)} tokens), too few for {n_shards} non-empty shards; use fewer shards")
    if dist.is_main:
        invalidate(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    mine = range(dist.rank, n_shards, dist.world_size) if split == "train" else ([0] if dist.is_main else [])
    for s in mine:
        marker = out / f".shard-{s:05d}.json"
        sm = read_json(marker)
        if sm and sm.get("fingerprint") == fp and not cfg.force and _shard_whole(out, sm):
            log.info("extract: %s shard %d already complete", split, s)
            continue
        marker.unlink(missing_ok=True)
        extract_shard(lm, hook, tokens, groups[s], out, s, n_shards, cfg.window.batch_size, fp, split)
    barrier()
    if not dist.is_main:
        return {}
    shards = [read_json(out / f".shard-{s:05d}.json") for s in range(n_shards)]
    if any(sm is None or sm.get("fingerprint") != fp for sm in shards):
        raise StageError(f"extract: some shards in {out} are missing; rerun `mlpmem extract`")
    n = len(tokens) - 1
    width = int(np.load(out / shards[0]["keys"], mmap_mode="r").shape[1])
    secs = sum(sm["seconds"] for sm in shards)
    save_stage_config(cfg, "extract", out)
    return write_manifest(
        out, "extract", fp, upstream, nested=("validation",), split=split, model=lm.identity, dtype=cfg.model.dtype,
        hook=str(hook), dim=width,
        key_dtype="float16", val_dtype="int32", n_positions=n, window=cfg.to_dict()["window"],
        data_fingerprint=data_m["fingerprint"],
        shards=[{k: sm[k] for k in ("start", "stop", "keys", "vals")} for sm in shards],
        bytes=sum((out / sm["keys"]).stat().st_size + (out / sm["vals"]).stat().st_size for sm in shards),
        # per process: rows computed / seconds, summed over shards (a resumed shard counts only its own work)
        tokens_per_s=round(sum(sm.get("computed", 0) for sm in shards) / secs, 1) if secs else None)
