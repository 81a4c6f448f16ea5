"""`mlpmem compare`: the paper's comparison on one corpus, every row on the same test tokens.

The paper's protocol fine-tunes the base LM on the train split first and builds the datastore and the memory from
the fine-tuned model; the memory's value is what it adds on top of fine-tuning, and what retriever pretraining
(the KL to kNN targets) adds over training the same MLP on next-token loss alone. This command runs each
variant as a run directory under --out_dir (sharing what is the same through symlinks: the prepared data; the
fine-tuned model, datastore, index and targets for the control), then puts the rows side by side:

    vanilla   the base LM as given, + kNN-LM, + memory, + memory + kNN-LM
    full      the base fine-tuned on the train split (all weights), + kNN-LM, + memory, + memory + kNN-LM
    lora      the base fine-tuned with LoRA adapters
    full-ce   the memory on the fine-tuned base trained with --train.alpha 0 (no kNN targets): the control
    joint     full's LM and memory then trained together on the mixture's loss (`mlpmem joint`, --joint.mode,
              LoRA unless set), scored as a pair and its LM alone

with parameters, storage, training compute, inference tokens/s and a paired bootstrap interval (over documents)
for every change against the vanilla base, and for the comparisons that decide the question.

With --eval.ood_source every variant also scores an out-of-domain corpus (prepared once, in vanilla, and linked
like the data) at its settings tuned on validation, and the table sets each row's out-of-domain change against the
vanilla base LM beside its in-domain one: does fine-tuning, or the memory at its in-domain lambda, cost anything on
text of another domain?
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlpmem.artifacts import (DATA, FINETUNE, claim, JOINT, MEMORY, TARGETS, load_eval_results, load_eval_scores,
                              load_offsets, read_manifest)
from mlpmem.artifacts.readers import OOD
from mlpmem.components.report import fmt_params
from mlpmem.config_values import flat_options
from mlpmem.config import Config, load_config
from mlpmem.disk import human_bytes
from mlpmem.files import atomic_write_json, atomic_write_text
from mlpmem.stages import STAGES
from mlpmem.studies.common import interval, joint_eval_config, link, pct, run_timed
from mlpmem import systems as sy

log = logging.getLogger(__name__)

# variant -> (overrides, the variant whose artifacts it links, which ones, the stages it runs)
ALL = ("prepare", "finetune", "extract", "index", "knn-targets", "train", "eval")
VARIANTS = {
    "vanilla": ({"finetune.mode": "none"}, None, (), ALL),
    "full": ({"finetune.mode": "full"}, "vanilla", (DATA,), ALL[1:]),
    "lora": ({"finetune.mode": "lora", "eval.systems": [sy.BASE]}, "vanilla", (DATA,), ("finetune", "eval")),
    "full-ce": ({"finetune.mode": "full", "train.alpha": 0.0, "eval.systems": [sy.BASE, sy.MEMORY]}, "full",
                (DATA, FINETUNE, "datastore", "index", TARGETS), ("train", "eval")),
    "joint": ({"finetune.mode": "full", "eval.systems": [sy.BASE, sy.MEMORY]}, "full",
              (DATA, FINETUNE, "datastore", "index", TARGETS, MEMORY, "eval"), ("joint", "eval")),
}
# table rows: (label, variant, system)
ROWS = [
    ("base LM", "vanilla", sy.BASE),
    ("base + kNN-LM", "vanilla", sy.KNN),
    ("base + memory", "vanilla", sy.MEMORY),
    ("base + memory + kNN-LM", "vanilla", sy.MEMORY_KNN),
    ("fine-tuned (full)", "full", sy.BASE),
    ("fine-tuned (LoRA)", "lora", sy.BASE),
    ("fine-tuned + kNN-LM", "full", sy.KNN),
    ("fine-tuned + memory", "full", sy.MEMORY),
    ("fine-tuned + memory + kNN-LM", "full", sy.MEMORY_KNN),
    ("fine-tuned + memory, alpha = 0 (control)", "full-ce", sy.MEMORY),
    ("fine-tuned + memory, then trained jointly", "joint", sy.MEMORY),
    ("its jointly trained LM without the memory", "joint", sy.BASE),
]
# the comparisons that answer "build a memory, or just fine-tune?" (a row vs another; both must exist)
PAIRS = [
    ("fine-tuned (full)", "base LM"),
    ("fine-tuned + memory", "fine-tuned (full)"),
    ("fine-tuned + memory", "fine-tuned + kNN-LM"),
    ("fine-tuned + memory", "fine-tuned + memory, alpha = 0 (control)"),
    ("fine-tuned + memory + kNN-LM", "fine-tuned + kNN-LM"),
    ("base + memory", "base + kNN-LM"),
    ("fine-tuned + memory, then trained jointly", "fine-tuned + memory"),
    ("fine-tuned + memory, then trained jointly", "fine-tuned (full)"),
]


def variant_config(cfg: Config, name: str) -> Config:
    overrides = dict(VARIANTS[name][0])
    if name == "lora":
        overrides["finetune.lr"] = cfg.compare.lora_lr
    if name == "joint" and cfg.joint.mode == "none":
        overrides["joint.mode"] = "lora"
    return load_config(None, {**flat_options(cfg.to_dict()), **overrides, "out_dir": str(cfg.run_dir / name)})


def run(cfg: Config) -> dict:
    timings: dict[str, dict[str, float]] = {}
    claim(cfg.run_dir / "compare", "compare")
    for name in cfg.compare.variants:
        vcfg = variant_config(cfg, name)
        _, src, shared, stages = VARIANTS[name]
        # the out-of-domain corpus, prepared by vanilla's eval, is shared as the data is
        ood = (OOD,) if shared and cfg.eval.ood_source is not None and (cfg.run_dir / src / OOD).exists() else ()
        for d in shared + ood:
            link(cfg.run_dir / src / d, vcfg.run_dir / d, "--out_dir")
        timings[name] = {}
        for stage in stages:
            log.info("=== compare: %s: %s ===", name, stage)
            # joint reads full's tuned lambda from eval/; the pair it trains is scored into eval-joint/
            c = joint_eval_config(vcfg) if (name, stage) == ("joint", "eval") else vcfg
            timings[name][stage] = run_timed(STAGES[stage], c, record=False)  # this run's time, done or not
    res = table(cfg)
    res["wall_seconds"] = timings
    out = cfg.run_dir / "compare"
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", res["table"] + "\n")
    print(res["table"])
    return res


def _compute(vdir: Path, system: str, batch_size: int) -> str:
    """Training compute of a row: LM tokens through forward+backward (fine-tuning), forward only (datastore) and
    memory positions trained (each x passes)."""
    parts = []
    ft = read_manifest(vdir / FINETUNE) or {}
    if ft.get("tokens"):
        parts.append(f"FT {ft['tokens'] / 1e3:.0f}K tok ({ft['epochs']:.2g} ep)")
    jm = read_manifest(vdir / JOINT) or {}
    if jm.get("tokens"):
        parts.append(f"joint {jm['tokens'] / 1e3:.0f}K tok ({jm['epochs']:.2g} ep, {jm['mode']})")
    if "extract" in sy.SYSTEMS[system].needs:  # reads the datastore
        ds = read_manifest(vdir / "datastore") or {}
        parts.append(f"fwd {ds.get('n_positions', 0) / 1e3:.0f}K")
    if sy.SYSTEMS[system].uses_memory:
        steps = ((read_manifest(vdir / MEMORY) or {}).get("summary") or {}).get("steps", 0)
        parts.append(f"memory {steps * batch_size / 1e3:.0f}K pos")
    return ", ".join(parts) or "-"


def table(cfg: Config) -> dict:
    """Rows side by side on the same tokens of --compare.split, from the finished variants; and on the same
    out-of-domain tokens, where the vanilla base LM's evaluation scored an ``ood`` split (--eval.ood_source)."""
    from mlpmem.components.tuning import doc_ids_of, system_logprobs

    split = cfg.compare.split
    rows, lp, n_tokens, ood_fps = [], {split: {}, OOD: {}}, {}, set()
    for label, name, system in ROWS:
        if name not in cfg.compare.variants:
            continue
        vcfg = variant_config(cfg, name)
        if name == "joint":
            vcfg = joint_eval_config(vcfg)
        res = load_eval_results(vcfg.run_dir, vcfg.eval.out_name)
        if res is None or system not in res["settings"]:
            continue
        setting = res["settings"][system]
        for sp in (split, OOD) if OOD in res["splits"] else (split,):
            scored = load_eval_scores(vcfg.run_dir, vcfg.eval.out_name, sp)
            n = n_tokens.setdefault(sp, scored.n)
            if scored.n != n:
                raise ValueError(f"{name} scored {scored.n} {sp} tokens, others {n}: not the same text")
            lp[sp][label] = system_logprobs(scored, system, setting, vcfg)  # at the setting tuned on validation
        if OOD in res["splits"]:
            ood_fps.add(res["ood"]["corpus_fingerprint"])
        meta = res.get("systems_meta", {}).get(system, {})
        ft = read_manifest(vcfg.run_dir / FINETUNE) or {}
        rows.append({"row": label, "variant": name, "system": system, "setting": setting,
                     "ppl": res["splits"][split]["systems"][system]["ppl"],
                     "ood_ppl": res["splits"].get(OOD, {}).get("systems", {}).get(system, {}).get("ppl"),
                     "base_params": res["model"]["n_params"],
                     "memory_params": meta.get("params") if sy.SYSTEMS[system].uses_memory else None,
                     "trainable_lm_params": ft.get("trainable_params"),
                     "storage_bytes": meta.get("storage_bytes"), "tokens_per_s": meta.get("tokens_per_s"),
                     "compute": _compute(vcfg.run_dir, system, vcfg.train.batch_size), "edges": res.get("edges", {}).get(system)})
    if len(ood_fps) > 1:
        raise ValueError("the variants scored different out-of-domain corpora (--eval.ood_source changed between "
                         "their evaluations): rerun `mlpmem compare --force`")
    n_tokens = n_tokens.get(split)
    docs = doc_ids_of(load_offsets(cfg.run_dir / "vanilla", split), n_tokens)
    ci, comparisons = _changes(lp[split], docs, cfg.seed)
    ood = None
    if "base LM" in lp[OOD]:  # the out-of-domain change of every row against the vanilla base LM, paired likewise
        ood_docs = doc_ids_of(load_offsets(cfg.run_dir / "vanilla", OOD), len(lp[OOD]["base LM"]))
        ood_ci, ood_cmp = _changes(lp[OOD], ood_docs, cfg.seed)
        ood = {"source": cfg.eval.ood_source, "tokens": len(lp[OOD]["base LM"]),
               "documents": int(ood_docs.max()) + 1 if len(ood_docs) else 0, "comparisons": ood_cmp}
    for r in rows:
        r["vs_base"] = ci.get((r["row"], "base LM"))
        r["ood_vs_base"] = ood_ci.get((r["row"], "base LM")) if ood else None
    return {"split": split, "tokens": n_tokens, "documents": int(docs.max()) + 1 if len(docs) else 0, "rows": rows,
            "comparisons": comparisons, "ood": ood, "table": _markdown(rows, comparisons, split, n_tokens, ood)}


def _changes(lp: dict, docs, seed: int) -> tuple[dict, list[dict]]:
    """Paired bootstrap intervals over ``docs`` of every row against the base LM and of PAIRS (rows in ``lp``)."""
    from mlpmem.components.tuning import bootstrap_changes

    pairs = [(r, "base LM") for r in lp if r != "base LM"] + \
        [p for p in PAIRS if p[0] in lp and p[1] in lp and p != ("fine-tuned (full)", "base LM")]
    ci = bootstrap_changes(lp, docs, pairs, seed=seed)
    return ci, [{"a": a, "b": b, **ci[(a, b)]} for a, b in PAIRS if (a, b) in ci]


def _verdicts(comparisons: list[dict]) -> list[str]:
    lines = []
    for c in comparisons:
        verdict = ("lower" if c["change"] < 0 else "higher") if c["excludes_zero"] else "no clear difference"
        lines.append(f"- {c['a']} vs {c['b']}: {pct(c['change'])} PPL [{pct(c['ci95'][0])}, "
                     f"{pct(c['ci95'][1])}]: {verdict}")
    return lines


def _markdown(rows: list[dict], comparisons: list[dict], split: str, n_tokens: int, ood: dict | None = None) -> str:
    ood_head = ("ood PPL | ood vs base LM (95% CI) | ", "---|---|") if ood else ("", "")
    lines = [f"| row | {split} PPL | vs base LM (95% CI) | {ood_head[0]}params (LM + memory) | storage | "
             "training compute | tokens/s |", f"|---|---|---|{ood_head[1]}---|---|---|---|"]
    for r in rows:
        params = fmt_params(r["base_params"]) + (f" + {fmt_params(r['memory_params'])}" if r["memory_params"] else "")
        if r["trainable_lm_params"] and r["trainable_lm_params"] < r["base_params"]:
            params += f" ({fmt_params(r['trainable_lm_params'])} LoRA trained)"
        edge = f" (edge: {', '.join(r['edges'])})" if r["edges"] else ""
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        storage = human_bytes(r["storage_bytes"]) if r["storage_bytes"] else "-"
        cells = [f"{r['row']}{edge}", f"{r['ppl']:.3f}", interval(r["vs_base"])]
        if ood:
            cells += [f"{r['ood_ppl']:.3f}" if r["ood_ppl"] is not None else "-", interval(r["ood_vs_base"])]
        lines.append("| " + " | ".join(cells + [params, storage, r["compute"], tps]) + " |")
    lines += ["", f"Paired bootstrap over the documents of {split} ({n_tokens} tokens), 95% intervals; an ordering is "
              "claimed only where the interval excludes zero:"] + _verdicts(comparisons)
    if ood:
        lines += ["", f"Out of domain (`ood`: {ood['source']}, {ood['tokens']} tokens, {ood['documents']} "
                  "documents): every row at the settings it tuned on validation, against the vanilla base LM on the "
                  "same tokens; a positive change is what an in-domain gain costs on text of another domain:"] + \
            _verdicts(ood["comparisons"])
    return "\n".join(lines)
