"""Keys and values of one shard of a token stream, computed into ``.npy`` memmaps (the datastore's rows).

Row t is position t of the stream: ``keys[t]`` (float16, (rows, d)) is the hidden state captured at the hook point
while the LM reads token t with the window plan's context, ``vals[t]`` (int32) is token t + 1. Only the decoder body
up to the hook runs. Pure of the run directory: the extract stage (resume markers, manifests) and the benchmark both
call :func:`extract_keys`; the caller decides where the files go and what a flush checkpoint records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mlpmem.components.capture import forward_hidden
from mlpmem.components.data import batch_windows
from mlpmem.errors import StageError
from mlpmem.files import create_memmap, shard_name
from mlpmem.runtime import dist_info, progress

log = logging.getLogger(__name__)

TRACE_ENV = "MLPMEM_TRACE"  # test hook, off by default: see _trace


def reopen_keys(path: Path, rows: int) -> np.memmap | None:
    """The partially written (rows, d) float16 key file of a killed run, opened for writing; None if unusable."""
    from numpy.lib.format import open_memmap

    try:
        mm = open_memmap(path, mode="r+")
    except (OSError, ValueError, EOFError):
        return None
    return mm if mm.dtype == np.float16 and mm.ndim == 2 and mm.shape[0] == rows else None


def extract_keys(lm, hook, tokens: np.ndarray, windows, out: Path, shard: int, n_shards: int, batch_size: int, *,
                 split: str = "train", done: int = 0, flush_every: int = 8,
                 on_flush: Callable[[int], None] | None = None) -> dict:
    """Write ``keys-SSSSS-of-NNNNN.npy`` and ``vals-...`` of one shard into ``out``: rows
    ``[windows[0].score_from, windows[-1].end)`` of ``tokens`` (int32 stream of ``split``, which labels the bar).

    ``done``: windows already in the key file (a resumed shard; if that file is gone or reshaped, the shard starts
    over, since reopening with a guessed width could silently zero the finished windows' keys). The keys are
    flushed every ``flush_every`` batches and at the end, each time followed by ``on_flush(windows done)`` (where a
    caller persists its resume point). Returns {shard, start, stop, keys, vals (file names), seconds, computed (rows
    computed by this call), tokens_per_s}."""
    start, stop = windows[0].score_from, windows[-1].end
    kpath, vpath = out / shard_name("keys", shard, n_shards), out / shard_name("vals", shard, n_shards)
    vals = tokens[start + 1:stop + 1].astype(np.int32)  # value of row t is token t+1
    vm = create_memmap(vpath, np.int32, (stop - start,))
    vm[:] = vals
    vm.flush()
    keys, done_w = None, done
    if done_w:
        keys = reopen_keys(kpath, stop - start)
        if keys is None:
            log.warning("extract: %s is missing or unreadable; restarting shard %d from its first window",
                        kpath.name, shard)
            done_w = 0
    bar = progress(total=stop - start, desc=f"extract shard {shard}", label=split, unit="tok")  # "... (validation)"
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
                raise StageError(f"non-finite key at {split} position {bad} (float16 overflow or a NaN in the "
                                 f"model at {hook}); use another --extract.hook or --model.dtype fp32")
            keys[w.score_from - start:w.end - start] = k16.cpu().numpy()
            n_new += w.end - w.score_from
            if key_digest is not None:  # what this process computed, in row order
                key_digest.update(k16.cpu().numpy().tobytes())
                span = [span[0] if span else w.score_from, w.end]
        done_w += len(group)
        bar.update(sum(w.end - w.score_from for w in group))
        bar.set_postfix(tok_s=f"{n_new / (time.perf_counter() - t0):.0f}")
        if (bi + 1) % flush_every == 0 or done_w == len(windows):
            keys.flush()
            if on_flush is not None:
                on_flush(done_w)
    bar.close()
    secs = time.perf_counter() - t0
    info = {"shard": shard, "start": start, "stop": stop, "keys": kpath.name, "vals": vpath.name,
            "seconds": round(secs, 2), "computed": n_new,  # rows computed by this (possibly resumed) call
            "tokens_per_s": round(n_new / secs, 1) if secs > 0 else None}
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
