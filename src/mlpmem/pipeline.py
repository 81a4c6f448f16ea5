"""`mlpmem pipeline`: every stage of the stage table in order on one config.

Each stage skips work whose manifest already matches; a stage whose inputs changed (an upstream stage was rerun)
is rebuilt rather than refused; a stage whose own settings changed is still refused unless --force. With
--joint.mode lora/full, the jointly trained pair is evaluated too, into ``<eval.out_name>-joint``.
"""

from __future__ import annotations

import logging
import time

from mlpmem.artifacts import read_manifest, rebuilding_stale
from mlpmem.config import Config
from mlpmem.files import atomic_write_json, read_json
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

    # wall time of each stage's output, from the run that built it (a stage found done keeps its recorded time)
    timings = (read_json(cfg.run_dir / "timings.json") or {}) if dist_info().is_main else {}
    with rebuilding_stale():
        for stage in pipeline_stages():
            if stage.name == "generate" and not dist_info().is_main:  # eval shares its windows among processes
                continue
            out = cfg.run_dir / (cfg.eval.out_name if stage.name == "eval" else (stage.output or ""))
            before = (read_manifest(out) or {}).get("created") if stage.output else None
            t0 = time.time()
            log.info("=== pipeline: %s ===", stage.name)
            stage.run(cfg)
            if stage.name == "joint" and cfg.joint.mode != "none":
                STAGES["eval"].run(joint_eval_config(cfg))
            took = round(time.time() - t0, 1)
            log.info("=== %s done in %.1fs ===", stage.name, took)
            if not stage.output or (read_manifest(out) or {}).get("created") != before:
                timings[stage.name] = took
    if dist_info().is_main:
        atomic_write_json(cfg.run_dir / "timings.json", timings)
        print("\nStage wall times (s; a stage found done keeps the time of the run that built it): " +
              ", ".join(f"{k} {v}" for k, v in timings.items()))
    return timings
