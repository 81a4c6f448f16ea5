"""Typed configuration: one dataclass per stage, loaded from YAML plus dotted command-line overrides.

Every option is a field with a ``help`` string, so ``mlpmem <stage> --help`` lists them all as
``--section.field``. Values are type-checked and range-checked on construction; a bad value raises
:class:`ConfigError` naming the flag to fix (``--train.lr``), never a bare traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlpmem.config_values import RUN_DIR_NAMES, build, opt, point_name, read_yaml, set_dotted  # noqa: F401
from mlpmem.config_values import check as _check
from mlpmem.config_commands import (COMPARE_VARIANTS, QA_KINDS, SWEEP_EXCLUDED, BenchConfig,  # noqa: F401
                                    CompareConfig, ExportConfig, QaConfig, SweepConfig)
from mlpmem.errors import ConfigError  # noqa: F401  (re-exported: callers catch it from here)
from mlpmem.systems import DEFAULT_EVAL_SYSTEMS, EVAL_SYSTEMS, JOINT_EVAL_SYSTEMS, MEMORY, MEMORY_GATE


@dataclass
class ModelConfig:
    name: str = opt("default", "Base LM: 'default' (offline SmolLM2-135M), a hub id, a local directory, or a .gguf file.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) when `name` is a hub id.")
    dtype: str = opt("auto", "Weights dtype for inference: 'auto' is bf16 where the device computes bf16 natively "
                     "(a recent GPU, a CPU with AVX512-BF16/AMX), else fp32 (bf16 is emulated, and far slower, on "
                     "other CPUs).", ("auto", "fp32", "bf16", "fp16"))
    device: str = opt("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub (off: only transformers' own classes).")

    def validate(self, p: str) -> None:
        _check(bool(self.name.strip()), f"{p}.name", "must not be empty")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"{p}.device", f"got {self.device!r}; use auto, cpu, cuda or cuda:N")


@dataclass
class DataConfig:
    source: str = opt("default", "Corpus: 'default' (offline Wikipedia leads), a .txt/.jsonl file or a directory of "
                      "them, or 'hf:NAME[:CONFIG]' for a Hugging Face dataset (local save_to_disk dirs work too).")
    text_field: str = opt("text", "Field holding the text in JSONL records and HF datasets.")
    skip_bad_records: bool = opt(False, "JSONL/JSON records and HF dataset rows whose text field is not a string "
                                 "(null, a number, a list, an object): false refuses the corpus naming the first; "
                                 "true skips them and logs how many (the prepare manifest counts them).")
    doc_per: str = opt("auto", "Plain-text files: one document per 'line' or per 'file' ('auto': per file in a "
                       "directory, per line for a single file).", ("auto", "line", "file"))
    separator: str = opt("auto", "Between documents: 'auto' (<|endoftext|> if in the vocab, else EOS), 'none' "
                         "(for line-split corpora such as WikiText), or literal text.")
    validation_fraction: float = opt(0.05, "Fraction of documents held out for validation when the source has no splits.")
    test_fraction: float = opt(0.05, "Fraction of documents held out for test when the source has no splits.")
    seed: int = opt(42, "Seed of the document shuffle that assigns splits (and of --data.order shuffled).")
    order: str = opt("shuffled", "Order of each split's documents before the token budgets (--data.max_train_tokens, "
                     "--data.max_eval_tokens, and prefixes of --knn.datastore_tokens) cut it: 'shuffled' (a "
                     "permutation from --data.seed, so every prefix is a random sample of the split) or 'corpus' (the "
                     "source's order, as before this option: on a corpus grouped by topic, larger prefixes drift "
                     "towards other topics).", ("shuffled", "corpus"))
    max_train_tokens: int | None = opt(None, "Keep only the first N train tokens (whole documents, in --data.order); "
                                       "None keeps all.")
    max_eval_tokens: int | None = opt(None, "Keep only the first N validation/test tokens (in --data.order); None "
                                      "keeps all.")

    def validate(self, p: str) -> None:
        for name in ("validation_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"{p}.{name}", f"must be in [0, 1), got {v}")
        _check(self.validation_fraction + self.test_fraction < 1.0, f"{p}.test_fraction",
               "validation_fraction + test_fraction must leave documents for train")
        _check(self.seed >= 0, f"{p}.seed", f"must be >= 0, got {self.seed}")
        _check(bool(self.source.strip()), f"{p}.source", "must not be empty ('default' is the offline corpus)")
        for name in ("max_train_tokens", "max_eval_tokens"):
            v = getattr(self, name)
            _check(v is None or v >= 2, f"{p}.{name}", f"must be >= 2 or null, got {v}")


@dataclass
class WindowConfig:
    context: int = opt(1024, "Tokens of input per window (extraction and evaluation).")
    stride: int = opt(512, "Tokens newly scored per window; each stored/scored position sees >= context - stride "
                      "tokens of context except at the start of a stream.")
    batch_size: int = opt(8, "Windows per forward pass.")

    def validate(self, p: str) -> None:
        _check(self.context >= 2, f"{p}.context", f"must be >= 2, got {self.context}")
        _check(1 <= self.stride <= self.context, f"{p}.stride", f"must be in [1, context={self.context}], got {self.stride}")
        _check(self.batch_size >= 1, f"{p}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class FinetuneConfig:
    mode: str = opt("none", "Fine-tune the base LM on the train split before anything else: 'none', 'full' or 'lora' "
                    "(peft). The result (run_dir/finetune/model) is then the base model of every later stage.",
                    ("none", "full", "lora"))
    lr: float = opt(1e-4, "AdamW peak learning rate (full fine-tuning usually wants ~5e-5, LoRA ~2e-4).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(20, "Linear warm-up steps (then linear decay to 0).")
    epochs: float = opt(1.0, "Passes over the train split's windows (fractions allowed).")
    max_steps: int | None = opt(None, "Stop after this many steps (overrides epochs).")
    batch_size: int = opt(8, "Windows per optimiser step (across all processes); tokens per step = this x "
                          "--window.context.")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).")
    dtype: str = opt("fp32", "Weights dtype while training (bf16 halves memory; fp32 is exact on CPU).",
                     ("fp32", "bf16"))
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: float = opt(32.0, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA branch.")
    lora_targets: list[str] = opt(["auto"], "Module names LoRA adapts ('auto': the attention and MLP projections).")
    eval_every: int = opt(50, "Steps between validation passes (checkpoint selection by validation loss).")
    save_every: int = opt(50, "Steps between resumable checkpoints.")
    val_windows: int = opt(32, "Validation windows scored per validation pass.")

    def validate(self, p: str) -> None:
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _check(self.epochs > 0, f"{p}.epochs", "must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, f"{p}.max_steps", "must be >= 1 or null")
        _check(self.batch_size >= 1, f"{p}.batch_size", "must be >= 1")
        _check(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0")
        _check(self.lora_r >= 1, f"{p}.lora_r", "must be >= 1")
        _check(self.lora_alpha > 0, f"{p}.lora_alpha", "must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, f"{p}.lora_dropout", "must be in [0, 1)")
        _check(len(self.lora_targets) > 0, f"{p}.lora_targets", "must list at least one module name (or auto)")
        for n in ("eval_every", "save_every", "val_windows"):
            _check(getattr(self, n) >= 1, f"{p}.{n}", "must be >= 1")


@dataclass
class JointConfig(FinetuneConfig):
    mode: str = opt("none", "`mlpmem joint`: train the LM (its LoRA adapters, or all weights) and the trained memory "
                    "together on the mixture's next-token loss, -log((1 - lam) p_LM + lam p_mem), gradients flowing "
                    "into both; 'none' does nothing.", ("none", "full", "lora"))
    lr: float = opt(1e-4, "AdamW peak learning rate of the LM's trainable weights and the memory alike.")
    lam: float | None = opt(None, "Memory weight in the trained mixture; None: the lambda `eval` tuned for the memory.")
    memory_trains: bool = opt(True, "Update the memory too (false: only the LM adapts to the frozen memory).")

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(self.lam is None or 0.0 < self.lam <= 1.0, f"{p}.lam", "must be in (0, 1] or null")


@dataclass
class ExtractConfig:
    hook: str = opt("auto", "Module whose output is the key, as 'module.path' or 'module.path:input'. 'auto': the "
                    "pre-FFN norm of decoder layer `layer` (GPT-2 ln_2, Llama post_attention_layernorm).")
    layer: int = opt(-1, "Decoder layer for hook 'auto' (-1: the last).")
    shards: int = opt(1, "Shards of the datastore (one per process under torchrun; more allows resuming finer).")

    def validate(self, p: str) -> None:
        _check(self.shards >= 1, f"{p}.shards", f"must be >= 1, got {self.shards}")
        _check(bool(self.hook.strip()), f"{p}.hook", "must not be empty ('auto' picks the pre-FFN norm)")


@dataclass
class IndexConfig:
    factory: str = opt("auto", "FAISS index factory string ('Flat', 'IVF4096,PQ64', ...). 'auto': Flat below "
                       "200K keys, else IVF<~4*sqrt(N)>,PQ64.")
    train_size: int = opt(1_000_000, "Keys sampled (seeded) to train the index.")
    add_chunk: int = opt(1_000_000, "Keys added per chunk.")
    nprobe: int = opt(32, "IVF lists searched per query.")
    use_gpu: str = opt("auto", "Build/search on GPU: auto (if faiss has GPUs), yes, no.", ("auto", "yes", "no"))
    recall_queries: int = opt(500, "Sampled real keys used to report recall@k against exact search.")

    def validate(self, p: str) -> None:
        _check(self.train_size >= 1, f"{p}.train_size", "must be >= 1")
        _check(self.add_chunk >= 1, f"{p}.add_chunk", "must be >= 1")
        _check(self.nprobe >= 1, f"{p}.nprobe", "must be >= 1")
        _check(self.recall_queries >= 1, f"{p}.recall_queries", "must be >= 1")
        _check(bool(self.factory), f"{p}.factory", "must not be empty")


@dataclass
class KnnConfig:
    k: int = opt(1024, "Neighbours retrieved per query.")
    temperature: float | None = opt(None, "Softmax temperature over -distance for the training targets. None: the "
                                    "temperature at which kNN-LM itself does best on the validation positions "
                                    "(swept over --eval.knn_temperatures), since distance scales differ by model; "
                                    "the authors' 16 was tuned on GPT-2's.")
    distances: str = opt("exact", "'exact': distances of the retrieved keys recomputed from the stored fp16 keys (a "
                         "re-rank; the original kNN-LM's setting); 'index': as the index returns them "
                         "(PQ-approximate for IVFPQ, cheaper).", ("index", "exact"))
    store_ids: int | None = opt(None, "Cap on the distinct token ids stored per position (most probable first; the "
                                "dropped mass is reported and the rest renormalised, which sharpens the targets). "
                                "None keeps the whole distribution (variable-length rows).")
    query_batch: int = opt(2048, "Queries per search call.")
    teacher_dir: str | None = opt(None, "Run directory of a teacher model (same tokenizer) whose datastore and index "
                                  "supply the targets; None: this run's own.")
    datastore_tokens: int | None = opt(None, "Use only the first N train positions of the extracted datastore for "
                                       "the index, the kNN targets and the memory (None: all): corpus-size studies "
                                       "share one extraction, each size a prefix of the next.")
    exclude: str = opt("position", "What a train position's targets leave out of its neighbours: 'position' its own "
                       "row only (leave-one-out by id); 'document' every row of its own train document, as kNN-LM "
                       "at test time never retrieves from the document it scores. Still k + 1 neighbours are "
                       "searched, so fewer remain (the targets manifest reports how many were dropped); a position "
                       "left with none trains on the CE term alone.", ("position", "document"))

    def validate(self, p: str) -> None:
        _check(self.k >= 1, f"{p}.k", f"must be >= 1, got {self.k}")
        _check(self.temperature is None or self.temperature > 0, f"{p}.temperature",
               f"must be > 0 or null (tuned), got {self.temperature}")
        _check(self.query_batch >= 1, f"{p}.query_batch", "must be >= 1")
        _check(self.store_ids is None or self.store_ids >= 1, f"{p}.store_ids", "must be >= 1 or null")
        _check(self.datastore_tokens is None or self.datastore_tokens >= 2, f"{p}.datastore_tokens",
               f"must be >= 2 or null, got {self.datastore_tokens}")


@dataclass
class MemoryConfig:
    num_blocks: int | None = opt(None, "Residual FFN blocks; None: the authors' rule, 1.5 x the base LM's layers.")
    hidden_size: int | None = opt(None, "Memory width; None: the base LM's hidden size (else an input projection).")
    intermediate_size: int | None = opt(None, "FFN inner size; None: the base LM's (GPT-2: 4 x width).")
    dropout: float = opt(0.1, "Dropout in training (GPT-2 family blocks).")
    init_head: str = opt("random", "'random' (normal 0.02) or 'lm': copy the base LM's output embedding and "
                         "final norm.", ("random", "lm"))
    temperature: float = opt(1.0, "Softmax temperature of the memory's logits at inference when no evaluation has "
                             "tuned one (eval tunes it over --eval.memory_temperatures).")

    def validate(self, p: str) -> None:
        for n in ("num_blocks", "hidden_size", "intermediate_size"):
            v = getattr(self, n)
            _check(v is None or v >= 1, f"{p}.{n}", f"must be >= 1 or null (null: the default), got {v}")
        _check(0.0 <= self.dropout < 1.0, f"{p}.dropout", "must be in [0, 1)")
        _check(self.temperature > 0, f"{p}.temperature", "must be > 0")


@dataclass
class TrainConfig:
    input: str = opt("offline", "'offline': read stored keys; 'online': run the frozen base LM and capture them.",
                     ("offline", "online"))
    alpha: float = opt(0.5, "Loss = alpha * KL(p_knn || p_mem) + (1 - alpha) * CE(gold).")
    lr: float = opt(5e-4, "AdamW peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(2000, "Linear warm-up steps (then linear decay to 0).")
    batch_size: int = opt(1024, "Positions per optimiser step (across all processes).")
    epochs: float = opt(1.0, "Passes over the train positions (fractions allowed).")
    max_steps: int | None = opt(None, "Stop after this many steps (overrides epochs).")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).")
    bf16: bool | None = opt(None, "bf16 autocast for the memory forward/backward (null: on where the device computes "
                            "bf16 natively, as --model.dtype auto).")
    eval_every: int = opt(200, "Steps between validation passes (checkpoint selection, see select_by).")
    save_every: int = opt(200, "Steps between resumable checkpoints.")
    val_positions: int = opt(20000, "Validation positions scored per validation pass.")
    log_every: int = opt(20, "Steps between metric lines in metrics.jsonl.")
    seed: int | None = opt(None, "Seed of the memory's initialisation, batch order and dropout; null: the top-level "
                           "--seed. A sweep point setting it trains a new memory on the same upstream artifacts.")
    select_by: str = opt("loss", "Validation criterion that picks the best checkpoint: 'loss' (alpha * KL + (1 - "
                         "alpha) * CE, which means something else for each alpha) or 'ce' (the memory's own "
                         "next-token cross-entropy, the same for every alpha). Studies comparing alpha should set "
                         "'ce'.", ("loss", "ce"))
    keep_last: bool = opt(True, "Keep memory/last (the resumable checkpoint: weights + optimizer state, ~3x the "
                          "memory) once training is complete; false removes it when best/ is chosen (not part of "
                          "the fingerprint).")

    def seed_or(self, seed: int) -> int:
        """The seed training uses: --train.seed, else the top-level ``seed``."""
        return seed if self.seed is None else self.seed

    def fingerprinted(self) -> dict:
        """The options as fingerprints see them. ``seed`` is left out (callers fingerprint the seed in use, see
        seed_or) and ``select_by`` at its default too, so runs made before these options keep their fingerprints;
        ``keep_last`` never (it decides what is kept on disk after training, not what is trained)."""
        d = dataclasses.asdict(self)
        d.pop("seed")
        d.pop("keep_last")
        if d["select_by"] == "loss":
            d.pop("select_by")
        return d

    def validate(self, p: str) -> None:
        _check(0.0 <= self.alpha <= 1.0, f"{p}.alpha", f"must be in [0, 1], got {self.alpha}")
        _check(self.seed is None or self.seed >= 0, f"{p}.seed", f"must be >= 0 or null, got {self.seed}")
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _check(self.batch_size >= 1, f"{p}.batch_size", "must be >= 1")
        _check(self.epochs > 0, f"{p}.epochs", "must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, f"{p}.max_steps", "must be >= 1 or null")
        _check(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0")
        for n in ("eval_every", "save_every", "val_positions", "log_every"):
            _check(getattr(self, n) >= 1, f"{p}.{n}", "must be >= 1")


@dataclass
class EvalConfig:
    splits: list[str] = opt(["validation", "test"], "Splits to score; lambdas are tuned on 'validation'.")
    systems: list[str] = opt(list(DEFAULT_EVAL_SYSTEMS), "Systems: base, knn, memory, memory+knn "
                             "(those whose artifacts are missing are skipped with a warning); memory+gate (opt-in, "
                             "with memory) adds a per-token lambda fitted on validation, kept only where it wins "
                             "on held-out validation documents.")
    lambdas: list[float] = opt([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0],
                               "Interpolation weights swept on validation.")
    knn_temperatures: list[float] = opt([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                                        "kNN-LM temperatures swept on validation (a tuned value on an edge is "
                                        "reported: widen the grid).")
    memory_temperatures: list[float] = opt([0.5, 0.75, 1.0, 1.5, 2.0], "Memory inference temperatures swept on "
                                           "validation (each costs one more log-softmax per token).")
    knn_k: int | None = opt(None, "Neighbours for kNN-LM evaluation; None: --knn.k.")
    lam: float | None = opt(None, "Fix lambda instead of tuning it on validation.")
    out_name: str = opt("eval", "Sub-directory of the run dir for results.")
    ood_source: str | None = opt(None, "Out-of-domain corpus (a .txt/.jsonl file or a directory of them, read as "
                                 "the corpus is), scored as an extra split 'ood' with every system at the "
                                 "settings tuned on validation: does the LM, or the LM + memory, get worse on text "
                                 "of another domain? Tokenized with the run's tokenizer, documents shuffled by "
                                 "--data.seed, cut to --eval.ood_tokens; prepared once into <out_dir>/ood/. "
                                 "None: off.")
    ood_tokens: int = opt(25000, "Tokens of --eval.ood_source scored (whole documents, as --data.max_eval_tokens).")
    joint: bool = opt(False, "Score the LM and memory trained together by `mlpmem joint` (run_dir/joint) instead of "
                      "the base model and memory/; needs its own --eval.out_name (e.g. eval-joint) and systems "
                      "base and memory only (the datastore was built from the LM before joint training).")

    def validate(self, p: str) -> None:
        if self.joint:
            _check(self.out_name != "eval", f"{p}.out_name", "--eval.joint writes its own results: name them, e.g. "
                   "--eval.out_name eval-joint (eval/ holds the lambda joint training started from)")
            _check(set(self.systems) <= set(JOINT_EVAL_SYSTEMS), f"{p}.systems", "with --eval.joint only "
                   "base and memory (and memory+gate) "
                   "(kNN-LM's datastore holds the keys of the LM before joint training)")
        for n in ("splits", "systems", "lambdas", "knn_temperatures", "memory_temperatures"):
            _check(len(getattr(self, n)) > 0, f"{p}.{n}", "must list at least one value")
        _check(self.knn_k is None or self.knn_k >= 1, f"{p}.knn_k", f"must be >= 1 or null, got {self.knn_k}")
        _check(bool(self.out_name) and "/" not in self.out_name and not self.out_name.startswith("."),
               f"{p}.out_name", f"must be a plain directory name, got {self.out_name!r}")
        _check(self.out_name not in RUN_DIR_NAMES, f"{p}.out_name", f"{self.out_name!r} is where another stage or "
               "command writes in the run directory; name eval's output otherwise, e.g. eval-test")
        for s in self.splits:
            _check(s in ("train", "validation", "test", "ood"), f"{p}.splits", f"unknown split {s!r}")
        _check("ood" not in self.splits or self.ood_source is not None, f"{p}.splits",
               "split 'ood' needs an out-of-domain corpus: set --eval.ood_source")
        _check(any(s != "ood" for s in self.splits), f"{p}.splits", "list a split to tune on besides 'ood' "
               "(validation): settings are never tuned on the out-of-domain text")
        _check(self.ood_source is None or bool(self.ood_source.strip()), f"{p}.ood_source",
               "must not be empty (null: off)")
        _check(self.ood_tokens >= 2, f"{p}.ood_tokens", f"must be >= 2, got {self.ood_tokens}")
        _check(self.out_name != "ood", f"{p}.out_name", "'ood' is where eval prepares --eval.ood_source: name "
               "eval's output otherwise")
        for s in self.systems:
            _check(s in EVAL_SYSTEMS, f"{p}.systems", f"unknown system {s!r}")
        _check(MEMORY_GATE not in self.systems or MEMORY in self.systems, f"{p}.systems",
               "memory+gate starts from the memory's tuned lambda: list memory too")
        for lam in self.lambdas:
            _check(0.0 <= lam <= 1.0, f"{p}.lambdas", f"each must be in [0, 1], got {lam}")
        _check(all(t > 0 for t in self.knn_temperatures), f"{p}.knn_temperatures", "must be > 0")
        _check(all(t > 0 for t in self.memory_temperatures), f"{p}.memory_temperatures", "must be > 0")
        for n in ("knn_temperatures", "memory_temperatures"):
            v = getattr(self, n)
            _check(len(set(v)) == len(v), f"{p}.{n}", f"must not repeat a value, got {v}")
        _check(self.lam is None or 0.0 <= self.lam <= 1.0, f"{p}.lam", "must be in [0, 1] or null")


@dataclass
class GenerateConfig:
    prompts: list[str] = opt(["The history of the Roman Empire", "Photosynthesis is"], "Prompts to continue.")
    max_new_tokens: int = opt(40, "Tokens generated per prompt.")
    lam: float | None = opt(None, "Memory weight; None: the value tuned by eval (an error when there is none: run "
                            "eval or set it).")
    do_sample: bool = opt(False, "Sample instead of greedy decoding.")
    num_beams: int = opt(1, "Beam width.")
    temperature: float = opt(1.0, "Sampling temperature.")
    side_by_side: bool = opt(True, "Print base and base+memory continuations together.")

    def validate(self, p: str) -> None:
        _check(len(self.prompts) > 0 and all(q.strip() for q in self.prompts), f"{p}.prompts",
               "must list at least one non-empty prompt")
        _check(self.max_new_tokens >= 1, f"{p}.max_new_tokens", "must be >= 1")
        _check(self.num_beams >= 1, f"{p}.num_beams", "must be >= 1")
        _check(self.temperature is None or self.temperature > 0, f"{p}.temperature",
               f"must be > 0 or null (tuned), got {self.temperature}")
        _check(self.lam is None or 0.0 <= self.lam <= 1.0, f"{p}.lam", "must be in [0, 1] or null")


@dataclass
class Config:
    out_dir: str = opt("runs/demo", "Run directory: every stage writes its artifacts and manifest under it.")
    seed: int = opt(42, "Global seed.")
    threads: int | None = opt(None, "torch/faiss CPU threads (None: $OMP_NUM_THREADS if set, else every core "
                              "this process may use).")
    force: bool = opt(False, "Redo a stage even if a matching complete manifest exists.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    qa: QaConfig = field(default_factory=QaConfig)

    def __post_init__(self) -> None:
        self.validate()
        self._resolve_precision()

    def _resolve_precision(self) -> None:
        """Turn 'auto' precisions into the concrete ones for this machine, so that fingerprints, manifests and
        results record what ran; warn when bf16 is asked for where it is emulated."""
        auto = self.model.dtype == "auto" or self.train.bf16 is None
        wants_bf16 = self.model.dtype == "bf16" or self.train.bf16 is True
        if not (auto or wants_bf16):
            return
        from mlpmem.runtime import native_bf16, resolve_dtype

        native = native_bf16(self.model.device)
        self.model.dtype = resolve_dtype(self.model.dtype, self.model.device)
        if self.train.bf16 is None:
            self.train.bf16 = native
        if wants_bf16 and not native:
            logging.getLogger(__name__).warning(
                "bf16 was asked for (--model.dtype bf16 or --train.bf16 true) but this device has no native bf16: "
                "it is emulated and runs many times slower than fp32. Use --model.dtype auto and --train.bf16 null.")

    def validate(self) -> None:
        _check(bool(self.out_dir), "out_dir", "must not be empty")
        _check(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate(f.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing

def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a Config from an optional YAML file (which may ``include:`` another) and ``{"train.lr": "1e-3"}``-style
    overrides."""
    tree: dict = read_yaml(Path(path)) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(tree, dotted, value)
    # validation of sub-sections happens inside Config.__post_init__, with section-prefixed flags
    return build(Config, tree, "")


def iter_options(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted name, field, type) for every leaf option, for building CLI help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_options(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def save_config(cfg: Config, path: Path, sections: list[str] | None = None) -> None:
    """Write the resolved config (or some sections) as YAML next to an artifact."""
    from mlpmem.files import atomic_write_text

    d = cfg.to_dict()
    if sections is not None:
        d = {k: d[k] for k in sections}
    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))
