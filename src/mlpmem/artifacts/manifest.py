"""Stage manifests and the upstream chain.

Each stage directory ends with ``manifest.json``, written last and atomically; ``complete: true`` means the outputs
are whole. A manifest records ``upstream``: the fingerprint of every artifact the stage read, by its directory
(relative to the run directory, absolute for another run's, e.g. a teacher datastore). A stage's own fingerprint
covers those, so an upstream rerun changes it. Consumers call :func:`verify_chain` before use: it walks the
upstream links down to ``prepare`` and refuses, naming the stage to rerun, as soon as a recorded fingerprint is
not the one on disk now (the upstream was rebuilt since) or an upstream is missing or incomplete.

A manifest also lists the files it vouches for (sizes, and the sha256 of weight files): a stage whose listed files
are missing or changed is not "up to date" (:func:`should_skip` rebuilds it) and no reader uses it
(:func:`require_manifest` refuses it). A directory belongs to one kind of writer (:func:`claim`): eval never
writes into the memory's directory, whatever --eval.out_name says.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from mlpmem.errors import StageError
from mlpmem.files import atomic_write_json, atomic_write_text, file_listing, listing_problem, read_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: manifests record their upstream fingerprints
MANIFEST = "manifest.json"
OWNER = ".mlpmem-owner"  # the kind of writer (stage or command) a directory belongs to
# the option that names a writer's directory, for messages (the others live at fixed names under --out_dir)
NAMED_BY = {"eval": "--eval.out_name", "sweep": "--sweep.name"}

# writers whose command is not `mlpmem <their name>` (the out-of-domain split is prepared by eval)
_MADE_BY = {"ood": "mlpmem eval"}


def command_of(stage: str | None) -> str:
    """The command that makes a stage's output, for messages: `mlpmem <stage>`, as the stage table names its
    subcommands (``mlpmem.stages``, a higher layer, is not read here); "its stage" when the writer is unknown."""
    if not stage:
        return "its stage"
    return _MADE_BY.get(stage, f"mlpmem {stage}")

_rebuild_stale: contextvars.ContextVar[bool] = contextvars.ContextVar("rebuild_stale", default=False)


@contextlib.contextmanager
def rebuilding_stale() -> Iterator[None]:
    """Within this block a stage whose inputs changed is rebuilt instead of refused (what `pipeline` does)."""
    token = _rebuild_stale.set(True)
    try:
        yield
    finally:
        _rebuild_stale.reset(token)


def package_version() -> str:
    from mlpmem import __version__

    return __version__


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The manifest of a stage directory, or None when there is none."""
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{p} is corrupt ({e}); delete {p.parent} and rerun its stage") from None


def owner_of(d: str | Path) -> str | None:
    """The kind of writer ``d`` belongs to: its manifest's stage, else its owner mark; None for a fresh directory."""
    d = Path(d)
    m = read_json(d / MANIFEST)
    if isinstance(m, dict) and m.get("stage"):
        return str(m["stage"])
    try:
        return (d / OWNER).read_text().strip() or None
    except OSError:
        return None


def claim(d: str | Path, kind: str) -> None:
    """Make ``d`` a directory of writer ``kind``; StageError (before anything is written or removed) if it belongs
    to another kind, e.g. --eval.out_name memory, or --sweep.name eval."""
    d = Path(d)
    who = owner_of(d)
    if who not in (None, kind):
        raise StageError(f"{d} holds {who} output (`{command_of(who)}`), and only {who} writes "
                         f"there: choose another {NAMED_BY.get(kind, '--out_dir')} for {kind}'s output "
                         "(--force does not change whose directory it is)")
    if who is None:
        # not made by mlpmem, which marks a directory before writing into it (hidden names are temporaries, e.g.
        # another rank's mark being written)
        if d.is_dir() and any(not p.name.startswith(".") for p in d.iterdir()):
            raise StageError(f"{d} holds files mlpmem did not write, and mlpmem writes only into directories of "
                             f"its own: choose another {NAMED_BY.get(kind, '--out_dir')}, or move it away")
        if d.exists() and not d.is_dir():
            raise StageError(f"{d} is a file, where {kind} would write a directory: choose another "
                             f"{NAMED_BY.get(kind, '--out_dir')}, or move it away")
        atomic_write_text(d / OWNER, kind + "\n")


def write_manifest(stage_dir: str | Path, stage: str, fp: str, upstream: dict[str, str], nested: tuple[str, ...] = (),
                   **fields: Any) -> dict:
    """Write the stage's manifest last and atomically; returns it. It lists the files of ``stage_dir`` it vouches
    for; ``nested``: subdirectories that are outputs of their own (their manifest lists their files)."""
    stage_dir = Path(stage_dir)
    def skip(p: Path) -> bool:
        return p.name == MANIFEST or (p / MANIFEST).exists() or (p.parent == stage_dir and p.name in nested)

    m = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "package_version": package_version(),
        "fingerprint": fp,
        "upstream": dict(upstream),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
        "files": file_listing(stage_dir, skip),
        "complete": True,
    }
    atomic_write_json(Path(stage_dir) / MANIFEST, m)
    return m


def invalidate(stage_dir: str | Path) -> None:
    """Mark a stage as incomplete before rewriting it, so a crash never leaves an old manifest over new files."""
    (Path(stage_dir) / MANIFEST).unlink(missing_ok=True)


def require_manifest(stage_dir: str | Path, stage: str, command: str | None = None) -> dict:
    """The complete manifest of a stage directory, or a StageError naming the command that makes it."""
    command = command or command_of(stage)
    m = read_manifest(stage_dir)
    if m is None or not m.get("complete"):
        raise StageError(f"no complete {stage} output in {stage_dir}: run `{command}` first")
    if m.get("stage") != stage:
        raise StageError(f"{stage_dir} holds a {m.get('stage')!r} manifest, expected {stage!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise StageError(f"{stage_dir} was written by another version of mlpmem (format {m.get('format_version')}, "
                         f"this one reads {FORMAT_VERSION}): rerun `{command} --force`")
    problem = listing_problem(stage_dir, m.get("files") or {})
    if problem:
        raise StageError(f"the {stage} output in {stage_dir} is damaged: {problem}. Rerun `{command}` (it rebuilds "
                         "it), then the stages after it, or `mlpmem pipeline`")
    return m


def _resolve(run_dir: Path, key: str) -> Path:
    p = Path(key)
    return p if p.is_absolute() else run_dir / p


def verify_chain(run_dir: str | Path, key: str, stage: str, _seen: dict | None = None) -> dict:
    """The complete manifest of artifact ``key`` (a directory relative to ``run_dir``), after checking that every
    upstream it records still holds the output it was made from, all the way down. StageError otherwise."""
    run_dir = Path(run_dir)
    seen = {} if _seen is None else _seen
    where = _resolve(run_dir, key)
    if str(where) in seen:
        return seen[str(where)]
    m = require_manifest(where, stage)
    for up_key, up_fp in m.get("upstream", {}).items():
        up_dir = _resolve(run_dir, up_key)
        up = read_manifest(up_dir)
        up_stage = (up or {}).get("stage") or "the upstream stage"
        if up is None or not up.get("complete"):
            raise StageError(f"{where} ({stage}) was made from {up_dir}, which now holds no complete output: rerun "
                             f"`{command_of((up or {}).get('stage'))}` and then `{command_of(stage)} --force`, or "
                             "`mlpmem pipeline`")
        if up.get("fingerprint") != up_fp:
            raise StageError(f"{where} ({stage}) is stale: it was made from an older {up_stage} output in {up_dir} "
                             f"(rerun since). Rerun `{command_of(stage)} --force` and the stages after it, or "
                             "`mlpmem pipeline`, which rebuilds stale stages")
        # this run's artifact: down its chain too; another run's (an absolute key, a teacher's) is that run's care
        if not Path(up_key).is_absolute():
            verify_chain(run_dir, up_key, up_stage, seen)
    seen[str(where)] = m
    return m


def should_skip(stage_dir: str | Path, stage: str, fp: str, force: bool, upstream: dict[str, str] | None = None,
                run_dir: str | Path | None = None) -> dict | None:
    """Return the existing manifest when the stage is already done with the same fingerprint, else None (do it).

    Done means its files are still the ones its manifest lists (else it is rebuilt) and, with ``run_dir``, that
    the upstream artifacts it was made from are whole too: a memory whose weights changed after training makes its
    evaluation refuse, not report "up to date" with numbers of other weights.

    A complete manifest with another fingerprint means the outputs were made with other settings or inputs: refuse
    rather than silently mixing them, unless ``force`` (or, inside :func:`rebuilding_stale`, when only the inputs
    changed).
    """
    command = command_of(stage)
    claim(stage_dir, stage)
    m = read_manifest(stage_dir)
    if m is None or not m.get("complete") or force:
        return None
    if m.get("fingerprint") == fp and m.get("format_version") == FORMAT_VERSION:
        problem = listing_problem(stage_dir, m.get("files") or {})
        if problem:  # "up to date" only when the files the manifest vouches for are still the ones it describes
            log.warning("%s: %s in %s; rebuilding it", stage, problem, stage_dir)
            return None
        if run_dir is not None:
            for key in upstream or {}:
                up = read_manifest(_resolve(Path(run_dir), key)) or {}
                verify_chain(run_dir, key, up.get("stage", "upstream"))
        log.info("%s: up to date in %s, skipping", stage, stage_dir)
        return m
    inputs_changed = upstream is not None and m.get("upstream") != upstream
    if inputs_changed and _rebuild_stale.get():
        log.info("%s: its inputs changed since %s was made; rebuilding it", stage, stage_dir)
        return None
    if inputs_changed:
        was = m.get("upstream") or {}
        changed = sorted(k for k in set(upstream) | set(was) if upstream.get(k) != was.get(k))
        why = (f"was made from older inputs ({', '.join(changed)}: rerun or changed since; an input the stage "
               "prepares itself, like eval's ood split, changes with its options)")
    else:
        why = "was made with other settings"
    raise StageError(f"{stage_dir} already holds {stage} output that {why}. Rerun `{command} --force` to rebuild "
                     "it (and the stages after it), `mlpmem pipeline` to rebuild what is stale, or choose another "
                     "--out_dir")
