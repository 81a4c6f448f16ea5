"""Stages `index` and `knn-targets`, and the kNN-LM scorer used by `eval`.

Targets layout (``<run>/targets/``): per datastore shard ``ids-*.npy`` (rows, K) int32 padded with -1 and
``probs-*.npy`` (rows, K) float16 (renormalised after the down-cast), row-aligned with the datastore (labels are the
datastore's values). ``targets/validation/`` holds the same for the validation positions extracted alongside the
datastore (searched against the train index, so no leave-one-out is needed there); training selects checkpoints
on them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from mlpmem.config import Config, save_config
from mlpmem.extract import Datastore, datastore_dir
from mlpmem.index import build_index, exact_search, load_index, recall_at_k, resolve_factory, save_index, search
from mlpmem.knn import compute_targets, knn_gold_logprobs, recompute_distances, renormalise_float16, \
    sparse_knn_distribution
from mlpmem.runtime import barrier, dist_info
from mlpmem.store import Progress, StageError, create_memmap, fingerprint, invalidate, load_npy, read_manifest, \
    require_manifest, shard_name, should_skip, write_manifest

log = logging.getLogger(__name__)


def index_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "index"


def targets_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "targets"


# ----------------------------------------------------------------------------- index

def run_index(cfg: Config) -> dict:
    """Build the FAISS index over this run's datastore; measure recall@k against exact search on real keys."""
    out = index_dir(cfg.run_dir)
    if not dist_info().is_main:  # one index per run; other ranks wait
        barrier()
        return {}
    ds = Datastore(cfg.run_dir)
    spec = resolve_factory(cfg.index.factory, ds.n, ds.dim)
    ic = cfg.to_dict()["index"]
    fp = fingerprint("index", ds.manifest["fingerprint"], spec, {k: ic[k] for k in ("train_size", "add_chunk")},
                     cfg.seed)
    done = should_skip(out, "index", fp, cfg.force, "mlpmem index")
    if done:
        barrier()
        return done
    invalidate(out)
    t0 = time.perf_counter()
    index = build_index(ds.keys, spec, cfg.index.train_size, cfg.index.add_chunk, cfg.seed, cfg.index.use_gpu)
    build_s = time.perf_counter() - t0
    save_index(index, out / "index.faiss")
    recall, id_recall, k_rec = 1.0, 1.0, min(cfg.knn.k, ds.n)
    if spec != "Flat":  # recall of the approximate index against exact search, on sampled real keys
        rows = np.sort(np.random.default_rng(cfg.seed + 1).choice(ds.n, min(cfg.index.recall_queries, ds.n),
                                                                  replace=False))
        xq = ds.key_rows(rows).astype(np.float32)
        from mlpmem.index import set_nprobe

        set_nprobe(index, cfg.index.nprobe)
        t1 = time.perf_counter()
        _, I = search(index, xq, k_rec)
        approx_qps = len(rows) / (time.perf_counter() - t1)
        D_ex, I_ex = exact_search(ds.keys, xq, k_rec)
        recall = _recall_with_ties(ds, xq, I, D_ex)
        id_recall = recall_at_k(I, I_ex)
        log.info("index: recall@%d = %.3f at nprobe %d (%.0f q/s)", k_rec, recall, cfg.index.nprobe, approx_qps)
    save_config(cfg, out / "config.yaml", ["index", "knn"])
    m = write_manifest(out, "index", fp, factory=spec, ntotal=int(index.ntotal), dim=ds.dim,
                       datastore_fingerprint=ds.manifest["fingerprint"], build_seconds=round(build_s, 2),
                       recall_at_k={"k": k_rec, "nprobe": cfg.index.nprobe, "recall": recall,
                                    "id_recall": id_recall},
                       bytes=(out / "index.faiss").stat().st_size)
    barrier()
    return m


def _recall_with_ties(ds: Datastore, xq: np.ndarray, I: np.ndarray, D_ex: np.ndarray) -> float:
    """recall@k that counts a retrieved key as correct when its true distance is within the exact k-th distance.

    Plain id recall is below 1 even for an exhaustive search as soon as keys tie at the k-th distance (repeated
    text gives identical keys), since FAISS and the exact search break ties differently; any tie member is an
    equally good neighbour. True distances of the retrieved ids are recomputed from the stored keys.
    """
    d_true = recompute_distances(ds.keys, xq, I)  # +inf where I < 0
    kth = D_ex[:, -1:].astype(np.float64)
    ok = d_true <= kth * (1 + 1e-4) + 1e-4  # float32 rounding: exact_search expands |q|^2 + |x|^2 - 2 q.x
    return float(np.mean(ok.sum(1) / D_ex.shape[1]))


def open_index(run_dir: Path, nprobe: int):
    m = require_manifest(index_dir(run_dir), "index", "mlpmem index")
    return load_index(index_dir(run_dir) / "index.faiss", nprobe), m


# ----------------------------------------------------------------------------- targets

def run_targets(cfg: Config) -> dict:
    """kNN targets for every train position (leave-one-out by id) and for the validation positions."""
    dist = dist_info()
    kc = cfg.knn
    teacher = Path(kc.teacher_dir) if kc.teacher_dir else cfg.run_dir
    own = teacher.resolve() == cfg.run_dir.resolve()
    ds = Datastore(teacher)
    student = ds if own else Datastore(cfg.run_dir)
    if not own:
        _check_teacher(ds, student)
    index, im = open_index(teacher, cfg.index.nprobe)
    if im["datastore_fingerprint"] != ds.manifest["fingerprint"]:
        raise StageError(f"the index in {index_dir(teacher)} was built on another datastore: rerun `mlpmem index "
                         "--force`")
    if kc.k > ds.n:
        raise StageError(f"--knn.k {kc.k} is larger than the datastore ({ds.n} keys): lower --knn.k")
    out = targets_dir(cfg.run_dir)
    fp = fingerprint("knn-targets", ds.manifest["fingerprint"], im["fingerprint"], kc.k, kc.temperature,
                     kc.distances, kc.store_ids, kc.query_batch, cfg.index.nprobe,
                     student.manifest["fingerprint"])
    done = should_skip(out, "knn-targets", fp, cfg.force, "mlpmem knn-targets")
    if done:
        return done
    if dist.is_main:
        invalidate(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    K = min(kc.store_ids, kc.k)
    stats = {}
    shards = ds.manifest["shards"]
    for s in range(dist.rank, len(shards), dist.world_size):
        sh = shards[s]
        rows = np.arange(sh["start"], sh["stop"], dtype=np.int64)
        ids = create_memmap(out / shard_name("ids", s, len(shards)), np.int32, (len(rows), K))
        probs = create_memmap(out / shard_name("probs", s, len(shards)), np.float16, (len(rows), K))
        prog = Progress(out / f".progress-{s:05d}.json", fp)
        if prog.done < len(rows):
            stats[s] = compute_targets(index, ds.keys, ds.vals, ids, probs, kc.k, kc.temperature, kc.distances,
                                       kc.query_batch, prog, rows=rows, show_progress=dist.is_main)
    val_stats = {}
    if dist.is_main and student.has_validation:
        val_stats = _validation_targets(cfg, index, ds, student, out, K)
    barrier()
    if not dist.is_main:
        return {}
    for s in range(len(shards)):
        (out / f".progress-{s:05d}.json").unlink(missing_ok=True)
    qps = [v["queries_per_s"] for v in stats.values()]
    n_bytes = sum(p.stat().st_size for p in out.glob("*.npy"))
    save_config(cfg, out / "config.yaml", ["index", "knn"])
    return write_manifest(
        out, "knn-targets", fp, teacher=str(teacher), k=kc.k, K=K, temperature=kc.temperature,
        distances=kc.distances, n_positions=ds.n, shards=[
            {"start": sh["start"], "stop": sh["stop"], "ids": shard_name("ids", s, len(shards)),
             "probs": shard_name("probs", s, len(shards))} for s, sh in enumerate(shards)],
        datastore_fingerprint=student.manifest["fingerprint"],
        validation=val_stats.get("n", 0), stats={str(k): v for k, v in stats.items()},
        queries_per_s=float(np.mean(qps)) if qps else None, bytes=n_bytes,
        bytes_per_position=K * (4 + 2))


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


def _validation_targets(cfg: Config, index, ds: Datastore, student: Datastore, out: Path, K: int) -> dict:
    """Targets of the extracted validation positions (queries not in the store: nothing to leave out)."""
    teacher_val = ds.validation()
    vkeys = teacher_val.keys[0]
    n = len(vkeys)
    vout = out / "validation"
    ids = create_memmap(vout / "ids.npy", np.int32, (n, K))
    probs = create_memmap(vout / "probs.npy", np.float16, (n, K))
    for b0 in range(0, n, cfg.knn.query_batch):
        xq = np.asarray(vkeys[b0:b0 + cfg.knn.query_batch], dtype=np.float32)
        D, I = search(index, xq, cfg.knn.k)
        if cfg.knn.distances == "exact":
            D = recompute_distances(ds.keys, xq, I)
        i, p, _ = sparse_knn_distribution(D, I, ds.vals, cfg.knn.temperature, max_ids=K)
        ids[b0:b0 + len(xq)] = i
        probs[b0:b0 + len(xq)] = renormalise_float16(p)
    ids.flush()
    probs.flush()
    return {"n": n}


class TargetStore:
    """Read access to finished targets: (train) shard arrays and the validation arrays."""

    def __init__(self, run_dir: Path):
        self.dir = targets_dir(run_dir)
        self.manifest = m = require_manifest(self.dir, "knn-targets", "mlpmem knn-targets")
        K = m["K"]
        self.ids = [load_npy(self.dir / s["ids"], np.int32, s["stop"] - s["start"]) for s in m["shards"]]
        self.probs = [load_npy(self.dir / s["probs"], np.float16, s["stop"] - s["start"]) for s in m["shards"]]
        for a in self.ids + self.probs:
            if a.ndim != 2 or a.shape[1] != K:
                raise StageError(f"a target shard in {self.dir} has shape {a.shape}, expected (rows, {K}): "
                                 "rerun `mlpmem knn-targets --force`")
        self.n_validation = m["validation"]
        if self.n_validation:
            self.val_ids = load_npy(self.dir / "validation" / "ids.npy", np.int32, self.n_validation)
            self.val_probs = load_npy(self.dir / "validation" / "probs.npy", np.float16, self.n_validation)


# ----------------------------------------------------------------------------- kNN-LM scorer for eval

def load_knn_scorer(cfg: Config, lm) -> tuple[object | None, dict]:
    """A function (keys (M, d) float32, gold (M,)) -> log p_kNN(gold) per eval temperature; None if no index.

    A datastore or index that does not exist yet only skips kNN-LM (with a warning); one built for another model
    or hook point, or an index over another datastore, is an error: its keys would not be comparable.
    """
    from mlpmem.capture import resolve_hook

    for d, stage in ((datastore_dir(cfg.run_dir), "extract"), (index_dir(cfg.run_dir), "index")):
        m = read_manifest(d)
        if m is None or not m.get("complete"):
            log.warning("kNN-LM skipped: no complete %s output in %s (run `mlpmem %s`)", stage, d, stage)
            return None, {}
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    ds = Datastore(cfg.run_dir, expect_model=lm.identity, expect_hook=str(hook))
    index, im = open_index(cfg.run_dir, cfg.index.nprobe)
    if im["datastore_fingerprint"] != ds.manifest["fingerprint"]:
        raise StageError(f"the index in {index_dir(cfg.run_dir)} was built on another datastore: rerun "
                         "`mlpmem index --force`")
    k = cfg.eval.knn_k or cfg.knn.k
    if k > ds.n:
        raise StageError(f"--knn.k {k} is larger than the datastore ({ds.n} keys): lower --knn.k or --eval.knn_k")
    vals = ds.vals
    temps = list(cfg.eval.knn_temperatures)
    exact = cfg.knn.distances == "exact"

    def scorer(keys: torch.Tensor, gold: torch.Tensor) -> np.ndarray:
        xq = keys.float().cpu().numpy()
        D, I = search(index, xq, k)
        if exact:
            D = recompute_distances(ds.keys, xq, I)
        return knn_gold_logprobs(D, I, vals, gold.cpu().numpy(), temps)

    meta = {"fingerprint": fingerprint(ds.manifest["fingerprint"], im["fingerprint"], k, cfg.knn.distances,
                                       cfg.index.nprobe, temps),
            "bytes": ds.manifest["bytes"] + im["bytes"], "factory": im["factory"], "k": k}
    return scorer, meta
