"""Results as a printed table, Markdown, and PNG plots (perplexity vs lambda; training curves)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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


def plot_lambda(results: dict, path: Path) -> None:
    """Perplexity against lambda for kNN-LM (at the tuned T) and the memory, one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(results["sweeps"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        sw = results["sweeps"][split]
        base = sw["base"][0]["ppl"]
        ax.axhline(base, color="k", ls="--", lw=1, label=f"base {base:.2f}")
        if "knn" in sw:
            T = results["settings"]["knn"]["T"]
            rows = sorted((r for r in sw["knn"] if r["T"] == T), key=lambda r: r["lam"])
            ax.plot([r["lam"] for r in rows], [r["ppl"] for r in rows], "o-", label=f"+ kNN-LM (T={T:g})")
        if "memory" in sw:
            Tm = results["settings"]["memory"].get("T_mem")
            rows = sorted((r for r in sw["memory"] if r.get("T_mem") == Tm), key=lambda r: r["lam"])
            ax.plot([r["lam"] for r in rows], [r["ppl"] for r in rows], "s-", label=f"+ MLP memory (T={Tm:g})")
        ax.set_xlabel("lambda")
        ax.set_ylabel("perplexity")
        ax.set_title(split)
        lo = min(min(r["ppl"] for r in rows) for rows in sw.values())
        ax.set_ylim(lo * 0.97, base * 1.25)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(metrics_jsonl: Path, path: Path) -> bool:
    """Training and validation loss curves from metrics.jsonl; False when there is nothing to plot."""
    if not metrics_jsonl.is_file():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_jsonl.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        (val if r.get("split") == "validation" else train).append(r)
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "kl", "ce"):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), label=f"train {key}", alpha=0.8)
    for key in ("loss", "kl", "ce"):
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            ax.plot(*zip(*pts), "o--", label=f"validation {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
