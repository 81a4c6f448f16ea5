"""Stage `eval`: load what exists (LM, memory, index), score the splits in one pass, tune, report.

Under torchrun each process scores a contiguous share of every split's windows and saves its per-position gold
log-probabilities to ``<eval>/scores/<split>-<rank>-of-<world>.npz`` (a few numbers per token); rank 0 joins
the shares in order, so the results equal a single-process run. The saved scores also make the stage resumable:
a rerun with the same fingerprint and process count reuses them instead of scoring again.

With --eval.ood_source, a corpus of another domain is scored too, as a split named ``ood``, with every system at
the settings tuned on validation (never on it): does the LM + memory, at its in-domain lambda, stay safe on text
the memory knows nothing about? Eval prepares that corpus once into ``<run>/ood/`` (its own manifest, outside
`prepare`'s fingerprint, so adding it leaves every other stage of a run up to date).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from mlpmem.artifacts import DATA, FORMAT_VERSION, JOINT, MEMORY, base_model, claim, invalidate, joint_model, \
    load_memory, load_offsets, load_scores, load_split, open_knn, read_manifest, save_scores, scores_path, \
    should_skip, verify_chain, write_manifest
from mlpmem.artifacts.readers import OOD
from mlpmem.components.capture import resolve_hook
from mlpmem.components.data import corpus_fingerprint, read_corpus, shuffle_documents, tokenize_split, vocab_bound
from mlpmem.components.lm import load_lm
from mlpmem.components.report import plot_lambda, plot_training, results_table
from mlpmem.components.scoring import Scored, score_tokens
from mlpmem.components.tuning import MAX_WIDENINGS, doc_ids_of, settle, warn_edges, widened_grids
from mlpmem.config import Config
from mlpmem.errors import CorpusError
from mlpmem.files import atomic_save_npy, atomic_write_json, atomic_write_text, fingerprint, listing_problem
from mlpmem.runtime import barrier, broadcast_from_main, dist_info, fault_point, on_main
from mlpmem.stages import save_stage_config
from mlpmem import systems as sy

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
    ood = None
    if cfg.eval.ood_source is not None:
        ood = ood_plan(cfg, lm.identity["tokenizer_hash"], data_m["separator"])
        # missing or damaged: prepare it now (the same fingerprint: nothing made from an earlier copy goes stale)
        on_main(_prepare_ood, cfg, lm.tokenizer, ood, False)
        upstream[OOD] = ood.fp
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer) if systems - {sy.BASE} else None
    memory, mem_meta, make_scorer, knn_meta = None, {}, None, {}
    if sy.uses_memory(systems):
        memory, mem_meta = load_memory(cfg.run_dir, lm, hook, path=mem_path, required=mem_path is not None)
        if mem_path is not None:
            mem_meta["fingerprint"] = model_up[JOINT]  # the joint manifest vouches for both
        elif memory is not None:
            upstream[MEMORY] = mem_meta["fingerprint"]
    if sy.uses_knn(systems):
        knn = open_knn(cfg, lm, hook)
        if knn is not None:
            make_scorer, knn_meta = knn.scorer, knn.meta
            upstream.update(knn_meta["upstream"])
    settings = cfg.to_dict()["eval"]
    if ood is None:  # evaluations made before --eval.ood_source existed keep their fingerprints
        settings = {k: v for k, v in settings.items() if k not in ("ood_source", "ood_tokens")}
    fp = fingerprint("eval", upstream, lm.identity["fingerprint"], settings, cfg.to_dict()["window"],
                     cfg.model.dtype, knn_meta.get("settings"), cfg.seed)
    dist = dist_info()
    done = should_skip(out, "eval", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        if dist.is_main:
            print(done["table"])
        return done
    if ood is not None:  # prepared with other settings (eval reruns, so those are replaced): prepare it again
        on_main(_prepare_ood, cfg, lm.tokenizer, ood, True)
    barrier()  # every rank has seen the old manifest before rank 0 removes it
    if dist.is_main:
        invalidate(out)  # from here until the new manifest, results.json is not vouched for
    # Score, tune, and while a tuned temperature (or a lambda of a grid short of 0/1) sits on the edge of its
    # grid, widen the grid and score again (temperatures), or only tune again (lambdas): at most MAX_WIDENINGS.
    grids = {"knn_temperatures": sorted(cfg.eval.knn_temperatures),
             "memory_temperatures": sorted(cfg.eval.memory_temperatures), "lambdas": sorted(cfg.eval.lambdas)}
    scored: dict = {}
    prev: dict | None = None  # the grids of the round before (None: score in the first round)
    for rnd in range(MAX_WIDENINGS + 1):
        if prev is None or _temperatures(grids) != _temperatures(prev):
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
                          for split in eval_splits(cfg)}
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
    if sy.MEMORY_GATE in results["settings"] and sy.MEMORY in results["systems_meta"]:
        # the memory's size and speed: the gate adds 7 floats, and its features were timed with the memory
        results["systems_meta"][sy.MEMORY_GATE] = dict(results["systems_meta"][sy.MEMORY])
    results["model"] = lm.identity
    results["data"] = {"source": cfg.data.source, "fingerprint": data_m["fingerprint"]}
    if ood is not None:
        counts = read_manifest(cfg.run_dir / OOD)["counts"][OOD]
        results["ood"] = {"source": cfg.eval.ood_source, "fingerprint": ood.fp, "corpus_fingerprint": ood.c_fp,
                          **counts}
    results["window"] = cfg.to_dict()["window"]
    results["dtype"] = cfg.model.dtype
    table = results_table(results)
    atomic_write_json(out / "results.json", results)
    if "gate" in results:  # the gate (or why the fixed λ was kept) for generation; results.json holds it too
        atomic_write_json(out / "gate.json", {**results["gate"], "fingerprint": fp})
    else:
        (out / "gate.json").unlink(missing_ok=True)
    atomic_write_text(out / "results.md", _markdown(results, table))
    plot_lambda(results, out / "ppl_vs_lambda.png")
    if memory is not None:
        plot_training(cfg.run_dir / (JOINT if cfg.eval.joint else MEMORY) / "metrics.jsonl", out / "training.png")
    save_stage_config(cfg, "eval", out)
    fault_point("eval.results")
    print(table)
    return write_manifest(out, "eval", fp, upstream, table=table, results="results.json",
                          processes=dist.world_size)


def eval_splits(cfg: Config) -> list[str]:
    """The splits eval scores: --eval.splits, and with --eval.ood_source the split 'ood', always last so that the
    settings are tuned on another (validation; see components.tuning.settle)."""
    splits = [s for s in cfg.eval.splits if s != OOD]
    return splits + [OOD] if cfg.eval.ood_source is not None else splits


@dataclass(frozen=True)
class OodPlan:
    """The out-of-domain corpus as eval will prepare it: ``docs`` in the order the token cap cuts them."""

    fp: str
    c_fp: str
    docs: list[str]
    settings: dict
    separator: list[int]
    tokenizer_hash: str


def ood_plan(cfg: Config, tokenizer_hash: str, separator: list[int]) -> OodPlan:
    """Read --eval.ood_source with --data's reader options (text_field, doc_per, skip_bad_records; every split of a
    dataset that has splits), shuffle its documents by --data.seed (so that the cap keeps a random sample, not the
    first chapters) and fingerprint what would be prepared: no tokenization, so eval can tell whether ood/ is up to
    date before it decides to run."""
    src = cfg.eval.ood_source
    try:
        raw = read_corpus(dataclasses.replace(cfg.data, source=src))
    except CorpusError as e:  # the reader names the flag it usually reads
        raise CorpusError(str(e).replace("--data.source", "--eval.ood_source")) from None
    docs = [d for split in raw.values() for d in split if d.strip()]
    if not docs:
        raise CorpusError(f"--eval.ood_source {src}: the corpus has no non-empty documents")
    docs = shuffle_documents(docs, cfg.data.seed, OOD)
    c_fp = corpus_fingerprint({OOD: docs}, (OOD,))
    settings = {"source": src, "tokens": cfg.eval.ood_tokens, "seed": cfg.data.seed,
                **{k: getattr(cfg.data, k) for k in ("text_field", "doc_per", "skip_bad_records")}}
    return OodPlan(fingerprint("ood", settings, tokenizer_hash, separator, c_fp), c_fp, docs, settings,
                   list(separator), tokenizer_hash)


def _prepare_ood(cfg: Config, tok, plan: OodPlan, replace: bool) -> dict:
    """``<run>/ood/{tokens,offsets}.npy`` and its manifest (no upstream: it depends on the source, the tokenizer
    and --data.seed, which its fingerprint covers), laid out as a prepared split (separator between documents,
    whole documents up to --eval.ood_tokens). Kept when whole and made by ``plan`` (or by other settings, unless
    ``replace``)."""
    out = cfg.run_dir / OOD
    claim(out, OOD)
    m = read_manifest(out)
    if m and m.get("complete") and m.get("format_version") == FORMAT_VERSION and \
            (m.get("fingerprint") == plan.fp or not replace) and listing_problem(out, m.get("files") or {}) is None:
        return m
    invalidate(out)
    tokens, offsets = tokenize_split(tok, plan.docs, plan.separator, cfg.eval.ood_tokens)
    if tokens.size < 2:
        raise CorpusError(f"--eval.ood_source {cfg.eval.ood_source}: fewer than 2 tokens")
    atomic_save_npy(out / "tokens.npy", tokens)
    atomic_save_npy(out / "offsets.npy", offsets)
    counts = {"tokens": int(tokens.size), "documents": int(len(offsets) - 1)}
    log.info("eval: out-of-domain corpus %s: %d of its %d documents, %d tokens", cfg.eval.ood_source,
             counts["documents"], len(plan.docs), counts["tokens"])
    return write_manifest(out, OOD, plan.fp, upstream={}, tokenizer_hash=plan.tokenizer_hash,
                          tokenizer_name=cfg.model.name, corpus_fingerprint=plan.c_fp, separator=plan.separator,
                          counts={OOD: counts}, source=cfg.eval.ood_source, documents_in_source=len(plan.docs),
                          vocab_size=vocab_bound(tok), settings=plan.settings)


def _temperatures(grids: dict) -> tuple:
    return tuple(grids["knn_temperatures"]), tuple(grids["memory_temperatures"])


def _score_splits(cfg: Config, lm, hook, memory, scorer, mem_temperatures, out, fp, dist, reuse: bool) -> dict:
    """{split: Scored} of this process's share of every split, saved under the eval fingerprint (with the
    temperatures they were scored at); with ``reuse``, shares already saved under ``fp`` are read instead."""
    scored = {}
    for split in eval_splits(cfg):
        mine = scores_path(out, split, dist.rank, dist.world_size)
        sc = load_scores(mine, fp) if reuse else None
        if sc is None:
            tokens, _ = load_split(cfg.run_dir, split, lm.identity["tokenizer_hash"])
            t0 = time.time()
            sc = score_tokens(lm, tokens, cfg.window.context, cfg.window.stride, cfg.window.batch_size,
                              hook=hook if (memory is not None or scorer is not None) else None, memory=memory,
                              mem_temperatures=mem_temperatures, knn_scorer=scorer, desc=f"eval {split}",
                              shard=(dist.rank, dist.world_size),
                              gate_features=sy.MEMORY_GATE in cfg.eval.systems)  # the adaptive gate's inputs
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
    meta = {sy.BASE: {"params": lm.identity["n_params"], "tokens_per_s": tps("lm")}}
    if mem_meta:
        meta[sy.MEMORY] = {"params": mem_meta["params"], "storage_bytes": mem_meta["bytes"],
                           "tokens_per_s": tps("lm", "memory")}
        meta[sy.MEMORY_ALONE] = dict(meta[sy.MEMORY])
    if knn_meta:
        meta[sy.KNN] = {"storage_bytes": knn_meta["bytes"], "tokens_per_s": tps("lm", "knn")}
    if mem_meta and knn_meta:
        meta[sy.MEMORY_KNN] = {"params": mem_meta["params"],
                               "storage_bytes": mem_meta["bytes"] + knn_meta["bytes"],
                               "tokens_per_s": tps("lm", "memory", "knn")}
    return meta


def _markdown(results: dict, table: str) -> str:
    w = results["window"]
    lines = ["# mlpmem evaluation", "",
             f"Model: {results['model']['name']} ({results['dtype']}); corpus: {results['data']['source']}; "
             f"windows {w['context']}/{w['stride']}; settings tuned on {results['tuned_on']}.", ""]
    if "ood" in results:
        o = results["ood"]
        lines += [f"Out-of-domain split `ood`: {o['source']}, {o['tokens']} tokens of {o['documents']} documents "
                  f"(shuffled by --data.seed), every system at the settings tuned on {results['tuned_on']}.", ""]
    lines += [table, "", "Storage: memory = its parameters on disk; kNN-LM = keys + values + index. "
              "tokens/s: measured in this evaluation pass (LM forward shared).", ""]
    return "\n".join(lines)
