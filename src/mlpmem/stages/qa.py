"""Stage `qa`: the corpus-knowledge QA benchmark (see :mod:`mlpmem.components.qa` for the items and metrics).

Items come from this run's prepared train documents (held in: the datastore and the memory were built from them)
and test documents (held out: a control). Each system answers greedily and is scored by exact match and token F1;
the given answer's log-likelihood is scored too. Systems: the base LM, the fine-tuned LM when the run has one, and
kNN-LM, the memory and both mixed into the run's LM at the settings `mlpmem eval` tuned on validation perplexity
(nothing is tuned on the QA items). Intervals resample documents. Writes ``qa/items.jsonl``,
``qa/predictions.jsonl``, ``qa/results.json``, ``qa/results.md`` and the items as lm-eval tasks in ``qa/lm_eval/``.
Each system's answers are saved as soon as they are made, so an interrupted run resumes with the next system.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from mlpmem.artifacts import DATA, base_model, invalidate, load_eval_results, load_memory, load_offsets, \
    load_split, open_knn, read_manifest, should_skip, verify_chain, write_manifest
from mlpmem.components.answers import Mixture, answer_scores, encode_pairs, greedy_continuations
from mlpmem.components.capture import resolve_hook
from mlpmem.components.lm import LoadedLM, load_lm
from mlpmem.components.qa import SIDES, Item, bootstrap_means, exact_match, mine_items, prediction, token_f1, \
    write_lm_eval_tasks
from mlpmem.components.tuning import system_logprobs
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import atomic_write_json, atomic_write_text, fingerprint, read_json
from mlpmem.runtime import on_main
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)

QA = "qa"
TASK = "mlpmem_qa"
MIXTURES = ("knn", "memory", "memory+knn")
LABELS = {"base": "base LM", "fine-tuned": "fine-tuned LM", "knn": "kNN-LM", "memory": "memory",
          "memory+knn": "memory + kNN-LM"}
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


def _items(cfg: Config, lm: LoadedLM) -> list[Item]:
    q, tok = cfg.qa, lm.tokenizer
    room = cfg.window.context - q.max_new_tokens

    def fits(it: Item) -> bool:  # prompt + answer + the decoded tokens within the model's window
        return len(tok(it.prompt + it.target, add_special_tokens=False)["input_ids"]) <= room

    items = []
    for split in SIDES:
        docs = documents(cfg, split, tok, lm.identity["tokenizer_hash"])
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
    return ["base"] + (["fine-tuned"] if finetuned else []) + have


def _mixture(system: str, setting: dict, memory, knn, vocab: int) -> Mixture:
    if system == "knn":
        return Mixture(lam_knn=setting["lam"], knn=lambda h: knn.logprobs(h, setting["T"], vocab))
    if system == "memory":
        return Mixture(lam_mem=setting["lam"], memory=memory, mem_temperature=setting["T_mem"])
    return Mixture(lam_mem=setting["lam_mem"], lam_knn=setting["lam_knn"], memory=memory,
                   mem_temperature=setting["T_mem"], knn=lambda h: knn.logprobs(h, setting["T"], vocab))


def _qa(cfg: Config) -> dict:
    out = cfg.run_dir / QA
    data_m = verify_chain(cfg.run_dir, DATA, "prepare")
    results = load_eval_results(cfg.run_dir, cfg.eval.out_name)
    if results is None:
        raise StageError(f"qa: no finished evaluation in {cfg.run_dir / cfg.eval.out_name}: run `mlpmem eval` "
                         "first (QA uses the settings it tuned on validation)")
    eval_m = read_manifest(cfg.run_dir / cfg.eval.out_name)
    settings = results["settings"]
    mcfg, model_up = base_model(cfg)
    finetuned = bool(model_up)
    lm = load_lm(mcfg)
    upstream = {DATA: data_m["fingerprint"], cfg.eval.out_name: eval_m["fingerprint"], **model_up}
    fp = fingerprint("qa", upstream, lm.identity["fingerprint"], cfg.to_dict()["qa"], cfg.to_dict()["window"]
                     ["context"], cfg.model.dtype, cfg.seed)
    done = should_skip(out, "qa", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        print(done["table"])
        return done
    invalidate(out)
    t_start = time.time()
    items = _items(cfg, lm)
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n"
                                                   for it in items))
    systems = _systems(cfg, settings, finetuned)
    lm_name = "fine-tuned" if finetuned else "base"
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    memory = knn = None
    if any(s in ("memory", "memory+knn") for s in systems):
        memory, _ = load_memory(cfg.run_dir, lm, hook, required=True)
    if any(s in ("knn", "memory+knn") for s in systems):
        knn = open_knn(cfg, lm, hook)
        if knn is None:
            raise StageError("qa: eval tuned kNN-LM but the datastore or index is gone: rerun `mlpmem pipeline`")
    prompts, targets = [it.prompt for it in items], [it.target for it in items]
    pairs = encode_pairs(lm.tokenizer, prompts, targets)

    # Answer log-likelihoods: one pass over the run's LM serves every mixture (the vanilla base needs its own).
    knn_T = sorted({settings[s]["T"] for s in ("knn", "memory+knn") if s in systems})
    mem_T = sorted({settings[s]["T_mem"] for s in ("memory", "memory+knn") if s in systems}) or [1.0]
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
        loglik["base"] = np.bincount(owner0, weights=sc0.lm, minlength=len(items))

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
        mix = _mixture(s, settings[s], memory, knn, vocab) if s in MIXTURES else None
        preds[s] = greedy_continuations(base_lm if s == "base" else lm, prompts, cfg.qa.max_new_tokens,
                                        cfg.qa.batch_size, mix=mix, hook=hook, desc=f"qa {s}")
        seconds[s] = round(time.time() - t0, 2)
        log.info("qa %s: %d items in %.1fs", s, len(items), seconds[s])
        atomic_write_json(part, {"fingerprint": fp, "continuations": preds[s], "seconds": seconds[s]})

    res = _summarise(items, systems, lm_name, preds, loglik, cfg.seed)
    res.update(settings={s: settings.get(s, {}) for s in systems}, lm=lm_name, model=lm.identity,
               data={"source": cfg.data.source, "fingerprint": data_m["fingerprint"]}, seconds=seconds,
               fingerprint=fp, qa=cfg.to_dict()["qa"])
    table = qa_table(res)
    _write_predictions(out, items, systems, preds, loglik)
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
    pairs += [("fine-tuned", "base")] if lm_name == "fine-tuned" else []
    pairs += [(a, "knn") for a in ("memory", "memory+knn") if a in systems and "knn" in systems]
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


def _write_predictions(out, items, systems, preds, loglik) -> None:
    rows = []
    for i, it in enumerate(items):
        row = {"id": it.id, "answer": it.answer}
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
    over = " (on the fine-tuned LM)" if res["lm"] == "fine-tuned" and s in MIXTURES else ""
    if s == "memory+knn":
        return f"{LABELS[s]}{over} (λ_mem {st['lam_mem']:g}, λ_kNN {st['lam_knn']:g})"
    return f"{LABELS[s]}{over} (λ {st['lam']:g})" if "lam" in st else LABELS[s]


def qa_table(res: dict) -> str:
    """Markdown: each system's EM, F1 (%) and mean answer log-likelihood (nats) per side with 95% intervals, then
    the paired differences (points of EM/F1, nats)."""
    sides = [s for s in ("heldin", "heldout") if s in res["sides"]]
    name = {"heldin": "held-in", "heldout": "held-out"}
    cols = [f"{name[sd]} {METRICS[m]}" for sd in sides for m in METRICS]
    counts = ", ".join(f"{name[sd]}: {res['sides'][sd]['items']} items from {res['sides'][sd]['documents']} "
                       "documents" for sd in sides)
    lines = [f"Corpus-knowledge QA ({counts}); EM and F1 in %, answer log-likelihood in nats per answer; 95% "
             "intervals resample documents.", "", "| system | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for s in res["systems"]:
        cells = [_fmt(m, res["sides"][sd]["systems"][s][m]) for sd in sides for m in METRICS]
        lines.append(f"| {_label(s, res)} | " + " | ".join(cells) + " |")
    comps = list(res["sides"][sides[0]]["comparisons"])
    if comps:
        lines += ["", "| difference | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for c in comps:
            a, _, b = c.partition(" vs ")
            cells = [_fmt(m, res["sides"][sd]["comparisons"][c][m], diff=True) for sd in sides for m in METRICS]
            lines.append(f"| {LABELS[a]} − {LABELS[b]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
