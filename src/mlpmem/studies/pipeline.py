"""`mlpmem pipeline`: every stage of the stage table in order on one config.

Each stage skips work whose manifest already matches; a stage whose inputs changed (an upstream stage was rerun)
is rebuilt rather than refused; a stage whose own settings changed is still refused unless --force. With
--joint.mode lora/full, the jointly trained pair is evaluated too, into ``<eval.out_name>-joint``. At the end it
prints the stages' wall times and where the results and plots are.
"""

from __future__ import annotations

import logging

from mlpmem.artifacts import rebuilding_stale
from mlpmem.config import Config
from mlpmem.runtime import dist_info
from mlpmem.stages import STAGES, pipeline_stages
from mlpmem.studies.common import TIMINGS, joint_eval_config, record_timings, run_timed
from mlpmem import systems as sy

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    main = dist_info().is_main

    def joint_and_its_eval() -> None:  # the pair trained jointly is scored as part of joint
        STAGES["joint"].run(cfg)
        STAGES["eval"].run(joint_eval_config(cfg))

    with rebuilding_stale():
        for stage in pipeline_stages():
            if stage.name == "generate" and not main:  # eval shares its windows among processes
                continue
            if stage.name == "generate" and sy.MEMORY not in cfg.eval.systems and cfg.generate.lam is None:
                log.info("=== pipeline: generate skipped: eval tuned no memory lambda (memory is not among "
                         "--eval.systems) ===")
                continue
            log.info("=== pipeline: %s ===", stage.name)
            joint = stage.name == "joint" and cfg.joint.mode != "none"
            took = run_timed(stage, cfg, run=joint_and_its_eval if joint else None)
            log.info("=== %s done in %.1fs ===", stage.name, took)
    if not main:
        return {}
    timings = record_timings(cfg.run_dir, {})
    print("\nStage wall times (s; a stage found done keeps the time of the run that built it): " +
          ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(where(cfg))
    return timings


def where(cfg: Config) -> str:
    """Where the results and plots of ``cfg``'s run are (those that exist)."""
    outs = [cfg.run_dir / cfg.eval.out_name]
    if cfg.joint.mode != "none":
        outs.append(cfg.run_dir / joint_eval_config(cfg).eval.out_name)
    lines = ["Results and plots:"]
    for out in outs:
        for name, what in (("results.md", "the table above"), ("results.json", "every number, the tuned settings"),
                           ("ppl_vs_lambda.png", "perplexity against lambda"),
                           ("training.png", "the memory's training curves")):
            if (out / name).is_file():
                lines.append(f"  {out / name}  ({what})")
    lines.append(f"  {cfg.run_dir / TIMINGS}  (the stages' wall times)")
    return "\n".join(lines)
