"""The CLI's commands: every stage of the stage table (:mod:`mlpmem.stages`) and the commands that are not stages:
the studies that run stages over configs (`pipeline`, `compare`, `sweep`), `bench` and `fetch-assets`. A
command's module is imported only when it runs, so ``mlpmem --help`` stays fast."""

from __future__ import annotations

from mlpmem.stages import STAGES, Stage, pipeline_stages

# every config section the pipeline's stages read: what a study of the pipeline can set
_PIPELINE_SECTIONS = tuple(dict.fromkeys(s for st in pipeline_stages() for s in st.sections))

_STUDIES = (
    Stage("pipeline", "Run every stage in order (each skips work already done, rebuilds what is stale), then print "
          "the results table.", _PIPELINE_SECTIONS, (), "mlpmem.studies.pipeline:run", in_pipeline=False),
    Stage("bench", "Measure speed, memory and storage side by side: base vs memory vs kNN-LM, extraction, training.",
          ("model", "data", "window", "extract", "index", "knn", "memory", "train", "bench"), (), "mlpmem.bench:run",
          in_pipeline=False),
    Stage("compare", "The paper's comparison: vanilla and fine-tuned base LM (full, LoRA), each with kNN-LM and the "
          "memory, and the alpha = 0 control, side by side with bootstrap intervals.",
          _PIPELINE_SECTIONS + ("compare",), (), "mlpmem.studies.compare:run", in_pipeline=False),
    Stage("sweep", "A study over settings (--sweep.points, e.g. memory sizes and epochs): each point a run directory "
          "that links the base run's outputs it shares and runs the rest, then eval; one table, JSON and plot.",
          _PIPELINE_SECTIONS + ("sweep",), (), "mlpmem.studies.sweep:run", in_pipeline=False),
)

# in the CLI's order: the pipeline's stages, the studies and bench, the stages run on their own, fetch-assets
COMMANDS: dict[str, Stage] = {
    **{s.name: s for s in pipeline_stages()},
    **{s.name: s for s in _STUDIES},
    **{n: s for n, s in STAGES.items() if not s.in_pipeline},
    "fetch-assets": Stage("fetch-assets", "Download and cache the offline default model and corpus.", (), (),
                          "mlpmem.assets:fetch_all", writes=False, in_pipeline=False),
}
