"""`mlpmem pipeline`: every stage in order on one config; each skips work whose manifest already matches."""

from __future__ import annotations

import logging
import time

from mlpmem.config import Config
from mlpmem.store import atomic_write_json

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    from mlpmem import data, eval_stage, extract, generate, retrieval, train
    from mlpmem.runtime import dist_info

    stages = [("prepare", data.run), ("extract", extract.run), ("index", retrieval.run_index),
              ("knn-targets", retrieval.run_targets), ("train", train.run), ("eval", eval_stage.run),
              ("generate", generate.run)]
    timings = {}
    for name, fn in stages:
        if name == "generate" and not dist_info().is_main:  # eval shares its windows among the processes
            continue
        t0 = time.time()
        log.info("=== pipeline: %s ===", name)
        fn(cfg)
        timings[name] = round(time.time() - t0, 1)
        log.info("=== %s done in %.1fs ===", name, timings[name])
    if dist_info().is_main:
        atomic_write_json(cfg.run_dir / "timings.json", timings)
        print("\nStage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return timings
