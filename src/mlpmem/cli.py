"""One entry point, one subcommand per stage: ``mlpmem <stage> --config x.yaml --knn.k 256``.

Every option of the stage's config sections is a ``--section.field`` flag (see ``mlpmem <stage> --help``);
flags override the YAML file, which overrides the defaults in :mod:`mlpmem.config`.
"""

from __future__ import annotations

import argparse
import sys
import typing

from mlpmem.config import Config, ConfigError, iter_options, load_config

# stage -> (one-line description, config sections it reads)
STAGES: dict[str, tuple[str, list[str]]] = {
    "prepare": ("Tokenize the corpus into train/validation/test streams.", ["model", "data"]),
    "extract": ("Store the base LM's keys (hidden states) and values (next tokens) over the train split.",
                ["model", "data", "window", "extract"]),
    "index": ("Build a FAISS index over the stored keys and report its recall against exact search.",
              ["index", "knn"]),
    "knn-targets": ("Search each train position's neighbours (leave-one-out) and store sparse kNN targets.",
                    ["index", "knn"]),
    "train": ("Train the MLP memory on the kNN targets (offline keys or online LM).",
              ["model", "window", "extract", "knn", "memory", "train"]),
    "eval": ("Perplexity of base LM, kNN-LM, memory and their mixtures; lambda tuned on validation.",
             ["model", "data", "window", "extract", "index", "knn", "memory", "eval"]),
    "generate": ("Generate with the base LM with and without the memory mixed in.",
                 ["model", "extract", "memory", "generate"]),
    "pipeline": ("Run every stage in order (each skips work already done), then print the results table.",
                 ["model", "data", "window", "extract", "index", "knn", "memory", "train", "eval", "generate"]),
    "bench": ("Measure speed, memory and storage side by side: base vs memory vs kNN-LM, extraction, training.",
              ["model", "data", "window", "extract", "index", "knn", "memory", "train", "bench"]),
    "fetch-assets": ("Download and cache the offline default model and corpus.", []),
}
TOP_LEVEL = ["out_dir", "seed", "threads", "force"]


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is list:
        return f"{args[0].__name__},..."
    if args:
        return _type_name(args[0])
    return getattr(tp, "__name__", str(tp)).upper() if tp is not bool else "BOOL"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlpmem", description="Retriever-pretrained MLP memory for Hugging Face causal LMs.",
        epilog="Each stage writes under --out_dir with a manifest; rerunning skips finished work.")
    parser.add_argument("--version", action="store_true", help="Print the version and exit.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    defaults = Config().to_dict()
    for stage, (desc, sections) in STAGES.items():
        p = sub.add_parser(stage, help=desc, description=desc)
        p.add_argument("--config", help="YAML file with any of the sections below (flags override it).")
        p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
        groups = {"": p.add_argument_group("run")}
        for s in sections:
            groups[s] = p.add_argument_group(s)
        for name, f, tp in iter_options():
            section = name.split(".")[0] if "." in name else ""
            if section not in groups or (section == "" and name not in TOP_LEVEL):
                continue
            node = defaults
            for part in name.split("."):
                node = node[part]
            choices = f.metadata.get("choices")
            hint = f" (one of: {', '.join(map(str, choices))})" if choices else ""
            groups[section].add_argument(
                f"--{name}", dest=name, default=argparse.SUPPRESS, nargs="?" if tp is bool else None,
                const="true" if tp is bool else None, metavar=_type_name(tp),
                help=f"{f.metadata.get('help', '')}{hint} [default: {node}]".replace("%", "%%"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mlpmem import __version__

        print(__version__)
        return 0
    if not args.stage:
        parser.print_help()
        return 2
    from mlpmem.lm import ModelLoadError
    from mlpmem.runtime import init_distributed, seed_everything, set_threads, setup_logging
    from mlpmem.store import StageError

    setup_logging(args.verbose)
    overrides = {k: v for k, v in vars(args).items() if k not in ("stage", "config", "verbose", "version")}
    try:
        cfg = load_config(args.config, overrides)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)
        init_distributed()
        run_stage(args.stage, cfg)
    except (ConfigError, StageError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"mlpmem {args.stage}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_stage(stage: str, cfg: Config):
    """Dispatch to the stage's ``run(cfg)`` (imported lazily so ``--help`` stays fast)."""
    if stage == "fetch-assets":
        from mlpmem.assets import fetch_all

        return fetch_all()
    if stage == "prepare":
        from mlpmem.data import run
    elif stage == "extract":
        from mlpmem.extract import run
    elif stage == "index":
        from mlpmem.retrieval import run_index as run
    elif stage == "knn-targets":
        from mlpmem.retrieval import run_targets as run
    elif stage == "train":
        from mlpmem.train import run
    elif stage == "eval":
        from mlpmem.eval_stage import run
    elif stage == "generate":
        from mlpmem.generate import run
    elif stage == "pipeline":
        from mlpmem.pipeline import run
    elif stage == "bench":
        from mlpmem.bench import run
    else:  # pragma: no cover - argparse restricts choices
        raise ValueError(stage)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
