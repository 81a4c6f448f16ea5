"""Stage `train`: fit the MLP memory to the kNN targets, from stored keys (offline) or a live LM (online).

Row space shared with the trainer: rows ``[0, N)`` are train positions (datastore rows), rows ``[N, N + M)`` the
extracted validation positions. The offline mode reads the stored float16 keys of those rows; the online mode
(:mod:`mlpmem.components.online`) recomputes them with the frozen LM.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mlpmem.artifacts import DATA, DATASTORE, DATASTORE_VAL, MEMORY, TARGETS, Datastore, TargetStore, base_model, \
    invalidate, is_complete, load_split, should_skip, verify_chain, write_manifest
from mlpmem.components.capture import resolve_hook
from mlpmem.components.index import ConcatRows
from mlpmem.components.lm import LoadedLM, load_lm
from mlpmem.components.memory import MLPMemory, init_head_from_lm, memory_config_for
from mlpmem.components.online import OnlineSource, WindowBatchPlan
from mlpmem.components.trainer import ArraySource, Targets, train_memory
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import fingerprint, remove_directory
from mlpmem.runtime import barrier, dist_info
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    dist = dist_info()
    mcfg, model_up = base_model(cfg)
    lm = load_lm(mcfg)
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    ds = Datastore(cfg.run_dir, expect_model=lm.identity, expect_hook=str(hook), limit=cfg.knn.datastore_tokens)
    if ds.limit is not None and cfg.train.input == "online":
        raise StageError("--knn.datastore_tokens trains on a prefix of the datastore's keys: use --train.input "
                         "offline")
    tg = TargetStore(cfg.run_dir)
    if tg.manifest["upstream"].get(DATASTORE) != ds.fingerprint or tg.manifest["n_positions"] != ds.n:
        raise StageError(f"the kNN targets in {tg.dir} were computed for another datastore than the one in "
                         f"{ds.dir} (re-extracted since?): rerun `mlpmem knn-targets --force`")
    n_val_ds = ds.validation().n if ds.has_validation else 0
    if tg.n_validation > n_val_ds:
        raise StageError(f"the kNN targets hold {tg.n_validation} validation positions but the datastore only "
                         f"{n_val_ds}: rerun `mlpmem knn-targets --force`")
    out = cfg.run_dir / MEMORY
    upstream = {DATASTORE: ds.fingerprint, TARGETS: tg.fingerprint, **model_up}
    if tg.n_validation:
        upstream[DATASTORE_VAL] = ds.validation().fingerprint
    if cfg.train.input == "online":
        upstream[DATA] = verify_chain(cfg.run_dir, DATA, "prepare")["fingerprint"]
    meta = memory_meta(lm, str(hook), tg.manifest)
    mc = memory_config_for(lm.model.config, num_blocks=cfg.memory.num_blocks, hidden_size=cfg.memory.hidden_size,
                           intermediate_size=cfg.memory.intermediate_size, dropout=cfg.memory.dropout, meta=meta)
    seed = cfg.train.seed_or(cfg.seed)  # --train.seed, else --seed: the memory's init, batch order and dropout
    fp = fingerprint("train", upstream, mc.to_dict(), cfg.train.fingerprinted(), cfg.memory.init_head, seed,
                     dist.world_size, *ds.scope)
    done = should_skip(out, "train", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        return done
    rebuild = cfg.force or is_complete(out)  # a finished memory from other settings or inputs: start over
    if dist.is_main:
        invalidate(out)
        if rebuild:
            for sub in ("last", "best"):
                remove_directory(out / sub)
            for name in ("metrics.jsonl", "best.json"):
                (out / name).unlink(missing_ok=True)
    barrier()  # no rank looks for last/ before rank 0 has removed it
    torch.manual_seed(seed)
    memory = MLPMemory(mc).to(lm.device)
    if cfg.memory.init_head == "lm":
        init_head_from_lm(memory, lm.model)
    n = ds.n
    n_val = tg.n_validation
    train_rows = np.arange(n, dtype=np.int64)
    val_rows = np.arange(n, n + n_val, dtype=np.int64)
    val_ds = ds.validation() if n_val else None
    labels = np.concatenate([ds.vals] + ([val_ds.vals[:n_val]] if n_val else []))
    targets = Targets(tg.rows, labels)
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
        plan = WindowBatchPlan(train_rows, [w.end - w.score_from for w in wins], cfg.train.batch_size, seed)
    log.info("train: memory %s x%d blocks, %.1fM params; %d train / %d validation positions, input %s",
             mc.family, mc.num_blocks, memory.num_parameters() / 1e6, n, n_val, cfg.train.input)
    summary = train_memory(memory, source, targets, train_rows, val_rows, cfg.train, out, seed,
                           world_size=dist.world_size, rank=dist.rank, plan=plan)
    if not dist.is_main:
        return {}
    best = out / "best" if (out / "best").is_dir() else out / "last"
    if not cfg.train.keep_last:
        prune_last(out, best)
    save_stage_config(cfg, "train", out)
    return write_manifest(out, "train", fp, upstream, checkpoint=best.name, params=memory.num_parameters(),
                          bytes=(best / "model.safetensors").stat().st_size, memory_config=mc.to_dict(),
                          summary=summary, input=cfg.train.input, seed=seed)


def prune_last(out: Path, best: Path) -> int:
    """--train.keep_last false: remove ``out/last`` (weights + optimizer state) of a finished training, before the
    manifest lists the stage's files; returns the bytes freed. Kept when it is the only checkpoint (no validation
    positions, so no best/). A kill before the manifest is written leaves a run that trains again from scratch."""
    last = out / "last"
    if best.name == "last":
        log.warning("train: --train.keep_last false ignored: without validation positions memory/last is the "
                    "only checkpoint")
        return 0
    if not last.exists():
        return 0
    freed = sum(f.stat().st_size for f in last.resolve().rglob("*") if f.is_file())
    remove_directory(last)
    log.info("train: removed %s (resumable checkpoint: weights + optimizer state; --train.keep_last false), "
             "freed %.1f MiB", last, freed / 2**20)
    return freed


def online_source(cfg: Config, lm: LoadedLM, hook, n: int, n_val: int) -> OnlineSource:
    tokens, _ = load_split(cfg.run_dir, "train", lm.identity["tokenizer_hash"])
    streams = [(tokens, 0)]
    if n_val:
        vt, _ = load_split(cfg.run_dir, "validation", lm.identity["tokenizer_hash"])
        streams.append((vt[: n_val + 1], n))
    return OnlineSource(lm, hook, streams, cfg.window.context, cfg.window.stride, batch_size=cfg.window.batch_size)


def memory_meta(lm: LoadedLM, hook: str, targets_manifest: dict | None) -> dict:
    """Identity recorded in the memory's config.json: what it must be attached to."""
    return {"base_model": lm.identity["name"], "base_fingerprint": lm.identity["fingerprint"],
            "tokenizer_hash": lm.identity["tokenizer_hash"], "hook": hook,
            "vocab_size": lm.identity["vocab_size"], "input_size": lm.identity["hidden_size"],
            "targets_fingerprint": (targets_manifest or {}).get("fingerprint")}
