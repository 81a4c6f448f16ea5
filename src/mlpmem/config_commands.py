"""The configs of the commands that are not pipeline stages (bench, compare, export, qa, sweep): sections of
:class:`mlpmem.config.Config` like the stages' own, kept here so config.py stays readable."""

from __future__ import annotations

from dataclasses import dataclass

from mlpmem.config_values import check as _check
from mlpmem.config_values import RUN_DIR_NAMES, opt, point_name
from mlpmem.systems import BASE, MEMORY


@dataclass
class BenchConfig:
    sizes: list[int] = opt([10_000, 100_000, 1_000_000], "Datastore sizes (keys) for the inference benchmark.")
    tokens: int = opt(2048, "Tokens scored per inference measurement.")
    train_steps: int = opt(10, "Steps timed for the training-loss comparison.")
    real_keys: int = opt(16384, "Keys extracted from the base LM over the train split; larger datastores tile them "
                         "with Gaussian noise (see --bench.noise).")
    noise: float = opt(0.05, "Std of the noise added to tiled copies of the real keys, as a fraction of each "
                       "dimension's std (copies stay distinct vectors).")
    ivf_train_size: int = opt(65536, "Keys sampled to train each IVFPQ index (nlist is also capped at this / 39, "
                              "FAISS' minimum of training points per list).")
    repeats: int = opt(2, "Rounds of inference timings (systems interleaved); each system's fastest pass is "
                       "reported. Passes over 20 s and 3x the base LM's are not repeated.")
    flat_max: int = opt(1_000_000, "Largest datastore held in RAM (2d bytes per key) and also searched with a Flat "
                        "index (4d more); larger sizes are IVFPQ only: trained on a sample of the first flat_max "
                        "keys, the other keys generated chunk by chunk and streamed into the index.")
    memory_blocks: list[int] = opt([4, 0], "Memories timed (one base+memory system each), by number of blocks; 0 "
                                   "is the authors' depth rule (1.5 x the LM's layers, a memory as large as the "
                                   "LM). 4 is the demo preset's. The training comparison uses the first.")

    def validate(self, p: str) -> None:
        _check(len(self.sizes) > 0 and all(s >= 100 for s in self.sizes), f"{p}.sizes",
               "must list one or more sizes, each >= 100")
        _check(self.tokens >= 2, f"{p}.tokens", f"must be >= 2, got {self.tokens}")
        _check(self.train_steps >= 1, f"{p}.train_steps", f"must be >= 1, got {self.train_steps}")
        _check(self.real_keys >= 100, f"{p}.real_keys", f"must be >= 100, got {self.real_keys}")
        _check(self.noise >= 0, f"{p}.noise", f"must be >= 0, got {self.noise}")
        _check(self.ivf_train_size >= 1, f"{p}.ivf_train_size", "must be >= 1")
        _check(self.repeats >= 1, f"{p}.repeats", f"must be >= 1, got {self.repeats}")
        _check(self.flat_max >= 100, f"{p}.flat_max", f"must be >= 100, got {self.flat_max}")
        _check(len(self.memory_blocks) >= 1 and all(b >= 0 for b in self.memory_blocks), f"{p}.memory_blocks",
               f"must list one or more block counts >= 0 (0: the depth rule), got {self.memory_blocks}")


COMPARE_VARIANTS = ("vanilla", "full", "lora", "full-ce", "joint")


@dataclass
class CompareConfig:
    variants: list[str] = opt(list(COMPARE_VARIANTS), "Runs of `mlpmem compare`, each a run directory under "
                              "--out_dir: vanilla (the base LM as given, + kNN-LM, + memory), full / lora (the base "
                              "fine-tuned on the train split, + kNN-LM and memory for full), full-ce (the memory on "
                              "the fine-tuned base trained with --train.alpha 0: no kNN targets, the control), joint (full's LM and "
                              "memory trained together on the mixture's loss, --joint.mode, LoRA unless set).")
    split: str = opt("test", "Split of the table (settings are tuned on validation).", ("validation", "test"))
    lora_lr: float = opt(2e-4, "--finetune.lr of the lora variant (adapters want a larger rate than full "
                         "fine-tuning, which uses --finetune.lr).")

    def validate(self, p: str) -> None:
        _check(len(self.variants) > 0, f"{p}.variants", "must list at least one variant")
        for v in self.variants:
            _check(v in COMPARE_VARIANTS, f"{p}.variants", f"unknown variant {v!r} (known: {', '.join(COMPARE_VARIANTS)})")
        _check("vanilla" in self.variants, f"{p}.variants", "must include vanilla (the reference row)")
        _check(self.lora_lr > 0, f"{p}.lora_lr", f"must be > 0, got {self.lora_lr}")
        _check("full-ce" not in self.variants or "full" in self.variants, f"{p}.variants",
               "full-ce reuses full's datastore and targets: list full too")
        _check("joint" not in self.variants or "full" in self.variants, f"{p}.variants",
               "joint starts from full's fine-tuned LM and memory: list full too")


@dataclass
class ExportConfig:
    dir: str | None = opt(None, "Folder to write the memory and its model card to (None: <out_dir>/export).")
    joint: bool = opt(False, "Export the memory trained jointly with its LM (`mlpmem joint`) instead of memory/.")
    push_to: str | None = opt(None, "Also upload the folder to this Hub repo id (user/name; needs a token).")
    private: bool = opt(True, "Create the Hub repo private.")
    dtype: str = opt("fp32", "Weights dtype of the exported memory (fp16 halves the folder; loaders cast it to the "
                     "base model's dtype).", ("fp32", "fp16"))
    license: str | None = opt(None, "License id for the model card (e.g. apache-2.0; None: the base model's when "
                              "known, else the placeholder 'other' / base-model-license-unknown).")

    def validate(self, p: str) -> None:
        _check(self.push_to is None or self.push_to.count("/") == 1, f"{p}.push_to",
               f"must be a Hub repo id user/name, got {self.push_to!r}")
        _check(self.dtype in ("fp32", "fp16"), f"{p}.dtype", f"must be fp32 or fp16, got {self.dtype!r}")


QA_KINDS = ("number", "name")


@dataclass
class QaConfig:
    items: int = opt(240, "Items per side: held-in (from train documents: the datastore and memory hold them) and "
                     "held-out (from test documents: the control).")
    per_doc: int = opt(2, "At most this many items per document (intervals resample documents).")
    kinds: list[str] = opt(list(QA_KINDS), "Answer spans: number (years, counts, amounts), name (a capitalised "
                           "name that does not open its sentence).")
    min_prompt_words: int = opt(4, "Words the answer's sentence must give before the answer (the cue).")
    max_new_tokens: int = opt(10, "Greedy tokens generated per item (the prediction is its first n words, n the "
                              "answer's).")
    batch_size: int = opt(16, "Items per forward pass.")
    rag: bool = opt(False, "Also answer with retrieval: BM25 (bm25s) over the train documents' passages, the top "
                    "--qa.rag_k put before the prompt, for the run's LM alone (rag) and with the memory at eval's "
                    "tuned setting (rag+memory); their answers per second include retrieval.")
    rag_k: int = opt(3, "Passages retrieved per question (--qa.rag); cut from the lowest-ranked to fit the window.")
    rag_passage_words: int = opt(100, "Words per passage of the retrieval corpus (--qa.rag): whole sentences "
                                 "packed up to this many.")

    def validate(self, p: str) -> None:
        for n in ("items", "per_doc", "max_new_tokens", "batch_size", "rag_k", "rag_passage_words"):
            _check(getattr(self, n) >= 1, f"{p}.{n}", f"must be >= 1, got {getattr(self, n)}")
        _check(self.min_prompt_words >= 0, f"{p}.min_prompt_words", "must be >= 0")
        _check(len(self.kinds) > 0 and set(self.kinds) <= set(QA_KINDS), f"{p}.kinds",
               f"must list some of {', '.join(QA_KINDS)}, got {self.kinds}")


SWEEP_EXCLUDED = ("out_dir", "force", "compare", "sweep", "bench", "generate", "export", "qa")


@dataclass
class SweepConfig:
    points: list[dict] = opt([], "Runs of `mlpmem sweep`, each a mapping of options to change from this config, e.g. "
                             "[{memory.num_blocks: 2}, {train.epochs: 4}]; {} is the config itself. Each point is a "
                             "run directory under --out_dir/<sweep.name>/ that links every stage output whose "
                             "settings and inputs it shares with --out_dir and runs the others, then eval.")
    eval: dict = opt({"splits": ["validation"], "systems": [BASE, MEMORY]}, "eval options of every point (what "
                     "is measured; they never make a stage rerun): by default validation only, since a study "
                     "chooses on validation.")
    name: str = opt("sweep", "Sub-directory of --out_dir holding the points, results.json, results.md and plots.")

    def validate(self, p: str) -> None:
        for point in self.points:
            for key in point:
                _check("." in key or key == "seed", f"{p}.points",
                       f"{key!r}: name options as section.option (e.g. memory.num_blocks)")
                _check(key.split(".")[0] not in SWEEP_EXCLUDED, f"{p}.points",
                       f"{key!r}: a point cannot change {key.split('.')[0]}")
        _check(len({point_name(pt) for pt in self.points}) == len(self.points), f"{p}.points", "lists a point twice")
        _check(all("." not in k for k in self.eval), f"{p}.eval",
               "name eval options without the section (splits, not eval.splits)")
        _check(bool(self.name) and "/" not in self.name and not self.name.startswith("."), f"{p}.name",
               f"must be a plain directory name, got {self.name!r}")
        _check(self.name not in RUN_DIR_NAMES + ("eval",), f"{p}.name", f"{self.name!r} is where a stage or command "
               "writes in the run directory; name the sweep otherwise, e.g. sweep-blocks")
