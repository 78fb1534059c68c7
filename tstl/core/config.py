"""Typed configuration: dataclasses filled from YAML files and dotted command-line overrides.

Every component declares its own ``@dataclass`` next to the code it configures; a top-level config
nests them. This module turns plain data (YAML, ``key.sub=value`` strings) into those dataclasses
and back:

* unknown keys are errors (with a "did you mean" hint), so a typo never silently falls back to a
  default; a key a release retired (a class's ``RETIRED`` table: key -> why) is ignored with a
  warning, so older run configs load;
* values are checked against the field's type annotation (``int``, ``float``, ``bool``, ``str``,
  ``Path``, ``Optional``, ``Literal``, ``list``/``tuple``/``dict`` of those, nested dataclasses);
* ``__post_init__`` of each dataclass does value validation (ranges, cross-field rules of its
  section), on every layer, so an error names the file it came from;
* the top-level config's ``check()``, where it has one, holds the rules over the whole merged config
  (those needing several sections or another library, e.g. DeepSpeed's own parser): ``load_config``
  runs it once, after the last layer (torchtitan's ``ConfigManager.parse_args`` ->
  ``_validate_config``);
* every error names the source (file or ``command line``) and the dotted key.

Example::

    cfg = load_config(TrainConfig, ["configs/ucf101.yaml", "configs/model/bcast.yaml"],
                      ["optim.lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import logging
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

logger = logging.getLogger(__name__)
T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

__all__ = [
    "ConfigError",
    "KeyInfo",
    "check_choices",
    "describe_keys",
    "dump_yaml",
    "flatten",
    "format_keys",
    "from_dict",
    "load_cli_config",
    "load_config",
    "merge",
    "parse_overrides",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message says where and how to fix it."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where lossless (int -> float, str ->
    Path)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise fail(f"a mapping for {tp.__name__}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} items")
            return tuple(_convert(v, a, f"{key}[{i}]", source)
                         for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-3 (no dot) as a string; every user writes it that way
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise fail("a path")
        return Path(value)
    raise ConfigError(f"{source}: {key}: unsupported annotation {tp!r}")


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, typing.get_args(hints[f.name])) for f in dataclasses.fields(cls)
                 if typing.get_origin(hints[f.name]) is typing.Literal)


def check_choices(obj: Any, section: str) -> None:
    """Raise ``ValueError`` where a ``Literal`` field of config dataclass ``obj`` holds another
    value: for configs built in Python (``from_dict`` has checked every loaded value against its
    annotation already)."""
    for name, choices in _literal_fields(type(obj)):
        value = getattr(obj, name)
        if value not in choices:
            names = [str(c) for c in choices]
            allowed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
            raise ValueError(f"{section}.{name} must be {allowed}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "config",
              prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrongly typed values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    retired = getattr(cls, "RETIRED", {})
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key in retired and key not in fields:  # configs written by an older release still load
            logger.warning("%s: '%s' is ignored since %s", source, dotted, retired[key])
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = (f" (did you mean '{close[0]}'?)" if close
                    else f"; valid keys: {', '.join(sorted(fields))}")
            raise ConfigError(f"{source}: unknown key '{dotted}'{hint}")
        kwargs[key] = _convert(value, hints[key], dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML-safe) form of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def merge(base: dict, update: Mapping) -> dict:
    """Recursive dict merge; mappings merge key by key, everything else replaces."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b": value}``, one entry per leaf (lists, empty dicts stay values)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        nested = isinstance(v, dict) and v
        out.update(flatten(v, f"{prefix}{k}.") if nested else {f"{prefix}{k}": v})
    return out


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["optim.lr=3e-4", "data.views=[2,3]"]`` -> nested dict; values are parsed as YAML
    scalars/lists."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command line: '{item}' is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"command line: cannot parse the value of '{key}': {e}") from e
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: '{key}' overrides a value that is not a mapping")
        node[leaf] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def load_config(cls: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- each YAML file in order <- dotted overrides; validated at every layer,
    then the result's ``check()`` (if any) once.

    Each layer is validated on its own first, so an error names the file (or the command line) it
    came from.
    """
    data: dict = {}
    for f in files:
        layer = _read_yaml(Path(f))
        from_dict(cls, merge(data, layer), source=str(f))
        data = merge(data, layer)
    layer = parse_overrides(overrides)
    result = from_dict(cls, merge(data, layer), source="command line" if overrides else "config")
    check = getattr(result, "check", None)
    if callable(check):  # the whole-config rules, once
        try:
            check()
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            sources = ", ".join(str(f) for f in files) or "defaults"
            raise ConfigError(f"{sources}{' + command line' if overrides else ''}: {e}") from e
    return result


def load_cli_config(cls: type[T], words: Sequence[str | Path], overrides: Sequence[str] = ()) -> T:
    """``load_config`` for a command line: ``key=value`` words among the ``--config`` files count as
    overrides (``--config a.yaml b.yaml optim.lr=1e-4`` is what people type)."""
    words = [str(w) for w in words]
    return load_config(cls, [w for w in words if "=" not in w],
                       [w for w in words if "=" in w] + list(overrides))


def dump_yaml(obj: Any, path: str | Path | None = None) -> str:
    """YAML text of a config dataclass; also written to ``path`` when given."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """One config key as ``describe_keys`` lists it."""

    key: str
    type: str
    default: Any
    doc: str


def type_text(tp: Any) -> str:
    """A type annotation as a user reads it: ``segment|dense``, ``list[int]``, ``[float, float]``,
    ``str or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin in (list, tuple, Sequence) and args:
        return f"list[{type_text(args[0])}]"
    if origin in (dict, Mapping) and len(args) == 2:
        return f"mapping of {type_text(args[1])}"
    return {Path: "path", typing.Any: "any"}.get(tp, _type_name(tp))


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of ``cls`` and its dataclass
    bases."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            # no source (e.g. a frozen app): keys are still listed, without docs
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_keys(cls: type, prefix: str = "") -> list[KeyInfo]:
    """Every key of config dataclass ``cls`` (nested sections flattened to dotted keys) with its
    type, default and docstring, in declaration order: what ``--help-config`` prints."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out: list[KeyInfo] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe_keys(tp, prefix=f"{key}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(KeyInfo(key, type_text(tp), to_dict(default), docs.get(f.name, "")))
    return out


def format_keys(cls: type) -> str:
    """``describe_keys`` as text: one block per key (``key: type = default`` then the wrapped
    docstring)."""
    import textwrap

    lines = []
    for k in describe_keys(cls):
        default = (yaml.safe_dump(k.default, default_flow_style=True, width=1000).strip()
                   .removesuffix("...").strip())
        lines.append(f"{k.key}: {k.type} = {default}")
        if k.doc:
            lines += textwrap.wrap(k.doc, width=100, initial_indent="    ",
                                   subsequent_indent="    ")
    return "\n".join(lines)
