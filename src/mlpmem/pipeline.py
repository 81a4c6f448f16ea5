"""`mlpmem pipeline`: every stage of the stage table in order on one config.

Each stage skips work whose manifest already matches; a stage whose inputs changed (an upstream stage was rerun)
is rebuilt rather than refused; a stage whose own settings changed is still refused unless --force.
"""

from __future__ import annotations

import logging
import time

from mlpmem.artifacts import rebuilding_stale
from mlpmem.config import Config
from mlpmem.files import atomic_write_json
from mlpmem.runtime import dist_info

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    from mlpmem.stages import pipeline_stages

    timings = {}
    with rebuilding_stale():
        for stage in pipeline_stages():
            if stage.name == "generate" and not dist_info().is_main:  # eval shares its windows among processes
                continue
            t0 = time.time()
            log.info("=== pipeline: %s ===", stage.name)
            stage.run(cfg)
            timings[stage.name] = round(time.time() - t0, 1)
            log.info("=== %s done in %.1fs ===", stage.name, timings[stage.name])
    if dist_info().is_main:
        atomic_write_json(cfg.run_dir / "timings.json", timings)
        print("\nStage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return timings
