"""`mlpmem sweep`: a study over settings, each point a run directory that shares what it can with the base run.

Points are mappings of options to change (``--sweep.points``), e.g. memory sizes and epochs on one datastore. For
each point, walking the stage table in order, a stage is **shared** (its output in --out_dir is built there once,
then linked into the point) when none of the point's options is in the config sections the stage reads and none
of its upstream stages ran in the point; otherwise it **runs** in the point's own directory
``<out_dir>/<sweep.name>/<point>``. Eval always runs in the point, with ``--sweep.eval`` (by default validation
only, base and memory: a study chooses on validation). So a memory-size point trains and evaluates a memory and
links the data, datastore, index and targets; a point changing the corpus would rebuild everything.

Every stage resumes as it does alone (manifests), so an interrupted sweep goes on where it stopped. The results
(``results.json``, ``results.md``, ``sweep.png``) are rebuilt from the finished points' eval results each time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlpmem.artifacts import DATASTORE, MEMORY, claim, load_eval_results, load_eval_scores, load_offsets, read_manifest, \
    rebuilding_stale
from mlpmem import systems as sy
from mlpmem.config_values import flat_options
from mlpmem.config import Config, load_config, point_name
from mlpmem.errors import ConfigError
from mlpmem.files import atomic_write_json, atomic_write_text
from mlpmem.stages import STAGES, pipeline_stages
from mlpmem.studies.common import interval, link, read_timings, run_timed, save_figure, stage_output
from mlpmem.studies.scaling import finetuned_vs_base, plot_scaling, projection, projection_table, scaling_table

log = logging.getLogger(__name__)

def point_config(cfg: Config, point: dict) -> Config:
    """The point's config: ``cfg`` with --sweep.eval, then the point's own options (which may set eval options
    too, e.g. systems [base] for a fine-tuned LM alone), its own out_dir, no sweep."""
    flat = {k: v for k, v in flat_options(cfg.to_dict()).items() if not k.startswith("sweep.")}
    evals = {f"eval.{k}": v for k, v in cfg.sweep.eval.items()}
    out = cfg.run_dir / cfg.sweep.name / point_name(point)
    try:
        return load_config(None, {**flat, **evals, **point, "out_dir": str(out), "force": False})
    except ConfigError as e:
        raise ConfigError(f"--sweep.points: point {point_name(point)}: {e}") from None


def plan(cfg: Config, point: dict) -> list[tuple[str, str, str | None]]:
    """(stage, how, owner) for each pipeline stage up to eval, in order. ``how``: 'shared' (built in the owner, then
    linked: owner None is the base run --out_dir, else another point's name), 'run' (built in this point), or
    'skip' (the point's eval does not need it). A stage's output depends on the point's options that it or any
    stage upstream of it reads; points with the same such options share one output, built by the first of them."""
    stages = pipeline_stages()
    stages = stages[:[s.name for s in stages].index("eval") + 1]
    names = [point_name(p) for p in cfg.sweep.points]
    me = point_name(point)

    def relevant(pt: dict) -> dict[str, dict]:
        rel: dict[str, dict] = {}
        for st in stages:
            own = {k: v for k, v in pt.items() if st.reads(k)}
            for up in st.upstream:
                own.update(rel.get(up, {}))
            rel[st.name] = own
        return rel

    mine = relevant(point)
    others = [(n, relevant(p)) for n, p in zip(names, cfg.sweep.points)]
    need = sy.needed_stages(point_config(cfg, point).eval.systems)
    out = []
    for st in stages:
        if st.name == "eval":
            out.append((st.name, "run", me))
        elif st.name not in need:
            out.append((st.name, "skip", None))
        elif not mine[st.name]:
            out.append((st.name, "shared", None))
        else:
            owner = next((n for n, rel in others if rel[st.name] == mine[st.name]), me)
            out.append((st.name, "run" if owner == me else "shared", owner))
    return out


def run(cfg: Config) -> dict:
    if not cfg.sweep.points:
        raise ConfigError("--sweep.points: list the points to run, e.g. '[{memory.num_blocks: 2}, {train.epochs: 2}]' "
                          "({} is the config itself)")
    by_name = {point_name(p): p for p in cfg.sweep.points}
    claim(cfg.run_dir / cfg.sweep.name, "sweep")  # never a stage's directory (--sweep.name eval)
    with rebuilding_stale():
        for i, point in enumerate(cfg.sweep.points, 1):
            pcfg = point_config(cfg, point)
            name = point_name(point)
            for stage, how, owner in plan(cfg, point):
                st = STAGES[stage]
                output = stage_output(st, pcfg)
                if how == "skip":
                    continue
                if how == "shared":
                    ocfg = cfg if owner is None else point_config(cfg, by_name[owner])
                    run_timed(st, ocfg)  # skips when done: built once for every point that shares it
                    if output and (ocfg.run_dir / output).exists():
                        link(ocfg.run_dir / output, pcfg.run_dir / output, "--sweep.name")
                    continue
                log.info("=== sweep %d/%d (%s): %s ===", i, len(cfg.sweep.points), name, stage)
                run_timed(st, pcfg)
            if i < len(cfg.sweep.points):
                write_results(cfg)  # the finished points so far, for a long sweep watched while it runs
    res = write_results(cfg)
    print(res["table"])
    return res


def write_results(cfg: Config) -> dict:
    """Collect the finished points and write results.json, results.md and the plots under <out_dir>/<name>/."""
    root = cfg.run_dir / cfg.sweep.name
    res = collect(cfg)
    atomic_write_json(root / "results.json", res)
    atomic_write_text(root / "results.md", res["table"] + "\n")
    plot_sweep(res, root / "sweep.png")
    if res.get("scaling"):
        plot_scaling(res, root / "scaling.png")
    return res


def _wall_seconds(cfg: Config, point: dict) -> dict:
    """Wall time of each stage the point uses, from the timings of the run directory that built it."""
    by_name = {point_name(p): p for p in cfg.sweep.points}
    out = {}
    for stage, how, owner in plan(cfg, point):
        if how == "skip":
            continue
        c = cfg if (how == "shared" and owner is None) else point_config(cfg, by_name[owner])
        t = read_timings(c.run_dir).get(stage)
        if t is not None:
            out[stage] = t
    return out


def collect(cfg: Config) -> dict:
    """One row per finished point: perplexity per split and system at its tuned settings, memory size and training,
    wall times, and bootstrap intervals of the point's memory against the base LM and against the base point."""
    from mlpmem.components.tuning import bootstrap_changes, doc_ids_of, system_logprobs

    rows, lp, configs = [], {}, {}
    varied = sorted({k for pt in cfg.sweep.points for k in pt})
    split = "validation" if "validation" in cfg.sweep.eval.get("splits", ["validation"]) else \
        cfg.sweep.eval["splits"][0]
    docs = None
    for point in cfg.sweep.points:
        pcfg = point_config(cfg, point)
        name = point_name(point)
        res = load_eval_results(pcfg.run_dir, pcfg.eval.out_name)
        if res is None:
            continue
        configs[name] = pcfg
        mem_m = read_manifest(pcfg.run_dir / MEMORY) or {}
        summary = mem_m.get("summary") or {}
        flat = flat_options(pcfg.to_dict())
        row = {"point": name, "options": point, "values": {k: flat.get(k) for k in varied},
               "settings": res["settings"], "edges": res.get("edges", {}),
               "ppl": {s: {k: v["ppl"] for k, v in entry["systems"].items()} for s, entry in res["splits"].items()},
               "memory_params": mem_m.get("params"), "memory_bytes": mem_m.get("bytes"),
               "memory_blocks": (mem_m.get("memory_config") or {}).get("num_blocks"),
               "train_epochs": pcfg.train.epochs if mem_m else None, "train_steps": summary.get("steps"),
               "best_step": summary.get("best_step"), "best_val_loss": summary.get("best_val_loss"),
               "train_tokens_per_s": summary.get("tokens_per_s"),
               "wall_seconds": _wall_seconds(cfg, point), "splits": res["splits"],
               "systems_meta": res.get("systems_meta", {}), "datastore_tokens": _datastore_tokens(pcfg),
               "facts": _stage_facts(pcfg)}
        if split in res["splits"]:
            scored = load_eval_scores(pcfg.run_dir, pcfg.eval.out_name, split)
            for system in (sy.BASE, sy.MEMORY, sy.KNN):
                if system in res["settings"]:
                    lp[(name, system)] = system_logprobs(scored, system, res["settings"][system], pcfg)
            if docs is None:
                docs = doc_ids_of(load_offsets(pcfg.run_dir, split), scored.n)
        rows.append(row)
    names = [r["point"] for r in rows]
    ref = "base" if "base" in names else None
    if docs is not None and lp:
        sizes = {len(v) for v in lp.values()}
        if len(sizes) != 1:
            raise ValueError(f"the points scored different numbers of {split} tokens: not the same text")
        labels = {f"{n}|{s}": v for (n, s), v in lp.items()}
        pairs = []
        for n in names:
            if f"{n}|memory" in labels and f"{n}|base" in labels:
                pairs.append((f"{n}|memory", f"{n}|base"))
            if ref and n != ref and f"{n}|memory" in labels and f"{ref}|memory" in labels:
                pairs.append((f"{n}|memory", f"{ref}|memory"))
        ci = bootstrap_changes(labels, docs, pairs, seed=cfg.seed)
        for r in rows:
            n = r["point"]
            r["memory_vs_base_lm"] = ci.get((f"{n}|memory", f"{n}|base"))
            r["memory_vs_base_point"] = ci.get((f"{n}|memory", f"{ref}|memory")) if ref else None
    table = _markdown(rows, split, ref)
    scaling = any("knn.datastore_tokens" in pt for pt in cfg.sweep.points)
    if scaling:
        finetuned_vs_base(rows, configs, cfg.seed)
        proj = projection(rows)
        table += "\n\n" + scaling_table(rows) + ("\n\n" + projection_table(proj) if proj else "")
    return {"split": split, "reference_point": ref, "rows": rows, "table": table, "scaling": scaling,
            "projection": proj if scaling else None}


def _stage_facts(pcfg: Config) -> dict:
    """Throughput and storage the point's stages recorded in their manifests (for projections to larger corpora)."""
    from mlpmem.artifacts import INDEX, TARGETS

    ds, ix, tg, mem = (read_manifest(pcfg.run_dir / d) or {} for d in (DATASTORE, INDEX, TARGETS, MEMORY))
    stats = list((tg.get("stats") or {}).values())
    rows = sum(st.get("rows", 0) for st in stats)
    return {"extract_tokens": ds.get("n_positions"), "extract_bytes": ds.get("bytes"),
            "extract_tokens_per_s": ds.get("tokens_per_s"), "index_factory": ix.get("factory"),
            "index_keys": ix.get("ntotal"), "index_bytes": ix.get("bytes"), "index_build_s": ix.get("build_seconds"),
            "index_recall": (ix.get("recall_at_k") or {}).get("recall"), "targets_rows": rows or None,
            "targets_bytes": tg.get("bytes"),
            "targets_queries_per_s": rows / sum(st["seconds"] for st in stats) if rows else None,
            "targets_distinct_ids": sum(st["mean_distinct_ids"] * st["rows"] for st in stats) / rows if rows else None,
            "train_tokens_per_s": (mem.get("summary") or {}).get("tokens_per_s"), "train_epochs": pcfg.train.epochs}


def _datastore_tokens(pcfg: Config) -> int | None:
    """The datastore positions a point's kNN-LM and memory use: --knn.datastore_tokens, else the whole extraction."""
    if pcfg.knn.datastore_tokens is not None:
        return pcfg.knn.datastore_tokens
    return (read_manifest(pcfg.run_dir / DATASTORE) or {}).get("n_positions")


def _markdown(rows: list[dict], split: str, ref: str | None) -> str:
    from mlpmem.components.report import fmt_params

    lines = [f"| point | memory params | epochs (steps) | {split} PPL: base LM | memory alone | base + memory "
             f"(lam, T_mem) | vs base LM (95% CI) | vs point {ref or '-'} | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["ppl"].get(split, {})
        st = r["settings"].get(sy.MEMORY, {})
        nan = float("nan")
        edge = f" (edge: {', '.join(r['edges'][sy.MEMORY])})" if r["edges"].get(sy.MEMORY) else ""
        mix = f"{p[sy.MEMORY]:.3f} ({st.get('lam', nan):.2f}, {st.get('T_mem', nan):g}){edge}" if sy.MEMORY in p else "-"
        alone = f"{p[sy.MEMORY_ALONE]:.3f}" if sy.MEMORY_ALONE in p else "-"
        params = fmt_params(r["memory_params"]) if r["memory_params"] else "-"
        epochs = f"{r['train_epochs']:g} ({r['train_steps'] or '-'})" if r["train_epochs"] is not None else "-"
        lines.append(f"| {r['point']} | {params} | {epochs} | "
                     f"{p.get(sy.BASE, nan):.3f} | {alone} | {mix} | {interval(r.get('memory_vs_base_lm'))} | "
                     f"{interval(r.get('memory_vs_base_point'))} | {r['wall_seconds'].get('train', '-')} |")
    lines += ["", f"Settings tuned on validation per point; intervals: paired bootstrap over the documents of {split}."]
    return "\n".join(lines)


def plot_sweep(res: dict, path: Path) -> bool:
    """One panel per option varied alone (the points that change one option, plus the base point): the base +
    memory mixture's and the memory alone's perplexity against the option's value, the base LM as a line."""
    rows = res["rows"]
    split = res["split"]
    ref = next((r for r in rows if r["point"] == "base"), None)
    keys = sorted({k for r in rows if len(r["options"]) == 1 for k in r["options"]})
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [r for r in rows if list(r["options"]) == [key] or r is ref]
        pts = [r for r in pts if r["values"].get(key) is not None and sy.MEMORY in r["ppl"].get(split, {})]
        pts.sort(key=lambda r: r["values"][key])
        xs = [r["values"][key] for r in pts]
        for system, style in ((sy.MEMORY, "o-"), (sy.MEMORY_ALONE, "s--")):
            ax.plot(xs, [r["ppl"][split][system] for r in pts], style, label="base + memory" if system == sy.MEMORY
                    else sy.SYSTEMS[sy.MEMORY_ALONE].label)
        if pts:
            ax.axhline(pts[0]["ppl"][split][sy.BASE], color="grey", ls=":", label="base LM")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{split} perplexity")
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and len(xs) > 1 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)

