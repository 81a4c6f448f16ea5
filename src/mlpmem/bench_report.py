"""Tables, ratios and the plot of `mlpmem bench` results (pure functions of the results dict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SYSTEMS = ("base", "base+memory", "base+knn-flat", "base+knn-ivfpq")


def ratios(res: dict) -> dict:
    """The headline ratios (see docs/bench.md): fractions and speed-ups of tokens/s, cost growth, RAM ratios."""
    inf = res["inference"]
    tps = {s: [r["systems"][s]["tokens_per_s"] for r in inf] for s in SYSTEMS}
    small, large = inf[0], inf[-1]

    def cost_change(s: str) -> float:  # relative change of seconds per token, smallest -> largest datastore
        return tps[s][0] / tps[s][-1] - 1.0

    mem_frac = [m / b for m, b in zip(tps["base+memory"], tps["base"])]
    own = component_us_per_token(res)
    return {
        "memory_over_base": float(np.mean(mem_frac)),
        "memory_over_base_per_size": mem_frac,
        "largest_size": large["size"],
        "smallest_size": small["size"],
        "speedup_memory_vs_knn_flat_largest": tps["base+memory"][-1] / tps["base+knn-flat"][-1],
        "speedup_memory_vs_knn_ivfpq_largest": tps["base+memory"][-1] / tps["base+knn-ivfpq"][-1],
        "cost_change_smallest_to_largest": {s: cost_change(s) for s in SYSTEMS},
        "component_us_per_token": own,
        "component_cost_change_smallest_to_largest": {s: v[-1] / v[0] - 1.0 if v[0] > 0 else None
                                                      for s, v in own.items()},
        "extraction_over_bare": res["extraction"]["ratio"],
        "train_speedup_sparse_vs_dense": res["training"]["speedup"],
        "train_loss_only_speedup_sparse_vs_dense": res["training"]["loss_only_speedup"],
        "train_ram_ratio_dense_over_sparse": res["training"]["ram_ratio"],
        "loss_forward_ram_ratio": res["training"]["loss_forward_ram_ratio"],
        "loss_ram_ratio": res["training"]["loss_ram_ratio"],
    }


def component_us_per_token(res: dict) -> dict[str, list[float]]:
    """Per system and size, µs per token spent in the memory or kNN step itself (timed inside score_tokens around
    that step alone, so less exposed to noise in the LM's share than differences of whole-pass timings)."""
    part = {"base+memory": "memory", "base+knn-flat": "knn", "base+knn-ivfpq": "knn"}
    return {s: [r["systems"][s]["parts_s"].get(p, 0.0) / r["systems"][s]["tokens"] * 1e6 for r in res["inference"]]
            for s, p in part.items()}


def si(n: float) -> str:
    """10000 -> '10K', 1000000 -> '1M'."""
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return f"{n:g}"


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _header(s: dict) -> str:
    m, mem, w = s["machine"], s["memory"], s["window"]
    return (f"mlpmem bench: {s['model']} ({s['dtype']}) on {m['device']} ({m['cpu']}, {m['torch_threads']} torch "
            f"threads, load {m.get('load_avg_1m', '?')} -> {m.get('load_avg_1m_end', '?')}); "
            f"{s['tokens_scored']} tokens scored per system, window {w['context']}/{w['stride']}, k={s['k']}, "
            f"nprobe={s['nprobe']}; memory {mem['num_blocks']} blocks, {mem['params'] / 1e6:.1f}M params")


def _inference_rows(res: dict) -> list[str]:
    out = ["Inference tokens/s (in brackets: us/token spent in the memory / kNN step itself):",
           "| datastore | base | base+memory | base+kNN Flat | base+kNN IVFPQ |", "|---|---|---|---|---|"]
    own = component_us_per_token(res)
    for i, row in enumerate(res["inference"]):
        sy = row["systems"]
        cells = [f"{sy['base']['tokens_per_s']:,.0f}"]
        cells += [f"{sy[k]['tokens_per_s']:,.0f} ({own[k][i]:,.0f})" for k in SYSTEMS[1:]]
        out.append(f"| {si(row['size'])} | " + " | ".join(cells) + " |")
    return out


def _storage_rows(res: dict) -> list[str]:
    out = ["Index build (s, not part of inference) and storage (MiB):",
           "| datastore | keys+vals | Flat index | IVFPQ index (factory) | memory | Flat build | IVFPQ build |",
           "|---|---|---|---|---|---|---|"]
    for st, ix in zip(res["storage"], res["index"]):
        out.append(f"| {si(st['size'])} | {_mb(st['datastore_bytes'])} | {_mb(st['flat_index_bytes'])} | "
                   f"{_mb(st['ivfpq_index_bytes'])} ({ix['ivfpq']['factory']}) | {_mb(st['memory_bytes'])} | "
                   f"{ix['flat']['build_s']:.1f} | {ix['ivfpq']['build_s']:.1f} |")
    return out


def _training_rows(res: dict) -> list[str]:
    t = res["training"]
    out = [f"Memory training (batch {t['batch']}, K={t['K']}, {t['steps']} steps each, bf16 {t['bf16']}; "
           f"peak memory by {t['sparse']['memory_measure']}):",
           "| loss | step tok/s | loss alone tok/s | step peak MiB | loss fwd peak MiB | loss fwd+bwd peak MiB |",
           "|---|---|---|---|---|---|"]
    for name in ("sparse", "dense"):
        x = t[name]
        out.append(f"| {name} | {x['tokens_per_s']:,.0f} | {x['loss_only_tokens_per_s']:,.0f} | "
                   f"{_mb(x['step_peak_bytes'])} | {_mb(x['loss_forward_peak_bytes'])} | "
                   f"{_mb(x['loss_peak_bytes'])} |")
    return out


def _ratio_rows(r: dict) -> list[str]:
    lo, hi = si(r["smallest_size"]), si(r["largest_size"])
    return [
        "Ratios:",
        f"- base+memory tokens/s / base: {r['memory_over_base']:.2f} (per size: "
        + ", ".join(f"{x:.2f}" for x in r["memory_over_base_per_size"]) + ")",
        f"- base+memory over base+kNN at {hi} keys: x{r['speedup_memory_vs_knn_flat_largest']:.1f} (Flat), "
        f"x{r['speedup_memory_vs_knn_ivfpq_largest']:.2f} (IVFPQ)",
        f"- cost per token, {lo} -> {hi} keys: "
        + ", ".join(f"{k} {v:+.0%}" for k, v in r["cost_change_smallest_to_largest"].items())
        + "; of the memory / kNN step itself: "
        + ", ".join(f"{k} {v:+.0%}" if v is not None else f"{k} n/a"
                    for k, v in r["component_cost_change_smallest_to_largest"].items()),
        f"- extraction / bare forward tokens/s: {r['extraction_over_bare']:.2f} (median of per-batch ratios)",
        f"- training sparse / dense: x{r['train_speedup_sparse_vs_dense']:.2f} tokens/s (loss alone "
        f"x{r['train_loss_only_speedup_sparse_vs_dense']:.2f}); peak RAM dense / sparse: step "
        f"x{r['train_ram_ratio_dense_over_sparse']:.2f}, loss forward x{r['loss_forward_ram_ratio']:.2f}, "
        f"loss forward+backward x{r['loss_ram_ratio']:.2f}",
    ]


def format_table(res: dict) -> str:
    """The printed report: header, inference, storage, extraction, training, ratios, notes (markdown tables)."""
    e = res["extraction"]
    extraction = (f"Key extraction: {e['extract_tokens_per_s']:,.0f} tok/s vs bare body forward "
                  f"{e['bare_tokens_per_s']:,.0f} tok/s over {e['positions']:,} positions")
    parts = [[_header(res["setup"])], _inference_rows(res), _storage_rows(res), [extraction], _training_rows(res),
             _ratio_rows(res["ratios"]), ["Notes:"] + [f"- {n}" for n in res["notes"]]]
    return "\n\n".join("\n".join(p) for p in parts)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in res["inference"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s, style in zip(SYSTEMS, ("k--", "C0o-", "C3s-", "C1^-")):
        a.plot(sizes, [r["systems"][s]["tokens_per_s"] for r in res["inference"]], style, label=s)
    a.set(xscale="log", yscale="log", xlabel="datastore size (keys)", ylabel="tokens/s (scoring)",
          title="Inference throughput vs datastore size")
    a.legend()
    st = res["storage"]
    for key, style, label in (("datastore_bytes", "C2o-", "keys+vals"), ("flat_index_bytes", "C3s-", "Flat index"),
                              ("ivfpq_index_bytes", "C1^-", "IVFPQ index"), ("memory_bytes", "C0o-", "memory")):
        b.plot(sizes, [x[key] / 2**20 for x in st], style, label=label)
    b.set(xscale="log", yscale="log", xlabel="datastore size (keys)", ylabel="MiB", title="Storage")
    b.legend()
    m = res["setup"]
    fig.suptitle(f"{m['model']} {m['dtype']} on {m['machine']['device']}; {m['tokens_scored']} tokens, "
                 f"k={m['k']}; sizes > {m['real_keys']} are tiled real keys + noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
