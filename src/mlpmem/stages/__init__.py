"""The stage table: every stage declared once. The CLI (subcommands, help, through :mod:`mlpmem.commands`), the
studies (`pipeline`, `compare`, `sweep`) and the saved configs read it; a stage module is imported only when it
runs, so ``mlpmem --help`` stays fast.

Each stage module has ``run(cfg) -> dict`` (its manifest, or a summary) and imports only ``mlpmem.artifacts`` and
``mlpmem.components`` (plus the base modules config, files, runtime, errors): never another stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    sections: tuple[str, ...]  # config sections it reads (its CLI flags, and what its saved config.yaml holds)
    upstream: tuple[str, ...]  # stages whose outputs it reads
    target: str  # "module:function" run as fn(cfg)
    writes: bool = True  # takes the run directory's lock
    in_pipeline: bool = True
    output: str | None = None  # its directory in the run dir (eval's is --eval.out_name, "eval" by default)
    reads_only: tuple[str, ...] = ()  # of the sections it reads only in part, the options it reads

    def reads(self, option: str) -> bool:
        """Whether the dotted ``option`` (e.g. 'train.epochs') can change what this stage makes."""
        section = option.split(".")[0]
        if section not in self.sections:
            return False
        partial = {o.split(".")[0] for o in self.reads_only}
        return section not in partial or option in self.reads_only

    @property
    def run(self) -> Callable:
        module, _, fn = self.target.partition(":")
        return getattr(importlib.import_module(module), fn)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "Tokenize the corpus into train/validation/test streams.",
          ("model", "data"), (), "mlpmem.stages.prepare:run", output="data"),
    Stage("finetune", "Fine-tune the base LM on the train split (full or LoRA); later stages then use it as the base "
          "model. A no-op with --finetune.mode none (the default).",
          ("model", "data", "window", "finetune"), ("prepare",), "mlpmem.stages.finetune:run", output="finetune"),
    Stage("extract", "Store the base LM's keys (hidden states) and values (next tokens) over the train split.",
          ("model", "data", "window", "finetune", "extract", "train"), ("prepare", "finetune"),
          "mlpmem.stages.extract:run", output="datastore", reads_only=("train.val_positions",)),
    Stage("index", "Build a FAISS index over the stored keys and report its recall against exact search.",
          ("index", "knn"), ("extract",), "mlpmem.stages.index:run", output="index", reads_only=("knn.k", "knn.datastore_tokens")),
    Stage("knn-targets", "Search each train position's neighbours (leave-one-out) and store sparse kNN targets; "
          "their temperature is kNN-LM's best on validation unless --knn.temperature is set.",
          ("model", "window", "finetune", "extract", "index", "knn", "train", "eval"), ("extract", "index"),
          "mlpmem.stages.targets:run", output="targets",
          reads_only=("train.val_positions", "eval.knn_temperatures")),
    Stage("train", "Train the MLP memory on the kNN targets (offline keys or online LM).",
          ("model", "window", "finetune", "extract", "knn", "memory", "train"), ("extract", "knn-targets"),
          "mlpmem.stages.train:run", output="memory"),
    Stage("eval", "Perplexity of base LM, kNN-LM, memory and their mixtures; lambda tuned on validation.",
          ("model", "data", "window", "finetune", "extract", "index", "knn", "memory", "eval"),
          ("prepare", "extract", "index", "train"), "mlpmem.stages.eval:run", output="eval"),
    Stage("joint", "Train the LM (LoRA or all weights) and its memory together on the mixture's next-token loss, "
          "from the tuned lambda; a no-op with --joint.mode none (the default). Score the pair with `mlpmem eval "
          "--eval.joint true --eval.out_name eval-joint`.",
          ("model", "data", "window", "finetune", "extract", "memory", "eval", "joint"),
          ("prepare", "finetune", "train", "eval"), "mlpmem.stages.joint:run", output="joint"),
    Stage("generate", "Generate with the base LM with and without the memory mixed in.",
          ("model", "finetune", "extract", "memory", "eval", "generate"), ("train", "eval"),
          "mlpmem.stages.generate:run",
          writes=False),
    # stages run on their own, after the pipeline
    Stage("export", "Write the memory as a Hugging Face Hub model folder with a model card (base model, hook, corpus, "
          "eval results); --export.push_to uploads it.",
          ("data", "eval", "export"), ("train", "eval"), "mlpmem.stages.export:run", in_pipeline=False),
    Stage("qa", "Corpus-knowledge QA: cloze questions whose answers (numbers, names) come from train documents (held "
          "in) and test documents (held out); exact match, F1 and answer log-likelihood of the base LM, kNN-LM and the "
          "memory at eval's tuned settings, with intervals; also written as lm-eval tasks.",
          ("model", "data", "window", "finetune", "extract", "index", "knn", "memory", "eval", "qa"),
          ("prepare", "extract", "index", "train", "eval"), "mlpmem.stages.qa:run", output="qa", in_pipeline=False),
)}


def pipeline_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.in_pipeline]


def save_stage_config(cfg, stage: str, out_dir) -> None:
    """The resolved config sections the stage reads, as YAML beside its outputs."""
    from mlpmem.config import save_config

    save_config(cfg, out_dir / "config.yaml", list(STAGES[stage].sections))
