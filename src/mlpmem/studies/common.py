"""What the studies share: running a stage timed, ``timings.json``, linking an output another run directory built,
the config that scores the jointly trained pair, and the format of a change with its interval."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from mlpmem.artifacts import read_manifest
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import atomic_write_json, read_json
from mlpmem.runtime import dist_info
from mlpmem.stages import Stage
from mlpmem import systems as sy

TIMINGS = "timings.json"  # <run dir>/timings.json: stage -> wall seconds of the run that built its output


def stage_output(stage: Stage, cfg: Config) -> str | None:
    """The stage's directory in ``cfg``'s run directory (eval's is --eval.out_name); None when it writes none."""
    return cfg.eval.out_name if stage.name == "eval" else stage.output


def joint_eval_config(cfg: Config) -> Config:
    """``cfg`` set to evaluate the pair trained by `mlpmem joint` (its LM alone and with its memory)."""
    systems = [s for s in cfg.eval.systems if s in (sy.BASE, sy.MEMORY)]
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, joint=True, systems=systems,
                                                             out_name=f"{cfg.eval.out_name}-joint"))


def read_timings(run_dir: Path) -> dict[str, float]:
    return read_json(run_dir / TIMINGS) or {}


def record_timings(run_dir: Path, new: dict[str, float]) -> dict[str, float]:
    """Merge ``new`` into ``<run_dir>/timings.json`` (main process only) and return the whole record."""
    timings = {**read_timings(run_dir), **new}
    if dist_info().is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / TIMINGS, timings)
    return timings


def _created(stage_dir: Path) -> str | None:
    return (read_manifest(stage_dir) or {}).get("created")


def run_timed(stage: Stage, cfg: Config, run: Callable[[], object] | None = None, record: bool = True) -> float:
    """Run ``stage`` on ``cfg`` (``run`` instead, when given: pipeline's joint also scores the pair) and return its
    wall seconds. The stage skips work already done; when it built its output now (or has none), its time goes
    into the run directory's ``timings.json`` unless ``record`` is off, so a stage found done keeps the time of
    the run that built it."""
    output = stage_output(stage, cfg)
    before = _created(cfg.run_dir / output) if output else None
    t0 = time.time()
    if run is not None:
        run()
    else:
        stage.run(cfg)
    took = round(time.time() - t0, 1)
    if record and (not output or _created(cfg.run_dir / output) != before):
        record_timings(cfg.run_dir, {stage.name: took})
    return took


def link(src: Path, dst: Path, flag: str) -> None:
    """Make ``dst`` a symlink to the directory ``src`` (an output another run directory built and this one shares);
    a StageError naming ``flag`` (the option that chooses another place) when ``dst`` is something else."""
    if dst.is_symlink() and dst.resolve() == src.resolve():
        return
    if dst.is_symlink() or dst.exists():
        raise StageError(f"{dst} exists and is not a link to {src}: remove it or choose another {flag}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve(), target_is_directory=True)


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def interval(ci: dict | None) -> str:
    """A change with its 95% interval, e.g. '-3.2% [-4.0%, -2.5%]'; '' without one."""
    return f"{pct(ci['change'])} [{pct(ci['ci95'][0])}, {pct(ci['ci95'][1])}]" if ci else ""


def save_figure(fig, path: Path) -> bool:
    """Lay out, write (creating the folder) and close a study's matplotlib figure; True, for the plot functions."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
