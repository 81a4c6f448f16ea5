"""Tables, ratios and the plot of `mlpmem bench` results (pure functions of the results dict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

KNN_SYSTEMS = ("base+knn-flat", "base+knn-ivfpq")


def systems(res: dict) -> list[str]:
    """The timed systems in order: base, base+memory-<blocks>b for each memory, base+knn-flat, base+knn-ivfpq."""
    return list(res["inference"][0]["systems"])


def memory_systems(res: dict) -> list[str]:
    return [s for s in systems(res) if s.startswith("base+memory")]


def _tps(res: dict, system: str) -> list[tuple[int, float]]:
    """(size, tokens/s) of a system at every size where it ran (Flat stops at --bench.flat_max)."""
    return [(r["size"], r["systems"][system]["tokens_per_s"]) for r in res["inference"] if system in r["systems"]]


def ratios(res: dict) -> dict:
    """The headline ratios (see docs/bench.md): fractions and speed-ups of tokens/s, cost growth, RAM ratios.
    Ratios about a memory are dicts keyed by its system name (one per --bench.memory_blocks)."""
    inf = res["inference"]
    tps = {s: dict(_tps(res, s)) for s in systems(res)}
    small, large = inf[0]["size"], inf[-1]["size"]

    def cost_change(series: list) -> float | None:  # relative change of cost per token, smallest -> largest size
        series = [v for v in series if v is not None]
        return series[-1] / series[0] - 1.0 if series and series[0] > 0 else None

    mems = memory_systems(res)
    mem_frac = {m: [tps[m][n] / tps["base"][n] for n in tps["base"]] for m in mems}
    own = component_us_per_token(res)
    out = {
        "memory_over_base": {m: float(np.mean(f)) for m, f in mem_frac.items()},
        "memory_over_base_per_size": mem_frac,
        "largest_size": large,
        "smallest_size": small,
    }
    for kind in ("flat", "ivfpq"):
        at = max(tps[f"base+knn-{kind}"])  # the largest size this index ran at
        out[f"largest_size_{kind}"] = at
        out[f"speedup_memory_vs_knn_{kind}_largest"] = {m: tps[m][at] / tps[f"base+knn-{kind}"][at] for m in mems}
    out.update({
        "cost_change_smallest_to_largest": {s: cost_change([1.0 / v for v in tps[s].values()]) for s in tps},
        "component_us_per_token": own,
        "component_cost_change_smallest_to_largest": {s: cost_change(v) for s, v in own.items()},
        "component_speedup_memory_vs_knn_ivfpq_largest": {m: own["base+knn-ivfpq"][-1] / max(own[m][-1], 1e-9)
                                                          for m in mems},
        "extraction_over_bare": res["extraction"]["ratio"],
        "train_memory": res["training"]["memory"],
        "train_sparse_vs": res["training"]["vs"],
    })
    return out


def component_us_per_token(res: dict) -> dict[str, list[float | None]]:
    """Per system and size, µs per token spent in the memory or kNN step itself (timed inside score_tokens around
    that step alone, so less exposed to noise in the LM's share than differences of whole-pass timings); None
    where the system did not run (Flat above --bench.flat_max)."""
    part = {**{m: "memory" for m in memory_systems(res)}, **{k: "knn" for k in KNN_SYSTEMS}}
    return {s: [r["systems"][s]["parts_s"].get(p, 0.0) / r["systems"][s]["tokens"] * 1e6 if s in r["systems"]
                else None for r in res["inference"]] for s, p in part.items()}


def si(n: float) -> str:
    """10000 -> '10K', 1000000 -> '1M'."""
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return f"{n:g}"


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _header(s: dict) -> str:
    m, w = s["machine"], s["window"]
    mems = "; ".join(f"{name}: {x['num_blocks']} blocks, {x['params'] / 1e6:.1f}M params"
                     for name, x in s["memories"].items())
    return (f"mlpmem bench: {s['model']} ({s['dtype']}) on {m['device']} ({m['cpu']}, {m['torch_threads']} torch "
            f"threads, load {m.get('load_avg_1m', '?')} -> {m.get('load_avg_1m_end', '?')}); "
            f"{s['tokens_scored']} tokens scored per system, window {w['context']}/{w['stride']}, k={s['k']}, "
            f"nprobe={s['nprobe']}; {mems}")


def _short(system: str) -> str:
    return system.replace("base+knn-flat", "base+kNN Flat").replace("base+knn-ivfpq", "base+kNN IVFPQ")


def _inference_rows(res: dict) -> list[str]:
    names = systems(res)
    out = ["Inference tokens/s (in brackets: us/token spent in the memory / kNN step itself):",
           "| datastore | " + " | ".join(_short(s) for s in names) + " |", "|---" * (len(names) + 1) + "|"]
    own = component_us_per_token(res)
    for i, row in enumerate(res["inference"]):
        sy = row["systems"]
        cells = [f"{sy['base']['tokens_per_s']:,.0f}"]
        cells += [f"{sy[k]['tokens_per_s']:,.0f} ({own[k][i]:,.0f})" if k in sy else "-" for k in names[1:]]
        out.append(f"| {si(row['size'])} | " + " | ".join(cells) + " |")
    return out


def _storage_rows(res: dict) -> list[str]:
    mems = memory_systems(res)
    out = ["Index build (s, not part of inference) and storage (MiB):",
           "| datastore | keys+vals | Flat index | IVFPQ index (factory) | "
           + " | ".join(m.replace("base+", "") for m in mems) + " | Flat build | IVFPQ build |",
           "|---" * (6 + len(mems)) + "|"]
    for st, ix in zip(res["storage"], res["index"]):
        flat = st["flat_index_bytes"] is not None
        out.append(f"| {si(st['size'])} | {_mb(st['datastore_bytes'])} | "
                   f"{_mb(st['flat_index_bytes']) if flat else '-'} | "
                   f"{_mb(st['ivfpq_index_bytes'])} ({ix['ivfpq']['factory']}) | "
                   + " | ".join(_mb(st["memory_bytes"][m]) for m in mems)
                   + f" | {format(ix['flat']['build_s'], '.1f') if flat else '-'} | {ix['ivfpq']['build_s']:.1f} |")
    return out


def _training_rows(res: dict) -> list[str]:
    t = res["training"]
    out = [f"Memory training ({t['memory']}, batch {t['batch']}, K={t['K']}, {t['steps']} steps each, "
           f"bf16 {t['bf16']}; peak memory by {t['sparse']['memory_measure']}):",
           "| loss | step tok/s | loss alone tok/s | step peak MiB | loss fwd peak MiB | loss fwd+bwd peak MiB |",
           "|---|---|---|---|---|---|"]
    for name in t["losses"]:
        x = t[name]
        out.append(f"| {name} | {x['tokens_per_s']:,.0f} | {x['loss_only_tokens_per_s']:,.0f} | "
                   f"{_mb(x['step_peak_bytes'])} | {_mb(x['loss_forward_peak_bytes'])} | "
                   f"{_mb(x['loss_peak_bytes'])} |")
    return out


def _ratio_rows(r: dict) -> list[str]:
    lo, hi = si(r["smallest_size"]), si(r["largest_size"])
    out = ["Ratios:"]
    for m, frac in r["memory_over_base"].items():
        out.append(f"- {m} tokens/s / base: {frac:.2f} (per size: "
                   + ", ".join(f"{x:.2f}" for x in r["memory_over_base_per_size"][m]) + ")")
    for m in r["memory_over_base"]:
        out.append(f"- {m} over base+kNN: x{r['speedup_memory_vs_knn_flat_largest'][m]:.1f} (Flat, "
                   f"{si(r['largest_size_flat'])} keys), x{r['speedup_memory_vs_knn_ivfpq_largest'][m]:.2f} (IVFPQ, "
                   f"{si(r['largest_size_ivfpq'])} keys); the memory step alone vs the IVFPQ kNN step alone: "
                   f"x{r['component_speedup_memory_vs_knn_ivfpq_largest'][m]:.1f}")
    out += [
        f"- cost per token, {lo} -> {hi} keys (Flat: -> {si(r['largest_size_flat'])}): "
        + ", ".join(f"{k} {v:+.0%}" for k, v in r["cost_change_smallest_to_largest"].items())
        + "; of the memory / kNN step itself: "
        + ", ".join(f"{k} {v:+.0%}" if v is not None else f"{k} n/a"
                    for k, v in r["component_cost_change_smallest_to_largest"].items()),
        f"- extraction / bare forward tokens/s: {r['extraction_over_bare']:.2f} (median of per-batch ratios)",
    ]
    for name, v in r["train_sparse_vs"].items():
        out.append(f"- training ({r['train_memory']}), sparse vs {name}: x{v['step_speedup']:.2f} step tokens/s "
                   f"(loss alone x{v['loss_only_speedup']:.2f}); {name} / sparse peak RAM: step "
                   f"x{v['step_ram_ratio']:.2f}, loss forward x{v['loss_forward_ram_ratio']:.2f}, "
                   f"loss forward+backward x{v['loss_ram_ratio']:.2f}")
    return out


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
    mems = memory_systems(res)
    styles = {"base": "k--", "base+knn-flat": "C3s-", "base+knn-ivfpq": "C1^-",
              **{m: f"C{(0, 2, 4, 5, 6)[i % 5]}o-" for i, m in enumerate(mems)}}
    for s in systems(res):
        pts = _tps(res, s)
        a.plot([p[0] for p in pts], [p[1] for p in pts], styles[s], label=s)
    a.set(xscale="log", yscale="log", xlabel="datastore size (keys)", ylabel="tokens/s (scoring)",
          title="Inference throughput vs datastore size")
    a.legend()
    st = res["storage"]
    for key, style, label in (("datastore_bytes", "C7o-", "keys+vals"), ("flat_index_bytes", "C3s-", "Flat index"),
                              ("ivfpq_index_bytes", "C1^-", "IVFPQ index")):
        pts = [(x["size"], x[key] / 2**20) for x in st if x[key] is not None]
        b.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    for m in mems:
        b.plot(sizes, [x["memory_bytes"][m] / 2**20 for x in st], styles[m], label=m.replace("base+", ""))
    b.set(xscale="log", yscale="log", xlabel="datastore size (keys)", ylabel="MiB", title="Storage")
    b.legend()
    m = res["setup"]
    fig.suptitle(f"{m['model']} {m['dtype']} on {m['machine']['device']}; {m['tokens_scored']} tokens, "
                 f"k={m['k']}; sizes > {m['real_keys']} are tiled real keys + noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
