"""`mlpmem pipeline`: every stage of the stage table in order on one config.

Each stage skips work whose manifest already matches; a stage whose inputs changed (an upstream stage was rerun)
is rebuilt rather than refused; a stage whose own settings changed is still refused unless --force. With
--joint.mode lora/full, the jointly trained pair is evaluated too, into ``<eval.out_name>-joint``.
"""

from __future__ import annotations

import logging
import time

from mlpmem.artifacts import rebuilding_stale
from mlpmem.config import Config
from mlpmem.files import atomic_write_json
from mlpmem.runtime import dist_info

log = logging.getLogger(__name__)


def joint_eval_config(cfg: Config) -> Config:
    """``cfg`` set to evaluate the pair trained by `mlpmem joint` (its LM alone and with its memory)."""
    import dataclasses

    systems = [s for s in cfg.eval.systems if s in ("base", "memory")]
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, joint=True, systems=systems,
                                                             out_name=f"{cfg.eval.out_name}-joint"))


def run(cfg: Config) -> dict:
    from mlpmem.stages import STAGES, pipeline_stages

    timings = {}
    with rebuilding_stale():
        for stage in pipeline_stages():
            if stage.name == "generate" and not dist_info().is_main:  # eval shares its windows among processes
                continue
            t0 = time.time()
            log.info("=== pipeline: %s ===", stage.name)
            stage.run(cfg)
            if stage.name == "joint" and cfg.joint.mode != "none":
                STAGES["eval"].run(joint_eval_config(cfg))
            timings[stage.name] = round(time.time() - t0, 1)
            log.info("=== %s done in %.1fs ===", stage.name, timings[stage.name])
    if dist_info().is_main:
        atomic_write_json(cfg.run_dir / "timings.json", timings)
        print("\nStage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return timings
