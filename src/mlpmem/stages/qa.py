"""Stage `qa`: the corpus-knowledge QA benchmark (see :mod:`mlpmem.components.qa` for the items and metrics).

Items come from this run's prepared train documents (held in: the datastore and the memory were built from them)
and test documents (held out: a control). Each system answers greedily and is scored by exact match and token F1;
the given answer's log-likelihood is scored too. Systems: the base LM, the fine-tuned LM when the run has one, and
kNN-LM, the memory and both mixed into the run's LM at the settings `mlpmem eval` tuned on validation perplexity
(nothing is tuned on the QA items). With --qa.rag, two more: RAG (BM25 over the train documents' passages, the
top --qa.rag_k put before the prompt; see :mod:`mlpmem.components.rag`) on the run's LM, and the same prompts with
the memory mixed in; each system's answers per second (RAG's including retrieval) are reported with its metrics, so
one run compares the memory's speed and accuracy with RAG's. Intervals resample documents. Writes ``qa/items.jsonl``,
``qa/predictions.jsonl``, ``qa/results.json``, ``qa/results.md`` and the items as lm-eval tasks in ``qa/lm_eval/``.
Each system's answers are saved as soon as they are made, so an interrupted run resumes with the next system.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from mlpmem.artifacts import DATA, base_model, invalidate, load_memory, load_offsets, load_split, open_knn, \
    read_manifest, should_skip, tuned_settings, verify_chain, write_manifest
from mlpmem.components.answers import Mixture, answer_scores, encode_pairs, greedy_continuations
from mlpmem.components.capture import resolve_hook
from mlpmem.components.lm import LoadedLM, load_lm
from mlpmem.components.qa import SIDES, Item, bootstrap_means, exact_match, mine_items, normalize, prediction, \
    token_f1, write_lm_eval_tasks
from mlpmem.components.rag import SEP, BM25Index, passages, rag_prompt
from mlpmem.components.tuning import system_logprobs
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import atomic_write_json, atomic_write_text, fingerprint, read_json
from mlpmem.runtime import on_main
from mlpmem.stages import save_stage_config
from mlpmem import systems as sy

log = logging.getLogger(__name__)

QA = "qa"
TASK = "mlpmem_qa"
MIXTURES = sy.QA_MIXTURES  # knn, memory, memory+knn over the run's LM at eval's tuned settings
RAG = sy.QA_RAG  # rag, rag+memory: over the run's LM, like the mixtures; rag+memory at the memory's tuned setting
METRICS = {"exact_match": "EM", "f1": "F1", "loglik": "answer log-lik"}


def run(cfg: Config) -> dict:
    return on_main(_qa, cfg)


def documents(cfg: Config, split: str, tokenizer, tokenizer_hash: str) -> list[str]:
    """The prepared split's documents as text (separators and special tokens dropped)."""
    tokens, _ = load_split(cfg.run_dir, split, tokenizer_hash)
    offsets = load_offsets(cfg.run_dir, split)
    sep = (read_manifest(cfg.run_dir / DATA) or {}).get("separator") or []
    docs = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        ids = tokens[a:b]
        if sep and len(ids) >= len(sep) and list(ids[len(ids) - len(sep):]) == list(sep):
            ids = ids[:len(ids) - len(sep)]
        docs.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return docs


def _items(cfg: Config, lm: LoadedLM, docs_of: dict[str, list[str]]) -> list[Item]:
    q, tok = cfg.qa, lm.tokenizer
    room = cfg.window.context - q.max_new_tokens

    def fits(it: Item) -> bool:  # prompt + answer + the decoded tokens within the model's window
        return len(tok(it.prompt + it.target, add_special_tokens=False)["input_ids"]) <= room

    items = []
    for split in SIDES:
        docs = docs_of[split]
        got = mine_items(docs, split, q.items, q.per_doc, q.kinds, q.min_prompt_words, cfg.seed, keep=fits)
        if not got:
            raise StageError(f"qa: no items in the {split} split's {len(docs)} documents: they hold no "
                             f"{' or '.join(q.kinds)} after {q.min_prompt_words} words of a sentence (lower "
                             "--qa.min_prompt_words, or use a corpus of factual prose)")
        if len(got) < q.items:
            log.warning("qa: only %d %s items (asked for %d): the split has few eligible answers", len(got), split,
                        q.items)
        items += got
    return items


def _systems(cfg: Config, settings: dict, finetuned: bool) -> list[str]:
    have = [s for s in MIXTURES if s in settings and settings[s]]
    rag = ([sy.RAG] + ([sy.RAG_MEMORY] if settings.get(sy.MEMORY) else [])) if cfg.qa.rag else []
    return [sy.BASE] + ([sy.FINETUNED] if finetuned else []) + have + rag


def _setting(s: str, settings: dict) -> dict:
    return settings.get(sy.MEMORY, {}) if s == sy.RAG_MEMORY else settings.get(s, {})


def _rag(cfg: Config, tokenizer, train_docs: list[str], items: list[Item]) -> dict:
    """Each item's RAG prompt (its top --qa.rag_k train passages by BM25 on its prompt, cut to fit the window),
    the seconds spent indexing (once) and retrieving + assembling (per question, counted in RAG's speed), and
    whether the answer is in the passages the model sees."""
    q = cfg.qa
    t0 = time.perf_counter()
    texts, _ = passages(train_docs, q.rag_passage_words)
    index = BM25Index(texts)
    t1 = time.perf_counter()
    room = cfg.window.context - q.max_new_tokens
    hits = index.search([it.prompt for it in items], q.rag_k)
    prompts, kept = [], []
    for it, ids in zip(items, hits):
        p, n = rag_prompt(tokenizer, [texts[i] for i in ids], it.prompt, it.target, room)
        prompts.append(p)
        kept.append(ids[:n])
    t2 = time.perf_counter()
    found = [f" {normalize(it.answer)} " in f" {normalize(p[:len(p) - len(SEP + it.prompt)] if k else '')} "
             for it, p, k in zip(items, prompts, kept)]
    log.info("qa rag: %d passages indexed in %.2fs; %d questions retrieved and assembled in %.2fs", len(texts),
             t1 - t0, len(items), t2 - t1)
    return {"prompts": prompts, "passages": kept, "found": np.array(found, dtype=np.float64),
            "summary": {"k": q.rag_k, "passage_words": q.rag_passage_words, "passages": len(texts),
                        "index_seconds": round(t1 - t0, 3), "retrieve_seconds": round(t2 - t1, 3),
                        "mean_passages_kept": round(float(np.mean([len(k) for k in kept])), 3)}}


def _mixture(system: str, setting: dict, memory, knn, vocab: int) -> Mixture:
    if system == sy.KNN:
        return Mixture(lam_knn=setting["lam"], knn=lambda h: knn.logprobs(h, setting["T"], vocab))
    if system in (sy.MEMORY, sy.RAG_MEMORY):
        return Mixture(lam_mem=setting["lam"], memory=memory, mem_temperature=setting["T_mem"])
    return Mixture(lam_mem=setting["lam_mem"], lam_knn=setting["lam_knn"], memory=memory,
                   mem_temperature=setting["T_mem"], knn=lambda h: knn.logprobs(h, setting["T"], vocab))


def _qa(cfg: Config) -> dict:
    out = cfg.run_dir / QA
    data_m = verify_chain(cfg.run_dir, DATA, "prepare")
    # QA uses the settings `mlpmem eval` tuned on validation, whichever systems it tuned; none: an error
    tuned = tuned_settings(cfg.run_dir, cfg.eval.out_name, memory=False)
    settings = tuned.systems
    mcfg, model_up = base_model(cfg)
    finetuned = bool(model_up)
    lm = load_lm(mcfg)
    upstream = {DATA: data_m["fingerprint"], cfg.eval.out_name: tuned.fingerprint, **model_up}
    qa_opts = {k: v for k, v in cfg.to_dict()["qa"].items() if cfg.qa.rag or not k.startswith("rag")}
    fp = fingerprint("qa", upstream, lm.identity["fingerprint"], qa_opts, cfg.to_dict()["window"]["context"],
                     cfg.model.dtype, cfg.seed)  # the rag options only when on: results without RAG stay valid
    done = should_skip(out, "qa", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        print(done["table"])
        return done
    invalidate(out)
    t_start = time.time()
    docs = {split: documents(cfg, split, lm.tokenizer, lm.identity["tokenizer_hash"]) for split in SIDES}
    items = _items(cfg, lm, docs)
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n"
                                                   for it in items))
    systems = _systems(cfg, settings, finetuned)
    lm_name = sy.FINETUNED if finetuned else sy.BASE
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    memory = knn = None
    if sy.uses_memory(systems):
        memory, _ = load_memory(cfg.run_dir, lm, hook, required=True)
    if sy.uses_knn(systems):
        knn = open_knn(cfg, lm, hook)
        if knn is None:
            raise StageError("qa: eval tuned kNN-LM but the datastore or index is gone: rerun `mlpmem pipeline`")
    prompts, targets = [it.prompt for it in items], [it.target for it in items]
    pairs = encode_pairs(lm.tokenizer, prompts, targets)

    # Answer log-likelihoods: one pass over the run's LM serves every mixture (the vanilla base needs its own).
    knn_T = sorted({settings[s]["T"] for s in systems if "T" in sy.SYSTEMS[s].tuned})
    mem_T = sorted({settings[s]["T_mem"] for s in systems if "T_mem" in sy.SYSTEMS[s].tuned}) or [1.0]
    sc, owner = answer_scores(lm, pairs, cfg.qa.batch_size, hook=hook, memory=memory, mem_temperatures=mem_T,
                              knn_scorer=knn.scorer(knn_T) if knn is not None else None)
    per_item = lambda lp: np.bincount(owner, weights=lp, minlength=len(items))  # noqa: E731
    loglik = {lm_name: per_item(sc.lm)}
    for s in systems:
        if s in MIXTURES:
            loglik[s] = per_item(system_logprobs(sc, s, settings[s], cfg))
    base_lm = lm
    if finetuned:
        base_lm = load_lm(cfg.model)
        sc0, owner0 = answer_scores(base_lm, encode_pairs(base_lm.tokenizer, prompts, targets), cfg.qa.batch_size)
        loglik[sy.BASE] = np.bincount(owner0, weights=sc0.lm, minlength=len(items))
    prompt_of = {s: prompts for s in systems}
    prompt_tokens = {s: float(np.mean([len(c) for c, _ in pairs])) for s in systems}
    rag = None
    if cfg.qa.rag:  # the answers' log-likelihood given the RAG prompts, the run's LM alone and with the memory
        rag = _rag(cfg, lm.tokenizer, docs["train"], items)
        rag_pairs = encode_pairs(lm.tokenizer, rag["prompts"], targets)
        with_mem = sy.RAG_MEMORY in systems
        sc_r, owner_r = answer_scores(lm, rag_pairs, cfg.qa.batch_size, hook=hook if with_mem else None,
                                      memory=memory if with_mem else None,
                                      mem_temperatures=[settings[sy.MEMORY]["T_mem"]] if with_mem else (1.0,))
        loglik[sy.RAG] = np.bincount(owner_r, weights=sc_r.lm, minlength=len(items))
        if with_mem:
            lp = system_logprobs(sc_r, sy.MEMORY, settings[sy.MEMORY], cfg)
            loglik[sy.RAG_MEMORY] = np.bincount(owner_r, weights=lp, minlength=len(items))
        for s in RAG:
            prompt_of[s], prompt_tokens[s] = rag["prompts"], float(np.mean([len(c) for c, _ in rag_pairs]))

    # Greedy answers, one system at a time, each saved as soon as it is made.
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    preds, seconds = {}, {}
    for s in systems:
        part = out / "parts" / f"{s.replace('+', '_')}.json"
        saved = read_json(part) if part.exists() and not cfg.force else None
        if isinstance(saved, dict) and saved.get("fingerprint") == fp:
            preds[s], seconds[s] = saved["continuations"], saved["seconds"]
            continue
        t0 = time.time()
        mix = _mixture(s, _setting(s, settings), memory, knn, vocab) if s in MIXTURES + (sy.RAG_MEMORY,) else None
        preds[s] = greedy_continuations(base_lm if s == sy.BASE else lm, prompt_of[s], cfg.qa.max_new_tokens,
                                        cfg.qa.batch_size, mix=mix, hook=hook, desc=f"qa {s}")
        seconds[s] = round(time.time() - t0, 2)
        log.info("qa %s: %d items in %.1fs", s, len(items), seconds[s])
        atomic_write_json(part, {"fingerprint": fp, "continuations": preds[s], "seconds": seconds[s]})

    res = _summarise(items, systems, lm_name, preds, loglik, cfg.seed)
    # Speed: greedy answering of every item, one system after another in this process; RAG's retrieval and prompt
    # assembly counted (its index, built once, is not, like the memory's training and the datastore's index).
    retrieve = rag["summary"]["retrieve_seconds"] if rag else 0.0
    speed = {}
    for s in systems:
        total = seconds[s] + (retrieve if s in RAG else 0.0)
        speed[s] = {"seconds": round(total, 3), "items_per_s": round(len(items) / max(total, 1e-9), 3),
                    "prompt_tokens": round(prompt_tokens[s], 1)}
    res.update(settings={s: _setting(s, settings) for s in systems}, lm=lm_name, model=lm.identity,
               data={"source": cfg.data.source, "fingerprint": data_m["fingerprint"]}, seconds=seconds,
               speed=speed, device=str(lm.device), batch_size=cfg.qa.batch_size, fingerprint=fp,
               qa=cfg.to_dict()["qa"])
    if rag:
        found = {side: round(float(rag["found"][[it.split == split for it in items]].mean()), 4)
                 for split, side in SIDES.items() if any(it.split == split for it in items)}
        res[sy.RAG] = {**rag["summary"], "answer_in_passages": found}
    table = qa_table(res)
    _write_predictions(out, items, systems, preds, loglik, rag["passages"] if rag else None)
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", f"# mlpmem corpus-knowledge QA\n\n{table}\n")
    tasks = write_lm_eval_tasks(out / "lm_eval", items, TASK, cfg.qa.max_new_tokens)
    save_stage_config(cfg, "qa", out)
    print(table)
    print(f"\nlm-eval: --include_path {out / 'lm_eval'} --tasks {TASK} ({len(tasks) - 1} files)")
    return write_manifest(out, "qa", fp, upstream, table=table, results="results.json", items=len(items),
                          seconds=round(time.time() - t_start, 1))


def _summarise(items: list[Item], systems: list[str], lm_name: str, preds: dict, loglik: dict, seed: int) -> dict:
    """Per side: each system's mean metrics with intervals and the paired differences that matter."""
    pairs = [(s, lm_name) for s in systems if s in MIXTURES]
    pairs += [(sy.FINETUNED, sy.BASE)] if lm_name == sy.FINETUNED else []
    pairs += [(a, sy.KNN) for a in (sy.MEMORY, sy.MEMORY_KNN) if a in systems and sy.KNN in systems]
    if sy.RAG in systems:
        pairs += [(sy.RAG, lm_name)] + [(a, sy.RAG) for a in (sy.MEMORY, sy.RAG_MEMORY) if a in systems]
    sides = {}
    for split, side in SIDES.items():
        idx = np.array([i for i, it in enumerate(items) if it.split == split])
        if not len(idx):
            continue
        docs = np.array([items[i].doc for i in idx])
        side_res = {"items": int(len(idx)), "documents": int(len(set(docs.tolist()))), "systems": {},
                    "comparisons": {}}
        for metric in METRICS:
            vals = {}
            for s in systems:
                if metric == "loglik":
                    vals[s] = loglik[s][idx]
                else:
                    fn = exact_match if metric == "exact_match" else token_f1
                    vals[s] = np.array([fn(prediction(preds[s][i], items[i].answer), items[i].answer) for i in idx])
            means, diffs = bootstrap_means(vals, docs, pairs, seed=seed)
            for s, m in means.items():
                side_res["systems"].setdefault(s, {})[metric] = m
            for (a, b), d in diffs.items():
                side_res["comparisons"].setdefault(f"{a} vs {b}", {})[metric] = d
        sides[side] = side_res
    return {"systems": systems, "sides": sides}


def _write_predictions(out, items, systems, preds, loglik, retrieved=None) -> None:
    rows = []
    for i, it in enumerate(items):
        row = {"id": it.id, "answer": it.answer}
        if retrieved is not None:
            row["rag_passages"] = retrieved[i]  # the passage ids the RAG prompt holds, best first
        for s in systems:
            p = prediction(preds[s][i], it.answer)
            row[s] = {"prediction": p, "continuation": preds[s][i], "exact_match": exact_match(p, it.answer),
                      "f1": round(token_f1(p, it.answer), 4), "loglik": round(float(loglik[s][i]), 4)}
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out / "predictions.jsonl", "\n".join(rows) + "\n")


def _fmt(metric: str, m: dict, diff: bool = False) -> str:
    if metric == "loglik":
        v, (lo, hi) = m["change" if diff else "mean"], m["ci95"]
        return f"{v:+.2f} [{lo:+.2f}, {hi:+.2f}]" if diff else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"
    v, (lo, hi) = 100 * m["change" if diff else "mean"], (100 * x for x in m["ci95"])
    return f"{v:+.1f} [{lo:+.1f}, {hi:+.1f}]" if diff else f"{v:.1f} [{lo:.1f}, {hi:.1f}]"


def _label(s: str, res: dict) -> str:
    st = res["settings"].get(s) or {}
    label = sy.SYSTEMS[s].label
    over = " (on the fine-tuned LM)" if res["lm"] == sy.FINETUNED and s in MIXTURES + RAG else ""
    if s == sy.RAG:
        return f"{label}{over} (BM25, top {res[sy.RAG]['k']})"
    if s == sy.MEMORY_KNN:
        return f"{label}{over} (λ_mem {st['lam_mem']:g}, λ_kNN {st['lam_knn']:g})"
    return f"{label}{over} (λ {st['lam']:g})" if "lam" in st else label


def qa_table(res: dict) -> str:
    """Markdown: each system's EM, F1 (%) and mean answer log-likelihood (nats) per side with 95% intervals and its
    greedy answers per second (when recorded), then the paired differences (points of EM/F1, nats)."""
    sides = [s for s in ("heldin", "heldout") if s in res["sides"]]
    name = {"heldin": "held-in", "heldout": "held-out"}
    cols = [f"{name[sd]} {METRICS[m]}" for sd in sides for m in METRICS]
    speed = res.get("speed") or {}
    counts = ", ".join(f"{name[sd]}: {res['sides'][sd]['items']} items from {res['sides'][sd]['documents']} "
                       "documents" for sd in sides)
    extra = ["answers/s", "prompt tokens"] if speed else []
    lines = [f"Corpus-knowledge QA ({counts}); EM and F1 in %, answer log-likelihood in nats per answer; 95% "
             "intervals resample documents.", "", "| system | " + " | ".join(cols + extra) + " |",
             "|---" * (len(cols) + len(extra) + 1) + "|"]
    for s in res["systems"]:
        cells = [_fmt(m, res["sides"][sd]["systems"][s][m]) for sd in sides for m in METRICS]
        if speed:
            cells += [f"{speed[s]['items_per_s']:.2f}", f"{speed[s]['prompt_tokens']:.0f}"]
        lines.append(f"| {_label(s, res)} | " + " | ".join(cells) + " |")
    if speed:
        n = sum(res["sides"][sd]["items"] for sd in sides)
        note = (f"Answers/s: greedy answers to all {n} items (batches of {res.get('batch_size', '?')}, on "
                f"{res.get('device', '?')}), each system in turn in this run")
        rag = res.get(sy.RAG)
        if rag:
            found = ", ".join(f"{name[sd]} {100 * v:.0f}%" for sd, v in rag["answer_in_passages"].items())
            note += (f"; RAG's include BM25 retrieval and prompt assembly ({rag['retrieve_seconds']:.2f}s), not "
                     f"indexing its {rag['passages']} passages of ≤{rag['passage_words']} words "
                     f"({rag['index_seconds']:.2f}s, once). The answer is in the passages RAG shows for {found} "
                     f"of the items (mean {rag['mean_passages_kept']:.1f} passages kept)")
        lines += ["", note + "."]
    comps = list(res["sides"][sides[0]]["comparisons"])
    if comps:
        lines += ["", "| difference | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for c in comps:
            a, _, b = c.partition(" vs ")
            cells = [_fmt(m, res["sides"][sd]["comparisons"][c][m], diff=True) for sd in sides for m in METRICS]
            lines.append(f"| {sy.SYSTEMS[a].label} − {sy.SYSTEMS[b].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
