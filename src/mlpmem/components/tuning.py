"""Settings chosen from per-token gold log-probs: sweeps, tuning on validation, grid edges, bootstrap intervals.

Every system's perplexity at any setting follows exactly from the per-position log-probs of the gold token that
scoring kept (:class:`mlpmem.components.scoring.Scored`): the LM, the memory at each swept temperature and the kNN
distribution at each swept temperature. So tuning costs no forward pass:

- λ is swept on the configured grid, then refined in steps of 0.01 between the grid neighbours of the best value;
- the kNN temperature and the memory's inference temperature are swept on their grids; a tuned value on the
  edge of a grid that could go further is reported in ``edges``, and :func:`widened_grids` extends the grids
  past it (the `eval` stage then scores again, up to MAX_WIDENINGS times);
- memory+kNN mixes the memory at its own tuned temperature with kNN-LM at each kNN temperature;
- memory+gate (when listed in --eval.systems) starts from the memory's tuned λ and temperature and fits a per-token
  λ on validation (:mod:`mlpmem.components.gate`); it keeps the fixed λ unless the gate wins on held-out documents;
- a paired bootstrap over documents gives 95% intervals of each system's perplexity change against the base LM,
  and of the memory against kNN-LM (same resampled documents for both sides).
"""

from __future__ import annotations

import logging

import numpy as np

from mlpmem.components.gate import Gate, fit_gate, gated_gold
from mlpmem.components.interpolate import mix3
from mlpmem.components.interpolate import mix_gold as mix2  # log((1 - lam) p_lm + lam p_other), exact at 0 and 1
from mlpmem.components.interpolate import perplexity as ppl
from mlpmem.config import Config
from mlpmem.systems import BASE, KNN, MEMORY, MEMORY_ALONE, MEMORY_GATE, MEMORY_KNN

log = logging.getLogger(__name__)

FINE_STEP = 0.01
BOOTSTRAP_SAMPLES = 1000
# paired intervals reported besides "vs base" (memory+gate against the same memory at its fixed λ)
COMPARISONS = ((MEMORY, KNN), (MEMORY_KNN, KNN), (MEMORY_GATE, MEMORY))


def _temps(scored, cfg: Config) -> tuple[list[float], list[float]]:
    """The temperatures of the scores' rows: recorded with them (an evaluation may have widened its grids), else
    --eval's grids (scores saved before they recorded theirs)."""
    knn_T = list(scored.knn_T) if scored.knn_T is not None else list(cfg.eval.knn_temperatures)
    mem_T = list(scored.mem_T) if scored.mem_T is not None else list(cfg.eval.memory_temperatures)
    if scored.knn is not None and scored.knn.shape[0] != len(knn_T):
        raise ValueError(f"the kNN scores have {scored.knn.shape[0]} temperatures but knn_temperatures lists "
                         f"{len(knn_T)} ({knn_T}): rerun `mlpmem eval --force`")
    if scored.mem is not None and scored.mem.shape[0] != len(mem_T):
        raise ValueError(f"the memory scores have {scored.mem.shape[0]} temperatures but memory_temperatures "
                         f"lists {len(mem_T)} ({mem_T}): rerun `mlpmem eval --force`")
    return knn_T, mem_T


def system_logprobs(scored, system: str, setting: dict, cfg: Config) -> np.ndarray:
    """(M,) float64 log p(gold) of ``system`` at ``setting`` (keys lam, T, T_mem, lam_mem, lam_knn)."""
    knn_T, mem_T = _temps(scored, cfg)
    if system == BASE:
        return scored.lm
    if system == KNN:
        return mix2(scored.lm, scored.knn[knn_T.index(setting["T"])], setting["lam"])
    mem = scored.mem[mem_T.index(setting["T_mem"])]
    if system == MEMORY:
        return mix2(scored.lm, mem, setting["lam"])
    if system == MEMORY_ALONE:
        return mem
    if system == MEMORY_GATE:  # setting["gate"]: the fitted gate's parameters, or None for the fixed λ
        if setting.get("gate") is None:
            return mix2(scored.lm, mem, setting["lam"])
        gate = Gate.from_dict(setting["gate"])
        return gated_gold(scored.lm, mem, gate.lam(scored.gate_features(gate.T_mem)))
    if system == MEMORY_KNN:
        return mix3(scored.lm, mem, scored.knn[knn_T.index(setting["T"])], setting["lam_mem"], setting["lam_knn"])
    raise ValueError(f"unknown system {system!r}")


def _lambdas(cfg: Config) -> list[float]:
    e = cfg.eval  # a fixed --eval.lam is always evaluated, even when it is not in the swept list
    return sorted(set(e.lambdas) | ({e.lam} if e.lam is not None else set()))


def sweep(scored, cfg: Config, mem_T: float | None = None) -> dict:
    """Perplexity of every system at every grid setting: {system: [{"lam":.., "T":.., "ppl":..}, ...]}.
    memory+knn uses the memory at temperature ``mem_T`` (default: the first of --eval.memory_temperatures)."""
    knn_T, mem_Ts = _temps(scored, cfg)
    lambdas = _lambdas(cfg)
    out: dict[str, list[dict]] = {BASE: [{"ppl": ppl(scored.lm)}]}
    if scored.knn is not None:
        out[KNN] = [{"lam": lam, "T": T, "ppl": ppl(mix2(scored.lm, scored.knn[i], lam))}
                      for i, T in enumerate(knn_T) for lam in lambdas]
    if scored.mem is not None:
        out[MEMORY] = [{"lam": lam, "T_mem": T, "ppl": ppl(mix2(scored.lm, scored.mem[i], lam))}
                         for i, T in enumerate(mem_Ts) for lam in lambdas]
    if scored.mem is not None and scored.knn is not None:
        tm = mem_Ts[0] if mem_T is None else mem_T
        mem = scored.mem[mem_Ts.index(tm)]
        out[MEMORY_KNN] = [{"lam_mem": a, "lam_knn": b, "T": T, "T_mem": tm,
                              "ppl": ppl(mix3(scored.lm, mem, scored.knn[i], a, b))}
                             for i, T in enumerate(knn_T) for a in cfg.eval.lambdas for b in cfg.eval.lambdas
                             if a + b <= 1.0 + 1e-9 and a > 0 and b > 0]
    return out


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["ppl"])


def _around(value: float, grid: list[float], lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Values in steps of FINE_STEP between the grid neighbours of ``value`` (within [lo, hi])."""
    g = sorted(set(grid) | {value})
    i = g.index(value)
    a, b = (g[i - 1] if i else value), (g[i + 1] if i + 1 < len(g) else value)
    return np.clip(np.round(np.arange(a, b + FINE_STEP / 2, FINE_STEP), 4), lo, hi)


def _refine(scored, system: str, setting: dict, cfg: Config) -> dict:
    """The best setting with λ refined between its grid neighbours (unless --eval.lam fixes it)."""
    if cfg.eval.lam is not None and system in (KNN, MEMORY):
        return setting
    def score(s: dict) -> float:
        return ppl(system_logprobs(scored, system, s, cfg))
    if system in (KNN, MEMORY):
        cands = [{**setting, "lam": float(x)} for x in _around(setting["lam"], cfg.eval.lambdas)]
    else:
        cands = [{**setting, "lam_mem": float(a), "lam_knn": float(b)}
                 for a in _around(setting["lam_mem"], cfg.eval.lambdas)
                 for b in _around(setting["lam_knn"], cfg.eval.lambdas) if a > 0 and b > 0 and a + b <= 1 + 1e-9]
    return min(cands + [setting], key=score)


def _edges(system: str, setting: dict, cfg: Config, knn_T: list[float], mem_T: list[float]) -> list[str]:
    """Tuned values at an edge of their grid that the grid could extend past (λ stops at 0 and 1)."""
    e, out = cfg.eval, []
    for key, grid in (("T", knn_T), ("T_mem", mem_T)):
        if key in setting and len(grid) > 1 and setting[key] in (min(grid), max(grid)):
            out.append(key)
    lams = [x for x in e.lambdas if 0 < x < 1]
    for key in ("lam", "lam_mem", "lam_knn"):
        v = setting.get(key)
        if v is not None and e.lam is None and lams and (v >= max(e.lambdas) or v <= min(e.lambdas)) and 0 < v < 1:
            out.append(key)
    return out


MAX_WIDENINGS = 3  # rounds of grid widening per evaluation (each a factor 2 past the edge for temperatures)


def widened_grids(results: dict, scored, cfg: Config) -> dict[str, list[float]] | None:
    """Grids that extend past every tuned value sitting on an edge of its grid (``results['edges']`` from
    :func:`settle` on ``scored``, the tuning split): a temperature at the low edge gains half of it, at the high
    edge twice it; a λ at the edge of a grid short of 0 or 1 gains the midpoint towards it. Returns
    {"knn_temperatures", "memory_temperatures", "lambdas"} (sorted), or None when nothing is on an edge."""
    knn_T, mem_T = _temps(scored, cfg)
    grids = {"knn_temperatures": sorted(knn_T), "memory_temperatures": sorted(mem_T),
             "lambdas": sorted(cfg.eval.lambdas)}
    changed = False
    for system, keys in results["edges"].items():
        setting = results["settings"][system]
        for key in keys:
            name = {"T": "knn_temperatures", "T_mem": "memory_temperatures"}.get(key, "lambdas")
            grid, v = grids[name], float(setting[key])
            if name == "lambdas":
                add = round((v + 1.0) / 2, 4) if v >= max(grid) else round(v / 2, 4)
            else:
                add = v * 2.0 if v >= max(grid) else v / 2.0
            if add not in grid:
                grid.append(add)
                grid.sort()
                changed = True
    return grids if changed else None


def doc_ids_of(offsets: np.ndarray, n_scored: int) -> np.ndarray:
    """Document of each scored position of a stream (position t predicts token t + 1, which belongs to it)."""
    return np.searchsorted(np.asarray(offsets), np.arange(1, n_scored + 1), side="right") - 1


def bootstrap_changes(lp: dict[str, np.ndarray], doc_ids: np.ndarray, pairs: list[tuple[str, str]],
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[tuple[str, str], dict]:
    """Paired bootstrap over documents: for each (a, b), the change ppl_a / ppl_b - 1 and its 95% interval.

    lp: system -> (M,) gold log-probs on the same positions; doc_ids: (M,) document of each position. Documents
    are resampled with replacement (the same draw for every system), and perplexity is recomputed token-weighted.
    """
    _, doc = np.unique(doc_ids, return_inverse=True)
    D = int(doc.max()) + 1 if doc.size else 0
    n_doc = np.bincount(doc, minlength=D).astype(np.float64)
    nll = {s: np.bincount(doc, weights=-v, minlength=D) for s, v in lp.items()}
    W = np.random.default_rng(seed).multinomial(D, np.full(D, 1.0 / D), size=samples).astype(np.float64)
    toks = W @ n_doc
    out = {}
    for a, b in pairs:
        point = float(np.exp((nll[a].sum() - nll[b].sum()) / n_doc.sum()) - 1)
        boot = np.exp((W @ nll[a] - W @ nll[b]) / toks) - 1
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[(a, b)] = {"change": point, "ci95": [float(lo), float(hi)], "documents": D,
                       "excludes_zero": bool(lo > 0 or hi < 0)}
    return out


def settle(scored_by_split: dict, cfg: Config, doc_ids: dict[str, np.ndarray] | None = None) -> dict:
    """Tune each system on validation (λ refined, temperatures from their grids; --eval.lam fixes λ) and report
    every split at those settings, with bootstrap intervals where ``doc_ids`` (split -> (M,) documents) is given."""
    tune_split = "validation" if "validation" in scored_by_split else next(iter(scored_by_split))
    tuned = scored_by_split[tune_split]
    sweeps = {s: sweep(sc, cfg) for s, sc in scored_by_split.items()}
    if tune_split != "validation" and len(sweeps[tune_split]) > 1:
        log.warning("no validation split scored: settings are tuned on %r, which is then not held out", tune_split)
    chosen: dict[str, dict] = {BASE: {}}
    for system in (KNN, MEMORY):
        if system in sweeps[tune_split]:
            rows = sweeps[tune_split][system]
            if cfg.eval.lam is not None:
                rows = [r for r in rows if abs(r["lam"] - cfg.eval.lam) < 1e-9]
            pick = {k: v for k, v in best(rows).items() if k != "ppl"}
            chosen[system] = _refine(tuned, system, pick, cfg)
    if MEMORY in chosen:
        chosen[MEMORY_ALONE] = {"lam": 1.0, "T_mem": chosen[MEMORY]["T_mem"]}
        if KNN in chosen:  # the memory at its own tuned temperature
            tm = chosen[MEMORY]["T_mem"]
            sweeps = {s: {**sw, MEMORY_KNN: sweep(scored_by_split[s], cfg, mem_T=tm)[MEMORY_KNN]}
                      for s, sw in sweeps.items()}
            pick = {k: v for k, v in best(sweeps[tune_split][MEMORY_KNN]).items() if k != "ppl"}
            chosen[MEMORY_KNN] = _refine(tuned, MEMORY_KNN, pick, cfg)
    gate_report = None
    if MEMORY in chosen and MEMORY_GATE in cfg.eval.systems and tuned.lm_feats is None:
        log.warning("memory+gate: the %s scores hold no gate features (scored without memory+gate): skipped",
                    tune_split)
    elif MEMORY in chosen and MEMORY_GATE in cfg.eval.systems:
        chosen[MEMORY_GATE], gate_report = _fit_gate(tuned, chosen[MEMORY], cfg,
                                                       (doc_ids or {}).get(tune_split))
    knn_T, mem_T = _temps(tuned, cfg)
    edges = {s: e for s, st in chosen.items()  # memory+gate's λ and temperature are the memory's
             if s not in (MEMORY_ALONE, MEMORY_GATE) and (e := _edges(s, st, cfg, knn_T, mem_T))}
    results = {}
    for split, sc in scored_by_split.items():
        lp = {s: system_logprobs(sc, s, st, cfg) for s, st in chosen.items()}
        res = {s: {**chosen[s], "ppl": ppl(v)} for s, v in lp.items()}
        entry = {"tokens": sc.n, "systems": res, "seconds": sc.seconds}
        if doc_ids is not None and split in doc_ids:
            pairs = [(s, BASE) for s in lp if s != BASE] + [p for p in COMPARISONS if p[0] in lp and p[1] in lp]
            ci = bootstrap_changes(lp, doc_ids[split], pairs, seed=cfg.seed)
            for s in lp:
                if s != BASE:
                    res[s]["vs_base"] = ci[(s, BASE)]
            entry["comparisons"] = {f"{a} vs {b}": ci[(a, b)] for a, b in COMPARISONS if (a, b) in ci}
        results[split] = entry
    out = {"tuned_on": tune_split, "settings": chosen, "edges": edges, "splits": results, "sweeps": sweeps,
           "grids": {"knn_temperatures": knn_T, "memory_temperatures": mem_T, "lambdas": _lambdas(cfg)}}
    if gate_report is not None:
        out["gate"] = gate_report
    return out


def _fit_gate(tuned, memory_setting: dict, cfg: Config, doc_ids: np.ndarray | None) -> tuple[dict, dict]:
    """memory+gate's setting (the memory's λ and temperature, and the gate's parameters or None for the fixed λ)
    and the fit's report. Without document ids the tuning positions are split into two contiguous halves."""
    lam, T_mem = memory_setting["lam"], memory_setting["T_mem"]
    if doc_ids is None:
        doc_ids = np.arange(tuned.n) * 2 // max(tuned.n, 1)
    _, mem_Ts = _temps(tuned, cfg)
    gate, report = fit_gate(tuned.lm, tuned.mem[mem_Ts.index(T_mem)], tuned.gate_features(T_mem), doc_ids, lam,
                            T_mem, seed=cfg.seed)
    log.info("memory+gate: %s (held-out NLL %s)", report["reason"], report.get("check"))
    return {"lam": lam, "T_mem": T_mem, "gate": gate.to_dict() if gate is not None else None}, report


def warn_edges(results: dict, where: str) -> None:
    """Log the tuned values still on an edge of their grid (after widening)."""
    for s, e in results["edges"].items():
        log.warning("%s: %s's tuned %s still sits on the edge of its grid (%s) after widening it %d times: the "
                    "optimum may lie further out; widen --eval.%s", where, s, ", ".join(e), results["settings"][s],
                    MAX_WIDENINGS, "knn_temperatures" if "T" in e else "memory_temperatures" if "T_mem" in e
                    else "lambdas")
