"""Stage `knn-targets`: sparse kNN next-token distributions for every train position (leave-one-out by id, or with
``--knn.exclude document`` leaving out the position's whole document) and for the extracted validation positions.

Layout of ``<run>/targets/``: per datastore shard a CSR set (:mod:`mlpmem.components.sparse`): ``offsets-*.npy``
int64 (rows + 1), ``ids-*.npy`` int32 and ``probs-*.npy`` float16 (renormalised after the down-cast), every
distinct neighbour token of every position, row-aligned with the datastore (labels are the datastore's values).
``targets/validation/`` holds the same for the validation positions (searched against the train index, so nothing
is left out there); training selects checkpoints on them. With ``--knn.teacher_dir`` the neighbours
come from another run's datastore and index (same tokenizer and corpus), row-aligned with this run's positions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from mlpmem.artifacts import DATA, DATASTORE, DATASTORE_VAL, INDEX, TARGETS, Datastore, base_model, invalidate, \
    load_offsets, load_split, open_index, should_skip, verify_chain, write_manifest
from mlpmem.components.knn import compute_targets, knn_scorer
from mlpmem.components.sparse import CsrSink, csr_names
from mlpmem.config import Config
from mlpmem.errors import ConfigError, StageError
from mlpmem.files import Progress, fingerprint
from mlpmem.runtime import barrier, broadcast_from_main, dist_info
from mlpmem.stages import save_stage_config
from mlpmem import systems as sy

log = logging.getLogger(__name__)

TRACE_ENV = "MLPMEM_TRACE"  # test hook, off by default: see TracedSink


def run(cfg: Config) -> dict:
    """kNN targets for every train position (leave-one-out by id or by document) and for the validation
    positions."""
    dist = dist_info()
    kc = cfg.knn
    teacher = Path(kc.teacher_dir) if kc.teacher_dir else cfg.run_dir
    own = teacher.resolve() == cfg.run_dir.resolve()
    if kc.datastore_tokens is not None and not own:
        raise ConfigError("--knn.datastore_tokens: a prefix of the datastore needs this run's own (not "
                          "--knn.teacher_dir)")
    ds = Datastore(teacher, limit=kc.datastore_tokens)
    student = ds if own else Datastore(cfg.run_dir)
    if not own:
        _check_teacher(ds, student)
    index, im = open_index(teacher, cfg.index.nprobe)
    if kc.k > ds.n:
        raise StageError(f"--knn.k {kc.k} is larger than the datastore ({ds.n} keys): lower --knn.k")
    tkey = (lambda k: k) if own else (lambda k: str((teacher / k).resolve()))
    upstream = {tkey(DATASTORE): ds.fingerprint, tkey(INDEX): im["fingerprint"], DATASTORE: student.fingerprint}
    has_val = student.has_validation
    if has_val:
        upstream[DATASTORE_VAL] = student.validation().fingerprint
        if not own:
            upstream[tkey(DATASTORE_VAL)] = ds.validation().fingerprint
    out = cfg.run_dir / TARGETS
    if kc.temperature is None and not own:
        raise ConfigError("--knn.temperature: choosing it on validation needs this run's own datastore and LM; set "
                          "a value when targets come from --knn.teacher_dir")
    auto = None if kc.temperature is not None else {  # what decides the tuned temperature
        "grid": cfg.eval.knn_temperatures, "positions": cfg.train.val_positions,
        "window": [cfg.window.context, cfg.window.stride]}
    if auto is not None:  # the sweep scores validation text with the base LM
        upstream.update({DATA: verify_chain(cfg.run_dir, DATA, "prepare")["fingerprint"], **base_model(cfg)[1]})
    doc_starts = None
    if kc.exclude == "document":  # the train documents' boundaries decide what is left out
        upstream[DATA] = verify_chain(cfg.run_dir, DATA, "prepare")["fingerprint"]
        doc_starts = load_offsets(cfg.run_dir, "train")
        if int(doc_starts[-1]) < ds.n:
            raise StageError(f"--knn.exclude document: the prepared train split holds {int(doc_starts[-1])} tokens "
                             f"but the datastore {ds.n} positions (prepared again since?): rerun `mlpmem extract`")
    # the default (position) is left out of the fingerprint: targets made before the option keep theirs
    fp = fingerprint("knn-targets", upstream, kc.k, kc.temperature, auto, kc.distances, kc.store_ids,
                     kc.query_batch, cfg.index.nprobe, *ds.scope,
                     *([] if kc.exclude == "position" else [{"exclude": kc.exclude}]))
    done = should_skip(out, "knn-targets", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        return done
    if dist.is_main:
        invalidate(out)
        out.mkdir(parents=True, exist_ok=True)
    temperature, sweep = kc.temperature, None
    if temperature is None:
        temperature, sweep = broadcast_from_main(_tuned_temperature(cfg, ds, index) if dist.is_main else None)
    barrier()
    stats = {}
    shards = ds.shards
    suffix = [f"-{s:05d}-of-{len(shards):05d}" for s in range(len(shards))]
    for s in range(dist.rank, len(shards), dist.world_size):
        sh = shards[s]
        rows = np.arange(sh["start"], sh["stop"], dtype=np.int64)
        prog = Progress(out / f".progress-{s:05d}.json", fp)
        sink = CsrSink(out, suffix[s], len(rows))  # a shard finished by a killed run only gets its header closed
        traced = TracedSink(sink) if os.environ.get(TRACE_ENV) else None
        stats[s] = compute_targets(index, ds.keys, ds.vals, traced if traced is not None else sink, kc.k,
                                   temperature, kc.distances, kc.query_batch, prog, rows=rows,
                                   show_progress=dist.is_main, max_ids=kc.store_ids, doc_starts=doc_starts)
        sink.close()
        if traced is not None:
            traced.write(Path(os.environ[TRACE_ENV]), dist.rank, s, sh["start"])
    n_val = 0
    if dist.is_main and has_val:
        # the teacher's keys of the same validation positions query the teacher's index (nothing to leave out)
        vkeys = ds.validation().keys[0]
        n_val = len(vkeys)
        sink = CsrSink(out / "validation", "", n_val)
        compute_targets(index, ds.keys, ds.vals, sink, kc.k, temperature, kc.distances, kc.query_batch,
                        Progress(out / "validation" / ".progress.json", fp), queries=vkeys, show_progress=False,
                        max_ids=kc.store_ids)
        sink.close()
        (out / "validation" / ".progress.json").unlink(missing_ok=True)
    barrier()
    if not dist.is_main:
        return {}
    for s in range(len(shards)):
        (out / f".progress-{s:05d}.json").unlink(missing_ok=True)
    qps = [v["queries_per_s"] for v in stats.values() if v["rows"]]
    train_bytes = sum((out / n).stat().st_size for sf in suffix for n in csr_names(sf).values())
    nnz = sum(int(np.load(out / csr_names(sf)["offsets"], mmap_mode="r")[-1]) for sf in suffix)
    dropped = [v["mean_dropped_mass"] * v["rows"] for v in stats.values() if v["rows"]]
    rows_here = sum(v["rows"] for v in stats.values())
    same_doc = {}
    if doc_starts is not None and rows_here:  # row-weighted means over the shards computed here
        same_doc = {name: sum(v[name] * v["rows"] for v in stats.values() if v["rows"]) / rows_here
                    for name in ("dropped_same_doc", "dropped_same_doc_mass", "mean_neighbours", "empty_fraction")}
    save_stage_config(cfg, "knn-targets", out)
    return write_manifest(
        out, "knn-targets", fp, upstream, teacher=str(teacher), k=kc.k, max_ids=kc.store_ids,
        temperature=temperature, temperature_sweep=sweep, distances=kc.distances, exclude=kc.exclude, **same_doc,
        layout="csr", n_positions=ds.n,
        shards=[{"start": sh["start"], "stop": sh["stop"], **csr_names(suffix[s])} for s, sh in enumerate(shards)],
        datastore_fingerprint=student.fingerprint, validation=n_val, stats={str(k): v for k, v in stats.items()},
        queries_per_s=float(np.mean(qps)) if qps else None, nnz=nnz, mean_distinct_ids=nnz / ds.n,
        # mass of the distinct tokens beyond --knn.store_ids (0 when every id is kept), over the rows computed here
        dropped_mass=sum(dropped) / sum(v["rows"] for v in stats.values()) if dropped else 0.0,
        bytes=train_bytes + sum(p.stat().st_size for p in (out / "validation").glob("*.npy")),
        bytes_per_position=train_bytes / ds.n)


class TracedSink:
    """Test hook (MLPMEM_TRACE=<dir>): passes a shard's rows on to its sink and digests what this process computed
    (the rows, and per row the count, ids and float16 probs of its entries, in row order); ``write`` appends that to
    ``<dir>/knn-targets-rank<r>.jsonl``."""

    def __init__(self, sink: CsrSink):
        self.sink, self.span = sink, None
        self.digests = {k: hashlib.sha256() for k in ("counts", "ids", "probs")}

    def __getattr__(self, name):  # restore, flush, state, close: the sink's own
        return getattr(self.sink, name)

    def append(self, first_row: int, ids: np.ndarray, probs: np.ndarray) -> None:
        valid = ids >= 0
        self.digests["counts"].update(valid.sum(1).astype(np.int64).tobytes())
        self.digests["ids"].update(np.ascontiguousarray(ids[valid], dtype=np.int32).tobytes())
        self.digests["probs"].update(np.ascontiguousarray(probs[valid], dtype=np.float16).tobytes())
        self.span = [self.span[0] if self.span else first_row, first_row + len(ids)]
        self.sink.append(first_row, ids, probs)

    def write(self, directory: Path, rank: int, shard: int, row0: int) -> None:
        rows = [row0 + r for r in self.span] if self.span else None  # global datastore rows
        rec = {"shard": shard, "rows": rows, **{f"{k}_sha256": d.hexdigest() for k, d in self.digests.items()}}
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"knn-targets-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


LAMBDA_GRID = [round(x, 2) for x in np.arange(0.0, 1.0001, 0.05)]


def _tuned_temperature(cfg: Config, ds: Datastore, index) -> tuple[float, dict]:
    """The kNN temperature at which kNN-LM mixed with the base LM has the lowest perplexity on the first
    --train.val_positions validation positions (λ tuned with it), and the sweep: {T: best validation PPL}.

    Distances have a model-specific scale, so a fixed temperature (the authors' 16, tuned on GPT-2) can make the
    targets much flatter or sharper than the retrieval that actually helps; the memory imitates these targets.
    """
    from mlpmem.components.capture import resolve_hook
    from mlpmem.components.lm import load_lm
    from mlpmem.components.scoring import score_tokens
    from mlpmem.components.tuning import MAX_WIDENINGS, settle, widened_grids

    lm = load_lm(base_model(cfg)[0])
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    tokens, _ = load_split(cfg.run_dir, "validation", lm.identity["tokenizer_hash"])
    tokens = tokens[: cfg.train.val_positions + 1]
    grid = list(cfg.eval.knn_temperatures)
    # λ on a fixed fine grid (refined further by settle), so eval's own λ settings do not move the targets
    sweep_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, lambdas=LAMBDA_GRID, lam=None))
    for rnd in range(MAX_WIDENINGS + 1):  # a T on the edge of the grid: widen it and score again
        scorer = knn_scorer(index, ds.keys, ds.vals, cfg.knn.k, grid, cfg.knn.distances == "exact")
        sc = score_tokens(lm, tokens, cfg.window.context, cfg.window.stride, cfg.window.batch_size, hook=hook,
                          knn_scorer=scorer, desc="knn temperature")
        res = settle({"validation": sc}, sweep_cfg)
        new = widened_grids(res, sc, sweep_cfg) if rnd < MAX_WIDENINGS else None
        if new is None or new["knn_temperatures"] == sorted(grid):
            break
        log.info("knn-targets: kNN-LM's best temperature %g is on the edge of %s: widening it to %s",
                 res["settings"][sy.KNN]["T"], grid, new["knn_temperatures"])
        grid = new["knn_temperatures"]
    per_T = {str(T): min(r["ppl"] for r in res["sweeps"]["validation"][sy.KNN] if r["T"] == T) for T in grid}
    T = float(res["settings"][sy.KNN]["T"])
    edge = "T" in res["edges"].get(sy.KNN, [])
    log.info("knn-targets: temperature %g chosen on %d validation positions (kNN-LM PPL by T: %s)%s", T, sc.n,
             ", ".join(f"{t}: {p:.3f}" for t, p in per_T.items()),
             "; it is still on the edge of the widened grid" if edge else "")
    return T, {"ppl_by_T": per_T, "lam": res["settings"][sy.KNN]["lam"], "positions": sc.n, "edge": edge,
               "grid": grid}


def _check_teacher(teacher: Datastore, student: Datastore) -> None:
    tm, sm = teacher.manifest, student.manifest
    if tm["model"]["tokenizer_hash"] != sm["model"]["tokenizer_hash"]:
        raise StageError(f"--knn.teacher_dir: the teacher's tokenizer ({tm['model']['name']}) differs from the "
                         f"student's ({sm['model']['name']}); targets must come from the same tokenizer: use a "
                         "teacher model with the student's tokenizer, or unset --knn.teacher_dir")
    if tm["data_fingerprint"] != sm["data_fingerprint"] or tm["n_positions"] != sm["n_positions"]:
        raise StageError("--knn.teacher_dir: the teacher's datastore covers another corpus or split; prepare "
                         "both runs from the same --data settings")
    # Validation targets are row-aligned with the student's validation keys: both must hold the same positions.
    n_tv = teacher.validation().n if teacher.has_validation else 0
    n_sv = student.validation().n if student.has_validation else 0
    if n_tv != n_sv:
        raise StageError(f"--knn.teacher_dir: the teacher's datastore holds {n_tv} validation positions, the "
                         f"student's {n_sv}: extract both with the same --train.val_positions")
