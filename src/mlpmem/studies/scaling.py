"""The scaling view of a sweep: how kNN-LM, the memory and the fine-tuned LM improve with the corpus, and the
memory with its size (issue: scaling). A sweep whose points vary ``knn.datastore_tokens`` (datastores that are
prefixes of one extraction), ``memory.num_blocks`` at one corpus size, and optionally fine-tuned LMs
(``finetune.mode`` with ``data.max_train_tokens``, evaluated alone) gets, besides the sweep's own table:

- a corpus-size table: perplexity of each system with 95% intervals against the base LM, memory vs kNN-LM,
  storage (datastore + index against the memory's weights), inference tokens/s and the stages' wall times;
- a memory-size table at the corpus size where the memory sizes were varied;
- ``scaling.png``: perplexity against corpus size (log axis) per system, perplexity against memory parameters,
  storage and tokens/s against corpus size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem import systems as sy
from mlpmem.studies.common import save_figure

SIZE = "knn.datastore_tokens"
SYSTEMS = tuple((s, sy.SYSTEMS[s].label) for s in (sy.KNN, sy.MEMORY, sy.MEMORY_KNN))  # (name, column label)


def _split(rows: list[dict]) -> str:
    have = {s for r in rows for s in r["splits"]}
    return "test" if "test" in have else sorted(have)[0]


def scaling_rows(rows: list[dict]) -> dict:
    """The rows of a sweep's results grouped for the scaling view: {'sizes': [...] (by datastore tokens),
    'finetuned': {train tokens: row}, 'memory': [...] (memory-size points, by parameters), 'split': ...}."""
    split = _split(rows) if rows else "test"
    ft = {r["values"].get("data.max_train_tokens"): r for r in rows
          if (r["options"].get("finetune.mode") or "none") != "none"}
    plain = [r for r in rows if set(r["options"]) <= {SIZE} and r["datastore_tokens"]
             and "memory" in r["splits"].get(split, {}).get("systems", {})]
    sizes = sorted(plain, key=lambda r: r["datastore_tokens"])
    mem = [r for r in rows if "memory.num_blocks" in r["options"] and set(r["options"]) <= {SIZE, "memory.num_blocks"}]
    if mem:
        at = mem[0]["datastore_tokens"]
        mem += [r for r in sizes if r["datastore_tokens"] == at]
        mem = sorted([r for r in mem if r["datastore_tokens"] == at and r["memory_params"]],
                     key=lambda r: r["memory_params"])
    return {"split": split, "sizes": sizes, "finetuned": {k: v for k, v in ft.items() if k}, "memory": mem}


def finetuned_vs_base(rows: list[dict], configs: dict, seed: int) -> None:
    """Set ``finetuned_vs_base_lm`` on each fine-tuned LM's row: the paired bootstrap change of its perplexity
    against the base LM on the scaling split, the base LM's scores taken from a corpus-size point (the same text
    and model; a fine-tuned point evaluates its own LM alone). ``configs``: each point's config, by point name."""
    from mlpmem.artifacts import load_eval_scores, load_offsets
    from mlpmem.components.tuning import bootstrap_changes, doc_ids_of

    split = _split(rows) if rows else "test"
    g = scaling_rows(rows)
    base_from = next((r for r in g["sizes"] if "base" in r["splits"].get(split, {}).get("systems", {})), None)
    if not g["finetuned"] or base_from is None:
        return

    def gold(name: str):  # (the point's config, its split's log p(gold) under its own LM)
        pcfg = configs[name]
        return pcfg, np.asarray(load_eval_scores(pcfg.run_dir, pcfg.eval.out_name, split).lm, dtype=np.float64)

    bcfg, base_lp = gold(base_from["point"])
    docs = doc_ids_of(load_offsets(bcfg.run_dir, split), len(base_lp))
    for r in g["finetuned"].values():
        if split not in r["splits"]:
            continue
        _, lp = gold(r["point"])
        if len(lp) != len(base_lp):
            raise ValueError(f"{r['point']} scored {len(lp)} {split} tokens, the base LM {len(base_lp)}: not the "
                             "same text")
        pair = ("finetuned", "base")
        r["finetuned_vs_base_lm"] = bootstrap_changes({"finetuned": lp, "base": base_lp}, docs, [pair],
                                                      seed=seed)[pair]


def _ppl(r: dict, split: str, system: str) -> str:
    s = r["splits"].get(split, {}).get("systems", {}).get(system)
    if not s:
        return "-"
    return f"{s['ppl']:.3f}" + _change(s.get("vs_base"))


def _change(ci: dict | None) -> str:
    return f" ({100 * ci['change']:+.1f}% [{100 * ci['ci95'][0]:+.1f}, {100 * ci['ci95'][1]:+.1f}])" if ci else ""


def _mb(x) -> str:
    return f"{x / 2**20:.0f}" if x else "-"


def _fine_tuned(g: dict, tokens: int, split: str) -> str:
    # the fine-tuned LM trained on the prefix closest to this size (whole documents up to its token budget)
    near = [k for k in g["finetuned"] if abs(k - tokens) <= 0.02 * tokens]
    if not near:
        return "-"
    r = g["finetuned"][near[0]]
    s = r["splits"].get(split, {}).get("systems", {}).get("base")
    return f"{s['ppl']:.3f}" + _change(r.get("finetuned_vs_base_lm")) if s else "-"


def scaling_table(rows: list[dict]) -> str:
    g = scaling_rows(rows)
    split, lines = g["split"], []
    if g["sizes"]:
        lines += [f"### Corpus size ({split} perplexity; % vs the base LM with 95% intervals over documents)", "",
                  "| datastore tokens | base LM | kNN-LM | memory | memory + kNN-LM | memory vs kNN-LM | fine-tuned LM "
                  "| storage MB: datastore + index / memory | tokens/s: base / + kNN-LM / + memory | wall s: "
                  "index, knn-targets, train |", "|---" * 10 + "|"]
        for r in g["sizes"]:
            sp = r["splits"][split]
            cmp_ = sp.get("comparisons", {}).get("memory vs knn")
            vs = f"{100 * cmp_['change']:+.1f}% [{100 * cmp_['ci95'][0]:+.1f}, {100 * cmp_['ci95'][1]:+.1f}]" \
                if cmp_ else "-"
            meta = r.get("systems_meta", {})
            tps = " / ".join(f"{meta[s]['tokens_per_s']:.0f}" if s in meta else "-" for s in ("base", "knn", "memory"))
            w = r["wall_seconds"]
            lines.append(f"| {r['datastore_tokens']:,} | {sp['systems']['base']['ppl']:.3f} | "
                         + " | ".join(_ppl(r, split, s) for s, _ in SYSTEMS)
                         + f" | {vs} | {_fine_tuned(g, r['datastore_tokens'], split)} | "
                         f"{_mb((meta.get('knn') or {}).get('storage_bytes'))} / "
                         f"{_mb((meta.get('memory') or {}).get('storage_bytes'))} | {tps} | "
                         f"{', '.join(str(w.get(s, '-')) for s in ('index', 'knn-targets', 'train'))} |")
    if g["memory"]:
        from mlpmem.components.report import fmt_params

        at = g["memory"][0]["datastore_tokens"]
        lines += ["", f"### Memory size at {at:,} datastore tokens ({split} perplexity)", "",
                  "| blocks | memory params | params per datastore token | memory alone | base + memory | "
                  "kNN-LM | train s |", "|---" * 7 + "|"]
        for r in g["memory"]:
            sp = r["splits"][split]["systems"]
            alone = sp.get(sy.MEMORY_ALONE, {}).get("ppl", float("nan"))
            lines.append(f"| {r['memory_blocks']} | {fmt_params(r['memory_params'])} | "
                         f"{r['memory_params'] / at:.0f} | {alone:.3f} | "
                         f"{_ppl(r, split, sy.MEMORY)} | {_ppl(r, split, sy.KNN)} | "
                         f"{r['wall_seconds'].get('train', '-')} |")
    return "\n".join(lines)


def plot_scaling(res: dict, path: Path) -> bool:
    """Four panels: perplexity vs corpus size per system (log x), perplexity vs memory parameters, storage vs
    corpus size, inference tokens/s vs corpus size."""
    g = scaling_rows(res["rows"])
    if not g["sizes"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = g["split"]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    xs = [r["datastore_tokens"] for r in g["sizes"]]
    ppl = lambda r, s: r["splits"][split]["systems"].get(s, {}).get("ppl")  # noqa: E731
    ax[0].axhline(ppl(g["sizes"][0], "base"), color="grey", ls=":", label="base LM")
    for s, label in SYSTEMS:
        pts = [(x, ppl(r, s)) for x, r in zip(xs, g["sizes"]) if ppl(r, s)]
        ax[0].plot(*zip(*pts), "o-", label=label)
    ft = sorted((k, r["splits"][split]["systems"]["base"]["ppl"]) for k, r in g["finetuned"].items()
                if split in r["splits"])
    if ft:
        ax[0].plot(*zip(*ft), "s--", label="fine-tuned LM")
    ax[0].set(xscale="log", xlabel="train tokens (datastore / fine-tuning)", ylabel=f"{split} perplexity")
    if g["memory"]:
        m = g["memory"]
        ax[1].plot([r["memory_params"] / 1e6 for r in m], [ppl(r, "memory") for r in m], "o-", label="base + memory")
        ax[1].axhline(ppl(m[0], "knn"), color="C0", ls="--", label="kNN-LM")
        ax[1].set(xlabel=f"memory parameters (M), {m[0]['datastore_tokens']:,} tokens", ylabel=f"{split} perplexity")
    meta = [r.get("systems_meta", {}) for r in g["sizes"]]
    for key, label in (("knn", "datastore + index"), ("memory", "memory")):
        ax[2].plot(xs, [(m.get(key) or {}).get("storage_bytes", 0) / 2**20 for m in meta], "o-", label=label)
    ax[2].set(xscale="log", yscale="log", xlabel="datastore tokens", ylabel="storage (MiB)")
    for key, label in (("base", "base LM"), ("knn", "+ kNN-LM"), ("memory", "+ memory")):
        ax[3].plot(xs, [(m.get(key) or {}).get("tokens_per_s", 0) for m in meta], "o-", label=label)
    ax[3].set(xscale="log", xlabel="datastore tokens", ylabel="eval tokens/s")
    for a in ax:
        a.grid(alpha=0.3)
        if a.has_data():
            a.legend(fontsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- projection to larger corpora

def _scan(n: float, nprobe: int = 32) -> float:
    """Codes an IVF search scans per query with the 'auto' index at n keys: nprobe lists of n / nlist codes."""
    import math

    from mlpmem.components.index import MAX_NLIST

    nlist = min(MAX_NLIST, 2 ** round(math.log2(4 * math.sqrt(n))))
    return nprobe * n / nlist


def projection(rows: list[dict], sizes=(1e8, 1e9), nprobe: int = 32) -> dict | None:
    """Time and storage of each stage at ``sizes`` train tokens, from the throughput measured at the largest
    corpus-size points (see :func:`projection_table` for the assumptions); None without measurements."""
    g = scaling_rows(rows)
    facts = [r["facts"] for r in g["sizes"] if r.get("facts", {}).get("targets_queries_per_s")]
    if not facts:
        return None
    big = max(facts, key=lambda f: f["targets_rows"])
    ivf = [f for f in facts if (f.get("index_factory") or "").startswith("IVF")]
    # search seconds per query = a + b * codes scanned, fitted on the IVF points (a: the exact re-rank and the
    # distribution, constant per query; b: the scan); one point or none: all of it scales with the scan
    pts = sorted({(_scan(f["targets_rows"], nprobe), 1 / f["targets_queries_per_s"]) for f in ivf})
    if len(pts) >= 2:
        b, a = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
        fits = [(max(a, 0.0), max(b, 0.0))]
    else:  # one point cannot separate the two: a range, from all-constant to all-scan
        t, scan = (pts[0][1], pts[0][0]) if pts else (1 / big["targets_queries_per_s"], _scan(big["targets_rows"]))
        fits = [(t, 0.0), (0.0, t / scan)]
    key_bytes = big["extract_bytes"] / big["extract_tokens"]
    code_bytes = (ivf[-1]["index_bytes"] / ivf[-1]["index_keys"]) if ivf else 72.0  # 64-byte codes + 8-byte ids
    tgt_bytes = big["targets_bytes"] / big["targets_rows"] if big.get("targets_bytes") else None
    mem = max(g["sizes"], key=lambda r: r["datastore_tokens"])
    out = {"measured_at": big["targets_rows"], "search_fit": {"a_s": fits[0][0], "b_s_per_code": fits[-1][1],
                                                             "points": len(pts), "range": len(fits) > 1},
           "memory_bytes": (mem.get("systems_meta", {}).get("memory") or {}).get("storage_bytes"), "sizes": {}}
    for n in sizes:
        q_s = [a + b * _scan(n, nprobe) for a, b in fits]  # [lo, hi] when a range
        out["sizes"][int(n)] = {
            "extract_s": n / big["extract_tokens_per_s"], "datastore_bytes": n * key_bytes,
            "index_bytes": n * code_bytes, "targets_s": [n * q for q in q_s],
            "targets_bytes": n * tgt_bytes if tgt_bytes else None,
            "train_s": n * big["train_epochs"] / big["train_tokens_per_s"] if big.get("train_tokens_per_s") else None,
            "knn_search_ms_per_token": [1e3 * q for q in q_s]}
    return out


def _human(x: float | None, units: tuple, smallest: str) -> str:
    """x in the largest of ``units`` ((name, size), largest first) it reaches, else in ``smallest``."""
    if x is None:
        return "-"
    for unit, d in units:
        if x >= d:
            return f"{x / d:,.1f} {unit}"
    return f"{x:.0f} {smallest}"


def _dur(s: float | None) -> str:
    return _human(s, (("days", 86400), ("h", 3600), ("min", 60)), "s")


def _size(b: float | None) -> str:
    return _human(b, (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)), "B")


def projection_table(proj: dict | None) -> str:
    if not proj:
        return ""
    f = proj["search_fit"]
    lines = [f"### Projection from the throughput measured at {proj['measured_at']:,} tokens (this machine)", "",
             "| train tokens | extract | datastore (keys + values) | IVFPQ index | kNN targets: time | kNN targets: "
             "storage | memory training | memory | kNN-LM search per token |", "|---" * 9 + "|"]
    for n, p in proj["sizes"].items():
        span = lambda v, fmt: " – ".join(fmt(x) for x in v)  # noqa: E731
        lines.append(f"| {n:,} | {_dur(p['extract_s'])} | {_size(p['datastore_bytes'])} | "
                     f"{_size(p['index_bytes'])} | {span(p['targets_s'], _dur)} | {_size(p['targets_bytes'])} | "
                     f"{_dur(p['train_s'])} | {_size(proj['memory_bytes'])} | "
                     f"{span(p['knn_search_ms_per_token'], lambda x: f'{x:.1f} ms')} |")
    lines += ["", "Assumptions: extraction and memory training linear in tokens at the measured rates (same model, "
              "same memory, same epochs); datastore and index bytes per token as measured; the 'auto' index "
              "(nlist ~ 4 sqrt(n), at most 65,536, nprobe 32), so a query scans ~sqrt(n) codes until nlist is "
              "capped, then ~n; " + (f"seconds per query = {f['a_s'] * 1e3:.2f} ms + {f['b_s_per_code'] * 1e9:.2f} "
              f"ns per code scanned (fitted on {f['points']} IVF points)" if not f["range"] else
              f"with {f['points']} IVF point(s) measured, the per-query cost ({f['a_s'] * 1e3:.2f} ms) cannot be split "
              "into the scan (which grows) and the exact re-rank and the distribution (which do not): ranges run "
              "from all-constant to all-scan") + "; kNN targets' bytes per position as measured "
              "(the whole neighbour distribution; --knn.store_ids caps it). Keys beyond RAM would add disk reads "
              "to the exact re-rank, which this does not model. The memory's size and inference cost do not grow."]
    return "\n".join(lines)
