"""Typed values from YAML or command-line strings: coercion to a field's type and building nested dataclasses,
with errors that name the flag (``--train.lr: expected a number``); YAML files with ``include:``; flat option
names. No knowledge of mlpmem's own sections."""

from __future__ import annotations

import dataclasses
from dataclasses import field
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mlpmem.errors import ConfigError


def _coerce(value: Any, tp: Any, flag: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp``; raise ConfigError naming ``flag``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(value, args[0], flag)
    if value is None:  # YAML `null` / `~` for an option that has no "none" meaning
        raise ConfigError(f"--{flag}: a value is required (null is not allowed here)")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            if not value.strip():
                parsed = []
            elif value.strip().startswith("["):
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise ConfigError(f"--{flag}: cannot parse the list {value!r}") from None
            else:
                parsed = [v.strip() for v in value.split(",")]
            value = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"--{flag}: expected a list, got {value!r}")
        return [_coerce(v, item, flag) for v in value]
    if tp is dict or origin is dict:  # a free-form mapping (e.g. a sweep point's overrides)
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"--{flag}: cannot parse the mapping {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--{flag}: expected a mapping ({{option: value}}), got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"--{flag}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"--{flag}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        text = str(value).strip().replace("_", "")
        try:
            return int(text)  # exact, also for values beyond float precision
        except ValueError:
            pass
        try:
            f = float(text)  # "1e6", "1024.0"
        except ValueError:
            raise ConfigError(f"--{flag}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or not f.is_integer():
            raise ConfigError(f"--{flag}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"--{flag}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{flag}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # no option means inf, and nan would pass checks like `not x < 0`
            raise ConfigError(f"--{flag}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--{flag}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {tp} for {flag}")


def build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        flag = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"--{flag}: unknown option (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"--{flag}: expected a section (mapping), got {value!r}")
            kwargs[key] = build(tp, value, f"{flag}.")
        else:
            v = _coerce(value, tp, flag)
            choices = names[key].metadata.get("choices")
            if choices and v not in choices:
                raise ConfigError(f"--{flag}: must be one of {', '.join(map(str, choices))}, got {v!r}")
            kwargs[key] = v
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--{dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, sections merged key by key (lists and values replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a tree; ``include: other.yaml`` (relative to this file) is read first and this file's
    values go on top, so a study or a variant states only what differs from its preset."""
    if not p.is_file():
        where = f" (included from {seen[-1]})" if seen else ""
        raise ConfigError(f"--config: file {str(p)!r} not found{where}")
    if p.resolve() in seen:
        raise ConfigError(f"--config: {p} includes itself (through {' -> '.join(map(str, seen))})")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of sections")
    inc = loaded.pop("include", None)
    if inc is None:
        return loaded
    if not isinstance(inc, str):
        raise ConfigError(f"--config: {p}: include must name one YAML file, got {inc!r}")
    return _merge(read_yaml(p.parent / inc, seen + (p.resolve(),)), loaded)


def point_name(point: dict) -> str:
    """A point's canonical name: 'base' for {}, else its options sorted, 'memory.num_blocks=2,train.epochs=4'."""
    if not point:
        return "base"
    return ",".join(f"{k}={_short(v)}" for k, v in sorted(point.items()))


def _short(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return "+".join(map(_short, v))
    return str(v)


def flat_options(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.option": value} (the form load_config's overrides take)."""
    out = {}
    for k, val in d.items():
        if isinstance(val, dict):
            out.update(flat_options(val, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = val
    return out


def opt(default: Any, help: str, choices: tuple | None = None, **kw) -> Any:
    """A dataclass field with help text (and optional allowed values) for the CLI."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"--{flag}: {msg}")


# What other stages and commands write under --out_dir (the stage table's outputs, export, bench, compare and its
# variants' run directories): names that --eval.out_name and --sweep.name may not take (tests/test_integrity.py
# checks this list covers the stage table and compare's variants).
RUN_DIR_NAMES = ("data", "finetune", "datastore", "index", "targets", "memory", "joint", "qa", "export", "bench",
                 "compare", "vanilla", "full", "lora", "full-ce", "timings.json")
