"""Results as a printed table, Markdown, and PNG plots (perplexity vs lambda; training curves)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from mlpmem.systems import BASE, KNN, MEMORY, MEMORY_GATE, MEMORY_KNN

log = logging.getLogger(__name__)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_params(n: int | None) -> str:
    return "-" if not n else (f"{n / 1e6:.1f}M" if n >= 1e5 else str(n))


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def _setting_value(k: str, v) -> str:
    if k == "gate":  # memory+gate: the fitted parameters live in results["gate"] and gate.json
        return "gate=fitted" if v else "gate=off (fixed lam)"
    return f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"


def results_table(results: dict) -> str:
    """Markdown table: one row per system with its setting, params, storage, perplexities (change against the base
    LM with its 95% bootstrap interval over documents) and tokens/s; then the paired comparisons, each marked as
    an ordering only when its interval excludes zero, and any tuned value on the edge of its grid."""
    splits = list(results["splits"])
    header = ["system", "setting", "params", "storage"] + [f"{s} PPL (vs base, 95% CI)" for s in splits] + \
        ["tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    meta = results.get("systems_meta", {})
    edges = results.get("edges", {})
    for system, setting in results["settings"].items():
        st = ", ".join(_setting_value(k, v) for k, v in setting.items()) or "-"
        if system in edges:
            st += f" (edge: {', '.join(edges[system])})"
        m = meta.get(system, {})
        row = [system, st, fmt_params(m.get("params")), _fmt_bytes(m.get("storage_bytes"))]
        for s in splits:
            r = results["splits"][s]["systems"].get(system, {})
            p, vs = r.get("ppl"), r.get("vs_base")
            if p is None:
                row.append("-")
            elif vs:
                lo, hi = vs["ci95"]
                row.append(f"{p:.3f} ({_pct(vs['change'])}% [{_pct(lo)}, {_pct(hi)}])")
            else:
                row.append(f"{p:.3f}")
        tps = m.get("tokens_per_s")
        row.append(f"{tps:,.0f}" if tps else "-")
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for s in splits:
        for name, c in results["splits"][s].get("comparisons", {}).items():
            lo, hi = c["ci95"]
            verdict = ("better" if c["change"] < 0 else "worse") if c["excludes_zero"] else "no clear difference"
            notes.append(f"- {s}: {name}: {_pct(c['change'])}% PPL [{_pct(lo)}, {_pct(hi)}] over "
                         f"{c['documents']} documents: {verdict}")
    if notes:
        lines += ["", "Paired bootstrap (95% CI over documents):"] + notes
    gate = results.get("gate")
    if gate:
        check = gate.get("check")
        held = f" (held-out validation half: {_pct(check['change'])}% PPL against the fixed lambda)" if check else ""
        lines += ["", f"memory+gate: {gate['reason']}{held}"]
    g = results.get("grids")
    if g:
        fmt = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
        widened = " (widened past a tuned edge)" if results.get("widened") else ""
        lines += ["", f"Swept{widened}: kNN temperatures {fmt(g['knn_temperatures'])}; memory temperatures "
                      f"{fmt(g['memory_temperatures'])}"]
    return "\n".join(lines)


# one colour per system in every panel, and per quantity in the training plot
SYSTEM_STYLE = {KNN: ("C0", "o", "+ kNN-LM"), MEMORY: ("C1", "s", "+ MLP memory"),
                MEMORY_KNN: ("C2", "^", "+ memory + kNN-LM"), MEMORY_GATE: ("C3", "D", "+ memory, gated")}
QUANTITY_COLOUR = {"loss": "C0", "kl": "C1", "ce": "C2", "ppl": "C3"}
Y_ABOVE_BASE = 0.04  # the λ plot's y-axis ends this fraction above the base LM: the optima, not λ = 1's blow-up


def _lam_total(setting: dict) -> float | None:
    """A setting's weight off the LM: λ, or λ_mem + λ_kNN for memory+kNN."""
    if "lam" in setting:
        return float(setting["lam"])
    if "lam_mem" in setting and "lam_knn" in setting:
        return float(setting["lam_mem"]) + float(setting["lam_knn"])
    return None


def _lambda_curve(system: str, rows: list[dict], setting: dict) -> tuple[list[float], list[float], str]:
    """(λ, PPL, what the curve holds) of a system's sweep at its tuned temperatures; memory+kNN, swept over
    (λ_mem, λ_kNN), as its best PPL at each total λ_mem + λ_kNN."""
    # results.json is strict JSON: an infinite PPL (a token the memory or kNN gives no mass, at λ = 1) is null
    keep = [r for r in rows if r.get("ppl") is not None and math.isfinite(r["ppl"]) and
            all(r.get(k) == setting[k] for k in ("T", "T_mem") if k in setting and k in r)]
    if system == MEMORY_KNN:
        by_total: dict[float, float] = {}
        for r in keep:
            t = round(r["lam_mem"] + r["lam_knn"], 6)
            by_total[t] = min(by_total.get(t, float("inf")), r["ppl"])
        xs = sorted(by_total)
        return xs, [by_total[x] for x in xs], "best split of λ = λ_mem + λ_kNN"
    keep.sort(key=lambda r: r["lam"])
    temp = ", ".join(f"{k}={setting[k]:g}" for k in ("T", "T_mem") if k in setting)
    return [r["lam"] for r in keep], [r["ppl"] for r in keep], temp


def lambda_figure(results: dict):
    """The figure of :func:`plot_lambda`: one panel per split of ``results["sweeps"]``; per system (kNN-LM, memory,
    memory+kNN) its PPL against λ at the tuned temperatures, a vertical line and a marker at its tuned λ (tuned on
    validation, so the same λ in every panel) with the split's PPL there; memory+gate, when evaluated, as a marker
    at the memory's λ. The y-axis spans the optima up to a few % above the base LM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results.get("settings", {})
    splits = list(results["sweeps"])
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        sw = results["sweeps"][split]
        at = results.get("splits", {}).get(split, {}).get("systems", {})  # PPL at the tuned settings
        base = sw[BASE][0]["ppl"]
        ax.axhline(base, color="k", ls="--", lw=1, label=f"base LM {base:.2f}")
        tops, lows, curves, tuned_lams = [base], [base], [], []
        for system, (colour, marker, name) in SYSTEM_STYLE.items():
            setting = settings.get(system)
            if setting is None:
                continue
            if system in sw:
                xs, ys, what = _lambda_curve(system, sw[system], setting)
                if xs:
                    ax.plot(xs, ys, "-", color=colour, marker=marker, ms=4, lw=1.2, alpha=0.8,
                            label=f"{name} ({what})" if what else name)
                    lows.append(min(ys))
                    curves.append((xs, ys))
            lam = _lam_total(setting)
            tuned_ppl = at.get(system, {}).get("ppl")
            if lam is None or (tuned_ppl is None and system not in sw):
                continue
            ax.axvline(lam, color=colour, ls=":", lw=1)
            if tuned_ppl is not None:
                gated = system == MEMORY_GATE and setting.get("gate")
                what = f"per-token λ from {lam:.2f}" if gated else f"λ={lam:.2f}"
                ax.plot([lam], [tuned_ppl], marker="*" if system != MEMORY_GATE else marker, ms=13, color=colour,
                        mec="k", ls="none", label=f"{name} tuned: {what}, PPL {tuned_ppl:.2f}")
                lows.append(tuned_ppl)
                tops.append(tuned_ppl)
                tuned_lams.append(lam)
        lo = min(lows)
        hi = max(base * (1 + Y_ABOVE_BASE), max(tops) * 1.01)
        ax.set_ylim(lo - 0.08 * (hi - lo), hi)
        # λ up to a little past the last point inside the y-range: the curves' way out, not the empty rest
        right = max([x for xs, ys in curves for x, y in zip(xs, ys) if y <= hi] + tuned_lams, default=1.0)
        ax.set_xlim(-0.02, min(1.02, right + 0.1))
        ax.set_xlabel("λ (weight off the LM)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{split} (λ tuned on {results.get('tuned_on', 'validation')})")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: no curve hidden
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_lambda(results: dict, path: Path) -> None:
    """``ppl_vs_lambda.png`` from eval's results (:func:`lambda_figure`)."""
    fig = lambda_figure(results)  # sets the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """metrics.jsonl's records (a line cut short by a kill is skipped)."""
    out = []
    for line in metrics_jsonl.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def chosen_checkpoint(metrics_jsonl: Path, records: list[dict]) -> dict | None:
    """{"step", "select_by"} of the checkpoint training kept: best.json next to metrics.jsonl (the memory's) or in
    best/ (fine-tuning's), else the validation line with the lowest loss; None without validation lines."""
    for p in (metrics_jsonl.parent / "best.json", metrics_jsonl.parent / "best" / "best.json"):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "step" in rec:
            return {"step": int(rec["step"]), "select_by": rec.get("select_by", "loss")}
    val = [r for r in records if r.get("split") == "validation" and "loss" in r]
    return {"step": min(val, key=lambda r: r["loss"])["step"], "select_by": "loss"} if val else None


def training_figure(records: list[dict], chosen: dict | None = None):
    """The figure of :func:`plot_training`, or None without training lines: one colour per quantity (loss, kl,
    ce), solid for train and dashed with markers for validation; the chosen step (``chosen``: {"step",
    "select_by"}) as a vertical line and a star on its validation curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") != "validation"]
    val = [r for r in records if r.get("split") == "validation"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for key in ("loss", "kl", "ce"):
        colour = QUANTITY_COLOUR[key]
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), "-", color=colour, alpha=0.8, label=f"train {key}")
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            ax.plot(*zip(*pts), "--", marker="o", ms=3, color=colour, label=f"validation {key}")
    if chosen is not None:
        key = chosen.get("select_by", "loss")
        at = [r for r in val if r.get("step") == chosen["step"] and key in r]
        ax.axvline(chosen["step"], color="k", ls=":", lw=1)
        if at:
            ax.plot([chosen["step"]], [at[0][key]], "*", ms=14, color=QUANTITY_COLOUR.get(key, "k"), mec="k",
                    label=f"chosen: step {chosen['step']} (validation {key} {at[0][key]:.4f})")
        else:
            ax.plot([], [], "k:", label=f"chosen: step {chosen['step']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: no curve hidden
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training(metrics_jsonl: Path, path: Path) -> bool:
    """``training.png`` from metrics.jsonl (:func:`training_figure`), marking the checkpoint kept
    (:func:`chosen_checkpoint`); False when there is nothing to plot."""
    if not metrics_jsonl.is_file():
        return False
    records = read_metrics(metrics_jsonl)
    fig = training_figure(records, chosen_checkpoint(metrics_jsonl, records))
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
