"""Stage `eval`: load what exists (LM, memory, index), score the splits in one pass, tune, report.

Under torchrun each process scores a contiguous share of every split's windows and saves its per-position gold
log-probabilities to ``<eval>/scores/<split>-<rank>-of-<world>.npz`` (a few numbers per token); rank 0 joins
the shares in order, so the results equal a single-process run. The saved scores also make the stage resumable:
a rerun with the same fingerprint and process count reuses them instead of scoring again.
"""

from __future__ import annotations

import dataclasses
import logging
import time


from mlpmem.artifacts import DATA, JOINT, MEMORY, base_model, invalidate, joint_model, load_memory, load_offsets, \
    load_scores, load_split, open_knn, save_scores, scores_path, should_skip, verify_chain, write_manifest
from mlpmem.components.capture import resolve_hook
from mlpmem.components.lm import load_lm
from mlpmem.components.report import plot_lambda, plot_training, results_table
from mlpmem.components.scoring import Scored, score_tokens
from mlpmem.components.tuning import MAX_WIDENINGS, doc_ids_of, settle, warn_edges, widened_grids
from mlpmem.config import Config
from mlpmem.files import atomic_write_json, atomic_write_text, fingerprint
from mlpmem.runtime import barrier, broadcast_from_main, dist_info, fault_point
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    out = cfg.run_dir / cfg.eval.out_name
    mem_path = None
    if cfg.eval.joint:  # the pair trained together by `mlpmem joint`
        mcfg, mem_path, joint_m = joint_model(cfg)
        model_up = {JOINT: joint_m["fingerprint"]}
    else:
        mcfg, model_up = base_model(cfg)
    lm = load_lm(mcfg)
    systems = set(cfg.eval.systems)
    data_m = verify_chain(cfg.run_dir, DATA, "prepare")
    upstream = {DATA: data_m["fingerprint"], **model_up}
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer) if systems - {"base"} else None
    memory, mem_meta, make_scorer, knn_meta = None, {}, None, {}
    if systems & {"memory", "memory+knn"}:
        memory, mem_meta = load_memory(cfg.run_dir, lm, hook, path=mem_path, required=mem_path is not None)
        if mem_path is not None:
            mem_meta["fingerprint"] = model_up[JOINT]  # the joint manifest vouches for both
        elif memory is not None:
            upstream[MEMORY] = mem_meta["fingerprint"]
    if systems & {"knn", "memory+knn"}:
        knn = open_knn(cfg, lm, hook)
        if knn is not None:
            make_scorer, knn_meta = knn.scorer, knn.meta
            upstream.update(knn_meta["upstream"])
    fp = fingerprint("eval", upstream, lm.identity["fingerprint"], cfg.to_dict()["eval"], cfg.to_dict()["window"],
                     cfg.model.dtype, knn_meta.get("settings"), cfg.seed)
    dist = dist_info()
    done = should_skip(out, "eval", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        if dist.is_main:
            print(done["table"])
        return done
    barrier()  # every rank has seen the old manifest before rank 0 removes it
    if dist.is_main:
        invalidate(out)  # from here until the new manifest, results.json is not vouched for
    # Score, tune, and while a tuned temperature (or a lambda of a grid short of 0/1) sits on the edge of its
    # grid, widen the grid and score again (temperatures), or only tune again (lambdas): at most MAX_WIDENINGS.
    grids = {"knn_temperatures": sorted(cfg.eval.knn_temperatures),
             "memory_temperatures": sorted(cfg.eval.memory_temperatures), "lambdas": sorted(cfg.eval.lambdas)}
    scored: dict = {}
    for rnd in range(MAX_WIDENINGS + 1):
        if rnd == 0 or _temperatures(grids) != _temperatures(prev):
            scorer = make_scorer(grids["knn_temperatures"]) if make_scorer is not None else None
            scored = _score_splits(cfg, lm, hook, memory, scorer, grids["memory_temperatures"], out, fp, dist,
                                   reuse=rnd == 0 and not cfg.force)
            any_sc = next(iter(scored.values()))  # reused scores may have been widened by an interrupted run
            grids.update({k: sorted(t) for k, t in (("knn_temperatures", any_sc.knn_T),
                                                   ("memory_temperatures", any_sc.mem_T)) if t is not None})
            barrier()  # every share of every split is on disk
        new = None
        if dist.is_main:
            if dist.world_size > 1:
                scored = {split: Scored.join([load_scores(scores_path(out, split, r, dist.world_size), fp,
                                                          strict=True) for r in range(dist.world_size)])
                          for split in cfg.eval.splits}
            docs = {split: doc_ids_of(load_offsets(cfg.run_dir, split), sc.n) for split, sc in scored.items()}
            ecfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, lambdas=grids["lambdas"]))
            results = settle(scored, ecfg, docs)
            if rnd < MAX_WIDENINGS:
                new = widened_grids(results, scored[results["tuned_on"]], ecfg)
            if new is not None:
                log.warning("eval: tuned values on the edge of their grids (%s): widening them to %s", "; ".join(
                    f"{s} {', '.join(e)}" for s, e in results["edges"].items()),
                    {k: v for k, v in new.items() if v != grids[k]})
        new = broadcast_from_main(new)
        if new is None:
            break
        prev, grids = grids, new
    if not dist.is_main:
        return {}
    warn_edges(results, "eval")
    results["widened"] = rnd > 0
    results["fingerprint"] = fp  # ties results.json to the manifest written after it
    results["systems_meta"] = _systems_meta(lm, scored, mem_meta, knn_meta)
    results["model"] = lm.identity
    results["data"] = {"source": cfg.data.source, "fingerprint": data_m["fingerprint"]}
    results["window"] = cfg.to_dict()["window"]
    results["dtype"] = cfg.model.dtype
    table = results_table(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", _markdown(results, table))
    plot_lambda(results, out / "ppl_vs_lambda.png")
    if memory is not None:
        plot_training(cfg.run_dir / (JOINT if cfg.eval.joint else MEMORY) / "metrics.jsonl", out / "training.png")
    save_stage_config(cfg, "eval", out)
    fault_point("eval.results")
    print(table)
    return write_manifest(out, "eval", fp, upstream, table=table, results="results.json",
                          processes=dist.world_size)


def _temperatures(grids: dict) -> tuple:
    return tuple(grids["knn_temperatures"]), tuple(grids["memory_temperatures"])


def _score_splits(cfg: Config, lm, hook, memory, scorer, mem_temperatures, out, fp, dist, reuse: bool) -> dict:
    """{split: Scored} of this process's share of every split, saved under the eval fingerprint (with the
    temperatures they were scored at); with ``reuse``, shares already saved under ``fp`` are read instead."""
    scored = {}
    for split in cfg.eval.splits:
        mine = scores_path(out, split, dist.rank, dist.world_size)
        sc = load_scores(mine, fp) if reuse else None
        if sc is None:
            tokens, _ = load_split(cfg.run_dir, split, lm.identity["tokenizer_hash"])
            t0 = time.time()
            sc = score_tokens(lm, tokens, cfg.window.context, cfg.window.stride, cfg.window.batch_size,
                              hook=hook if (memory is not None or scorer is not None) else None, memory=memory,
                              mem_temperatures=mem_temperatures, knn_scorer=scorer, desc=f"eval {split}",
                              shard=(dist.rank, dist.world_size))
            log.info("eval %s: %d tokens in %.1fs", split, sc.n, time.time() - t0)
            save_scores(mine, sc, fp)
        else:
            log.info("eval %s: reusing the scores saved in %s", split, mine)
        scored[split] = sc
    if reuse and len({(tuple(sc.knn_T or ()), tuple(sc.mem_T or ())) for sc in scored.values()}) > 1:
        # an evaluation interrupted while widening its grids: some splits were scored again, some not
        return _score_splits(cfg, lm, hook, memory, scorer, mem_temperatures, out, fp, dist, reuse=False)
    return scored


def _systems_meta(lm, scored, mem_meta: dict, knn_meta: dict) -> dict:
    """Parameters, storage bytes and tokens/s per system (timed on the splits just scored; per process when
    several processes shared the work)."""
    n = sum(s.n for s in scored.values())
    secs = {k: sum(s.seconds.get(k, 0.0) for s in scored.values()) for k in ("lm", "memory", "knn")}
    tps = lambda *parts: n / max(sum(secs[p] for p in parts), 1e-9)  # noqa: E731
    meta = {"base": {"params": lm.identity["n_params"], "tokens_per_s": tps("lm")}}
    if mem_meta:
        meta["memory"] = {"params": mem_meta["params"], "storage_bytes": mem_meta["bytes"],
                          "tokens_per_s": tps("lm", "memory")}
        meta["memory alone"] = dict(meta["memory"])
    if knn_meta:
        meta["knn"] = {"storage_bytes": knn_meta["bytes"], "tokens_per_s": tps("lm", "knn")}
    if mem_meta and knn_meta:
        meta["memory+knn"] = {"params": mem_meta["params"],
                              "storage_bytes": mem_meta["bytes"] + knn_meta["bytes"],
                              "tokens_per_s": tps("lm", "memory", "knn")}
    return meta


def _markdown(results: dict, table: str) -> str:
    w = results["window"]
    lines = ["# mlpmem evaluation", "",
             f"Model: {results['model']['name']} ({results['dtype']}); corpus: {results['data']['source']}; "
             f"windows {w['context']}/{w['stride']}; settings tuned on {results['tuned_on']}.", "", table, "",
             "Storage: memory = its parameters on disk; kNN-LM = keys + values + index. "
             "tokens/s: measured in this evaluation pass (LM forward shared).", ""]
    return "\n".join(lines)
