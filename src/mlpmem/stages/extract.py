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

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from mlpmem.artifacts import DATA, DATASTORE, DATASTORE_VAL, base_model, invalidate, load_split, should_skip, \
    verify_chain, write_manifest
from mlpmem.components.capture import forward_hidden, resolve_hook
from mlpmem.components.data import batch_windows, plan_windows, shard_windows
from mlpmem.components.lm import LoadedLM, check_context, load_lm
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import Progress, atomic_write_json, create_memmap, fingerprint, read_json, shard_name
from mlpmem.runtime import barrier, dist_info, fault_point, progress
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)

FLUSH_EVERY = 8  # batches between checkpoints of a shard's progress
TRACE_ENV = "MLPMEM_TRACE"  # test hook, off by default: see _trace


def extract_fingerprint(cfg: Config, lm: LoadedLM, hook: str, data_fp: str) -> str:
    return fingerprint("extract", lm.identity["fingerprint"], data_fp, cfg.model.dtype, hook,
                       cfg.window.context, cfg.window.stride, cfg.extract.shards)


def extract_shard(lm: LoadedLM, hook, tokens: np.ndarray, windows, out: Path, shard: int, n_shards: int,
                  batch_size: int, fp: str) -> dict:
    """Write keys/vals of one shard (rows ``[windows[0].score_from, windows[-1].end)``); resumable."""
    start, stop = windows[0].score_from, windows[-1].end
    kpath, vpath = out / shard_name("keys", shard, n_shards), out / shard_name("vals", shard, n_shards)
    prog = Progress(out / f".progress-{shard:05d}.json", fp)
    vals = tokens[start + 1:stop + 1].astype(np.int32)  # value of row t is token t+1
    vm = create_memmap(vpath, np.int32, (stop - start,))
    vm[:] = vals
    vm.flush()
    keys, done_w = None, prog.done
    if done_w:
        # Resume only onto the key file the killed run wrote; if it is gone or reshaped, start the shard over
        # (reopening with a guessed width could silently zero the finished windows' keys).
        keys = _reopen_keys(kpath, stop - start)
        if keys is None:
            log.warning("extract: %s is missing or unreadable; restarting shard %d from its first window",
                        kpath.name, shard)
            done_w = 0
    bar = progress(total=stop - start, desc=f"extract shard {shard}", unit="tok")
    bar.update(sum(w.end - w.score_from for w in windows[:done_w]))
    t0, n_new = time.perf_counter(), 0
    todo = windows[done_w:]
    traced = os.environ.get(TRACE_ENV)
    key_digest, span = (hashlib.sha256() if traced else None), None
    for bi, (ids, mask, group) in enumerate(batch_windows(tokens, todo, batch_size)):
        with torch.inference_mode():
            h = forward_hidden(lm.model, hook, ids.to(lm.device), mask.to(lm.device))
        if keys is None:
            keys = create_memmap(kpath, np.float16, (stop - start, h.shape[-1]))
        for j, w in enumerate(group):
            rows = h[j, w.score_from - w.begin:w.end - w.begin]
            k16 = rows.to(torch.float16)
            if not torch.isfinite(k16).all():
                bad = w.score_from + int((~torch.isfinite(k16)).any(-1).nonzero()[0])
                raise StageError(f"non-finite key at train position {bad} (float16 overflow or a NaN in the "
                                 f"model at {hook}); use another --extract.hook or --model.dtype fp32")
            keys[w.score_from - start:w.end - start] = k16.cpu().numpy()
            n_new += w.end - w.score_from
            if key_digest is not None:  # what this process computed, in row order
                key_digest.update(k16.cpu().numpy().tobytes())
                span = [span[0] if span else w.score_from, w.end]
        done_w += len(group)
        bar.update(sum(w.end - w.score_from for w in group))
        bar.set_postfix(tok_s=f"{n_new / (time.perf_counter() - t0):.0f}")
        if (bi + 1) % FLUSH_EVERY == 0 or done_w == len(windows):
            keys.flush()
            prog.update(done_w)
            fault_point("extract.flush")
    bar.close()
    secs = time.perf_counter() - t0
    info = {"shard": shard, "start": start, "stop": stop, "keys": kpath.name, "vals": vpath.name,
            "seconds": round(secs, 2), "computed": n_new,  # rows computed by this (possibly resumed) run
            "tokens_per_s": round(n_new / secs, 1) if secs > 0 else None}
    atomic_write_json(out / f".shard-{shard:05d}.json", {"fingerprint": fp, **info})
    prog.clear()
    if traced:
        _trace(traced, {"out": out.name, "shard": shard, "rows": span, "computed": n_new,
                        "keys_sha256": key_digest.hexdigest(), "vals_sha256": hashlib.sha256(vals).hexdigest()})
    return info


def _trace(directory: str, rec: dict) -> None:
    """Test hook (MLPMEM_TRACE=<dir>): append ``rec``, what this process computed for one shard (the rows, sha256
    digests of the keys and values it produced), to ``<dir>/extract-rank<r>.jsonl``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / f"extract-rank{dist_info().rank}.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _shard_whole(out: Path, sm: dict) -> bool:
    """Whether a finished shard's files are still there whole (a deleted or truncated one is extracted again)."""
    rows = sm["stop"] - sm["start"]
    try:
        vals = np.load(out / sm["vals"], mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return vals.shape == (rows,) and _reopen_keys(out / sm["keys"], rows) is not None


def _reopen_keys(path: Path, rows: int) -> np.memmap | None:
    """The partially written (rows, d) float16 key file of a killed run, opened for writing; None if unusable."""
    from numpy.lib.format import open_memmap

    try:
        mm = open_memmap(path, mode="r+")
    except (OSError, ValueError, EOFError):
        return None
    return mm if mm.dtype == np.float16 and mm.ndim == 2 and mm.shape[0] == rows else None


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
        extract_shard(lm, hook, tokens, groups[s], out, s, n_shards, cfg.window.batch_size, fp)
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
