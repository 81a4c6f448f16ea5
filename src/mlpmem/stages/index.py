"""Stage `index`: a FAISS index over this run's datastore, with its recall@k against exact search on real keys."""

from __future__ import annotations

import logging
import time

import numpy as np

from mlpmem.artifacts import DATASTORE, INDEX, Datastore, invalidate, should_skip, write_manifest
from mlpmem.components.index import build_index, exact_search, recall_at_k, resolve_factory, save_index, search, \
    set_nprobe
from mlpmem.components.knn import recompute_distances
from mlpmem.config import Config
from mlpmem.files import fingerprint
from mlpmem.runtime import on_main
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    return on_main(_index, cfg)  # one index per run; the other ranks wait


def _index(cfg: Config) -> dict:
    out = cfg.run_dir / INDEX
    ds = Datastore(cfg.run_dir, limit=cfg.knn.datastore_tokens)
    upstream = {DATASTORE: ds.fingerprint}
    spec = resolve_factory(cfg.index.factory, ds.n, ds.dim)
    ic = cfg.to_dict()["index"]
    fp = fingerprint("index", upstream, spec, {k: ic[k] for k in ("train_size", "add_chunk")}, cfg.seed, *ds.scope)
    done = should_skip(out, "index", fp, cfg.force, upstream, cfg.run_dir)
    if done:
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
        set_nprobe(index, cfg.index.nprobe)
        t1 = time.perf_counter()
        _, I = search(index, xq, k_rec)
        approx_qps = len(rows) / (time.perf_counter() - t1)
        D_ex, I_ex = exact_search(ds.keys, xq, k_rec)
        recall = _recall_with_ties(ds, xq, I, D_ex)
        id_recall = recall_at_k(I, I_ex)
        log.info("index: recall@%d = %.3f at nprobe %d (%.0f q/s)", k_rec, recall, cfg.index.nprobe, approx_qps)
    save_stage_config(cfg, "index", out)
    return write_manifest(out, "index", fp, upstream, factory=spec, ntotal=int(index.ntotal), dim=ds.dim,
                          datastore_fingerprint=ds.fingerprint, build_seconds=round(build_s, 2),
                          recall_at_k={"k": k_rec, "nprobe": cfg.index.nprobe, "recall": recall,
                                       "id_recall": id_recall},
                          bytes=(out / "index.faiss").stat().st_size)


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
