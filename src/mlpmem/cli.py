"""One entry point, one subcommand per stage: ``mlpmem <stage> --config x.yaml --knn.k 256``.

Every option of the stage's config sections is a ``--section.field`` flag (see ``mlpmem <stage> --help``);
flags override the YAML file, which overrides the defaults in :mod:`mlpmem.config`.
"""

from __future__ import annotations

import argparse
import errno
import sys
import typing

from mlpmem.commands import COMMANDS
from mlpmem.config import Config, iter_options, load_config
from mlpmem.errors import DiskSpaceError, UserError

TOP_LEVEL = ["out_dir", "seed", "threads", "force"]
# the config sections a command is about, listed first in its help (default: the section named like the command)
OWN_SECTIONS = {"prepare": ("data",), "knn-targets": ("knn",), "train": ("train", "memory"),
                "pipeline": (), "fetch-assets": ()}


def declared_default(f) -> object:
    """A config field's default as declared (not as resolved for this machine)."""
    import dataclasses

    return f.default_factory() if f.default is dataclasses.MISSING else f.default


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
    for stage, spec in COMMANDS.items():
        desc, sections = spec.description, spec.sections
        p = sub.add_parser(stage, help=desc, description=desc)
        p.add_argument("--config", help="YAML file with any of the sections below (flags override it).")
        p.add_argument("-v", "--verbose", action="store_true", help="Debug logging, and tracebacks on errors.")
        groups = {"": p.add_argument_group("run")}
        own = [s for s in OWN_SECTIONS.get(stage, (stage,)) if s in sections]
        for s in own + [s for s in sections if s not in own]:  # the stage's own settings first
            groups[s] = p.add_argument_group(f"{s} (this stage's own settings)" if s in own else
                                             f"{s} (read from the {s} section)")
        options = sorted(iter_options(), key=lambda o: list(groups).index(o[0].split(".")[0])
                         if o[0].split(".")[0] in groups else 0)
        for name, f, tp in options:
            section = name.split(".")[0] if "." in name else ""
            if section not in groups or (section == "" and name not in TOP_LEVEL):
                continue
            node = declared_default(f)  # as declared: 'auto' stays 'auto' (resolved only when a config loads)
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
    from mlpmem.runtime import init_distributed, seed_everything, set_threads, setup_logging

    setup_logging(args.verbose)
    overrides = {k: v for k, v in vars(args).items() if k not in ("stage", "config", "verbose", "version")}
    cfg = None
    try:
        cfg = load_config(args.config, overrides)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)
        init_distributed()
        run_stage(args.stage, cfg)
    except UserError as e:  # the user's to fix: one line that says how
        return _fail(args, e, 2)
    except DiskSpaceError as e:  # the machine's, with its own one line (path, free space, what a rerun does)
        return _fail(args, e, 1)
    except OSError as e:  # the machine's: full disk, permissions, ... (numpy's short write has no errno)
        return _fail(args, e, 1, _os_error(e if e.errno is not None else _disk_full(e, cfg) or e))
    except KeyboardInterrupt:
        # --force deleted the old outputs when this run started; a rerun with it would delete this run's work too
        then = ("rerun without --force to resume where it stopped (with --force it starts over)"
                if cfg is not None and cfg.force else "rerun the same command to resume")
        print(f"mlpmem {args.stage}: interrupted; {then}", file=sys.stderr)
        return 130
    except Exception as e:
        disk = _disk_full(e, cfg)
        if disk is not None:  # a writer that wrapped the full disk's OSError (torch.save's RuntimeError, ...)
            return _fail(args, e, 1, _os_error(disk))
        return _fail(args, e, 1, f"internal error ({type(e).__name__}: {_first_line(e)}); this is a bug in "
                                 "mlpmem: rerun with -v for the traceback and report it")
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _disk_full(e: BaseException, cfg: Config | None) -> OSError | None:
    """The last resort before calling ``e`` a bug: an OSError for a full disk (or quota, or file-size limit) when one
    is in ``e``'s chain, or when the run directory's disk refuses a probe write now; else None."""
    from mlpmem.disk import disk_full_errno, disk_refuses

    code = disk_full_errno(e)
    if code is None and cfg is not None and cfg.run_dir.is_dir():
        code = disk_refuses(cfg.run_dir)
    if code is None:
        return None
    found, seen = e, set()
    while found is not None and id(found) not in seen:  # the chain's own OSError, for its file name
        seen.add(id(found))
        if isinstance(found, OSError) and found.errno == code:
            return found
        found = found.__cause__ or found.__context__
    return OSError(code, errno.errorcode.get(code, "disk full"))


def _os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"no space left on the device or over a file-size limit{where}: free space (or choose another "
                "--out_dir) and rerun; the stage resumes where it stopped")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a writable --out_dir or fix the permissions"
    return f"{e.strerror or _first_line(e)}{where}"


def _fail(args, e: BaseException, code: int, message: str | None = None) -> int:
    if args.verbose:
        import traceback

        traceback.print_exception(e)
    print(f"mlpmem {args.stage}: error: {message or _first_line(e)}", file=sys.stderr)
    return code


def run_stage(stage: str, cfg: Config):
    """Run a command (a stage, a study, ...: :data:`mlpmem.commands.COMMANDS`); those that write hold the run
    directory's lock."""
    spec = COMMANDS[stage]
    if not spec.writes:
        return spec.run(cfg) if stage != "fetch-assets" else spec.run()
    from mlpmem.artifacts.lock import run_lock

    with run_lock(cfg.run_dir, f"mlpmem {stage}"):
        return spec.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
