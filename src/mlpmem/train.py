"""Stage `train`: fit the MLP memory to the kNN targets, from stored keys (offline) or a live LM (online).

Row space shared with the trainer: rows ``[0, N)`` are train positions (datastore rows), rows ``[N, N + M)`` the
extracted validation positions. Both input modes answer ``hidden(rows)`` for the same rows: *offline* reads the
stored float16 keys, *online* runs the frozen base LM over the windows containing those rows and captures the
hook point (rounded through float16 by default, so both modes feed bit-identical inputs). Online training
shuffles whole windows rather than single rows, so each step runs the LM on only a couple of windows.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from mlpmem.capture import forward_hidden, resolve_hook
from mlpmem.config import Config, save_config
from mlpmem.data import load_split, plan_windows
from mlpmem.extract import Datastore
from mlpmem.index import ConcatRows
from mlpmem.lm import LoadedLM, load_lm
from mlpmem.memory import MLPMemory, init_head_from_lm, memory_config_for
from mlpmem.retrieval import TargetStore
from mlpmem.runtime import dist_info
from mlpmem.store import StageError, fingerprint, invalidate, read_manifest, should_skip, \
    write_manifest
from mlpmem.trainer import ArraySource, BatchPlan, Targets, train_memory

log = logging.getLogger(__name__)


def memory_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "memory"


class OnlineSource:
    """Memory inputs computed on the fly by the frozen LM (no stored keys needed).

    streams: [(tokens, first_row)], each a token stream whose position t is row first_row + t. The hidden states
    of the most recent windows are cached, so consecutive batches that share a window run it once.
    """

    def __init__(self, lm: LoadedLM, hook, streams: list[tuple[np.ndarray, int]], context: int, stride: int,
                 round_fp16: bool = True, cache_windows: int = 16, batch_size: int = 8):
        self.lm, self.hook, self.round = lm, hook, round_fp16
        self.streams = []
        for tokens, first in streams:
            wins = plan_windows(len(tokens), context, stride)
            self.streams.append((tokens, first, wins, np.array([w.score_from for w in wins], dtype=np.int64)))
        self.firsts = np.array([s[1] for s in self.streams], dtype=np.int64)
        self.cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.cache_windows = cache_windows
        self.batch_size = batch_size  # windows per LM forward

    def window_of(self, row: int) -> tuple[int, int]:
        """(stream, window index) of the window that scores this row."""
        s = int(np.searchsorted(self.firsts, row, side="right")) - 1
        t = row - self.firsts[s]
        return s, int(np.searchsorted(self.streams[s][3], t, side="right")) - 1

    def _forward(self, missing: list[tuple[int, int]]) -> None:
        """Run the LM on these windows (right-padded, like extraction) and cache their scored rows."""
        T = max(self.streams[s][2][w].end - self.streams[s][2][w].begin for s, w in missing)
        ids = torch.zeros((len(missing), T), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (s, w) in enumerate(missing):
            win = self.streams[s][2][w]
            ids[j, : win.end - win.begin] = torch.from_numpy(self.streams[s][0][win.begin:win.end].astype(np.int64))
            mask[j, : win.end - win.begin] = 1
        with torch.inference_mode():
            h = forward_hidden(self.lm.model, self.hook, ids.to(self.lm.device), mask.to(self.lm.device))
        for j, (s, w) in enumerate(missing):
            win = self.streams[s][2][w]
            rows = h[j, win.score_from - win.begin:win.end - win.begin]
            rows = rows.to(torch.float16) if self.round else rows
            self.cache[(s, w)] = rows.float().cpu()

    def hidden(self, positions: np.ndarray) -> torch.Tensor:
        keys = [self.window_of(int(r)) for r in positions]
        needed = list(dict.fromkeys(keys))
        missing = [k for k in needed if k not in self.cache]
        for i in range(0, len(missing), self.batch_size):
            self._forward(missing[i:i + self.batch_size])
        out = []
        for r, (s, w) in zip(positions, keys):
            t = int(r) - self.firsts[s]
            out.append(self.cache[(s, w)][t - self.streams[s][2][w].score_from])
        # Evict only after the lookups: a request may span more windows than the cache holds.
        for k in needed:
            self.cache.move_to_end(k)
        while len(self.cache) > self.cache_windows:
            self.cache.popitem(last=False)
        return torch.stack(out) if out else torch.zeros((0, self.lm.identity["hidden_size"]))


class WindowBatchPlan(BatchPlan):
    """Shuffles whole windows (their rows stay together and in order) instead of single rows: online training."""

    def __init__(self, train_rows: np.ndarray, window_sizes: list[int], batch_size: int, seed: int):
        super().__init__(train_rows, batch_size, seed)
        self.bounds = np.concatenate([[0], np.cumsum(window_sizes)])
        assert self.bounds[-1] == len(train_rows), (self.bounds[-1], len(train_rows))

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(len(self.bounds) - 1)
            perm = np.concatenate([np.arange(self.bounds[w], self.bounds[w + 1]) for w in order])
            self._perm = (epoch, perm)
        return self._perm[1]


def run(cfg: Config) -> dict:
    dist = dist_info()
    lm = load_lm(cfg.model)
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    ds = Datastore(cfg.run_dir, expect_model=lm.identity, expect_hook=str(hook))
    tg = TargetStore(cfg.run_dir)
    if tg.manifest.get("datastore_fingerprint", ds.manifest["fingerprint"]) != ds.manifest["fingerprint"] \
            or tg.manifest["n_positions"] != ds.n:
        raise StageError(f"the kNN targets in {tg.dir} were computed for another datastore than the one in "
                         f"{ds.dir} (re-extracted since?): rerun `mlpmem knn-targets --force`")
    n_val_ds = ds.validation().n if ds.has_validation else 0
    if tg.n_validation > n_val_ds:
        raise StageError(f"the kNN targets hold {tg.n_validation} validation positions but the datastore only "
                         f"{n_val_ds}: rerun `mlpmem knn-targets --force`")
    out = memory_dir(cfg.run_dir)
    meta = memory_meta(lm, str(hook), tg.manifest)
    mc = memory_config_for(lm.model.config, num_blocks=cfg.memory.num_blocks, hidden_size=cfg.memory.hidden_size,
                           intermediate_size=cfg.memory.intermediate_size, dropout=cfg.memory.dropout, meta=meta)
    fp = fingerprint("train", tg.manifest["fingerprint"], mc.to_dict(), cfg.to_dict()["train"],
                     cfg.memory.init_head, cfg.seed, dist.world_size)
    done = should_skip(out, "train", fp, cfg.force, "mlpmem train")
    if done:
        return done
    if dist.is_main:
        invalidate(out)
        if cfg.force:
            import shutil

            for sub in ("last", "best"):
                shutil.rmtree(out / sub, ignore_errors=True)
            for name in ("metrics.jsonl", "best.json"):
                (out / name).unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    memory = MLPMemory(mc).to(lm.device)
    if cfg.memory.init_head == "lm":
        init_head_from_lm(memory, lm.model)
    n = ds.n
    n_val = tg.n_validation
    train_rows = np.arange(n, dtype=np.int64)
    val_rows = np.arange(n, n + n_val, dtype=np.int64)
    val_ds = ds.validation() if n_val else None
    ids = ConcatRows(tg.ids + ([tg.val_ids] if n_val else []))
    probs = ConcatRows(tg.probs + ([tg.val_probs] if n_val else []))
    labels = np.concatenate([ds.vals] + ([val_ds.vals[:n_val]] if n_val else []))
    targets = Targets(ids, probs, labels)
    plan = None
    if cfg.train.input == "offline":
        source = ArraySource(ConcatRows(ds.keys + (val_ds.keys if n_val else [])))
    else:
        ext_w = ds.manifest["window"]
        if (ext_w["context"], ext_w["stride"]) != (cfg.window.context, cfg.window.stride):
            raise StageError(f"--train.input online recomputes the datastore's keys, which were extracted with "
                             f"--window.context {ext_w['context']} --window.stride {ext_w['stride']}, not "
                             f"{cfg.window.context}/{cfg.window.stride}: use the same window settings")
        source = online_source(cfg, lm, hook, n, n_val)
        wins = source.streams[0][2]
        plan = WindowBatchPlan(train_rows, [w.end - w.score_from for w in wins], cfg.train.batch_size, cfg.seed)
    log.info("train: memory %s x%d blocks, %.1fM params; %d train / %d validation positions, input %s",
             mc.family, mc.num_blocks, memory.num_parameters() / 1e6, n, n_val, cfg.train.input)
    summary = train_memory(memory, source, targets, train_rows, val_rows, cfg.train, out, cfg.seed,
                           world_size=dist.world_size, rank=dist.rank, plan=plan)
    if not dist.is_main:
        return {}
    best = out / "best" if (out / "best").is_dir() else out / "last"
    save_config(cfg, out / "config.yaml", ["model", "extract", "knn", "memory", "train"])
    return write_manifest(out, "train", fp, checkpoint=best.name, params=memory.num_parameters(),
                          bytes=(best / "model.safetensors").stat().st_size, memory_config=mc.to_dict(),
                          summary=summary, input=cfg.train.input)


def online_source(cfg: Config, lm: LoadedLM, hook, n: int, n_val: int) -> OnlineSource:
    tokens, _ = load_split(cfg, "train", lm.identity["tokenizer_hash"])
    streams = [(tokens, 0)]
    if n_val:
        vt, _ = load_split(cfg, "validation", lm.identity["tokenizer_hash"])
        streams.append((vt[: n_val + 1], n))
    return OnlineSource(lm, hook, streams, cfg.window.context, cfg.window.stride, batch_size=cfg.window.batch_size)


def memory_meta(lm: LoadedLM, hook: str, targets_manifest: dict | None) -> dict:
    """Identity recorded in the memory's config.json: what it must be attached to."""
    return {"base_model": lm.identity["name"], "base_fingerprint": lm.identity["fingerprint"],
            "tokenizer_hash": lm.identity["tokenizer_hash"], "hook": hook,
            "vocab_size": lm.identity["vocab_size"], "input_size": lm.identity["hidden_size"],
            "targets_fingerprint": (targets_manifest or {}).get("fingerprint")}


def load_trained_memory(cfg: Config, lm: LoadedLM, path: str | Path | None = None) -> tuple[MLPMemory | None, dict]:
    """The selected (best-by-validation) memory of this run, checked against the loaded base LM."""
    d = memory_dir(cfg.run_dir)
    if path is None:
        m = read_manifest(d)
        if m is None or not m.get("complete"):
            log.warning("memory skipped: no trained memory in %s (run `mlpmem train`)", d)
            return None, {}
        path = d / m["checkpoint"]
    else:
        m = {"fingerprint": fingerprint(str(path))}
    try:
        # inference in the LM's dtype (bf16 halves the memory's cost on CPU and GPU); mixing happens in float32
        memory = MLPMemory.from_pretrained(path, device=str(lm.device), dtype=next(lm.model.parameters()).dtype)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"cannot load the memory: {e}. Rerun `mlpmem train --force` to rebuild it") from None
    check_memory_matches(memory, lm, resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer))
    meta = {"fingerprint": m["fingerprint"], "params": memory.num_parameters(),
            "bytes": (Path(path) / "model.safetensors").stat().st_size}
    return memory.eval(), meta


def check_memory_matches(memory: MLPMemory, lm: LoadedLM, hook) -> None:
    meta = memory.config.meta
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != lm.identity["tokenizer_hash"]:
        raise StageError(f"this memory was trained for {meta.get('base_model')}, whose tokenizer differs from "
                         f"{lm.identity['name']}'s: use the base model it was trained with (--model.name)")
    if meta.get("base_fingerprint") and meta["base_fingerprint"] != lm.identity["fingerprint"]:
        raise StageError(f"this memory was trained for base model {meta.get('base_model')} "
                         f"({meta['base_fingerprint']}), not {lm.identity['name']} ({lm.identity['fingerprint']}): "
                         "pass the matching --model.name")
    if meta.get("hook") and meta["hook"] != str(hook):
        raise StageError(f"this memory was trained on hook point {meta['hook']}, but the config resolves to "
                         f"{hook}: set --extract.hook {meta['hook']}")
