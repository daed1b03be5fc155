"""Typed configuration: YAML -> dataclasses that reject unknown keys and wrong types.

Every config in MedTranslate (method architectures, training runs, bundle metadata) is a
dataclass. ``from_dict`` turns a plain mapping (usually from ``load_yaml``) into one, checking
each key against the dataclass fields and each value against the field's type hint, and fails
with one line that names the dotted key and the file::

    unknown key 'model.generator.ngff' in train.yaml; valid keys: ngf, num_downs, norm, dropout (did you mean 'ngf'?)
    'optim.lr' in train.yaml: expected float, got 'abc'

Supported field types: bool, int, float (ints and numeric strings such as "1e-4" accepted,
since YAML 1.1 reads ``1e-4`` as a string), str, pathlib.Path, Any, Literal[...], Optional / X | None,
unions (first matching member wins), list[X], tuple[X, ...], tuple[X, Y], dict[str, X],
and nested dataclasses.

YAML is read with ``yaml.SafeLoader`` (tags stay inert: only plain YAML types are built, never
Python objects), guarded while the document is composed, before anything is built: a document
may not expand to more than ``MAX_YAML_NODES`` nodes (an alias counts as the whole subtree it
repeats, so "billion laughs" anchors are refused in a few milliseconds instead of hanging whoever
walks the result), may not nest deeper than ``MAX_YAML_DEPTH`` levels, nor hold a recursive alias;
``parse_yaml(..., aliases=False)`` refuses aliases altogether (bundle metadata: ``save_bundle``
never writes any).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = ["load_yaml", "parse_yaml", "safe_load", "from_dict", "to_dict", "apply_overrides", "dump_yaml", "MAX_YAML_NODES",
           "MAX_YAML_DEPTH"]

#: Most nodes a YAML document may expand to, aliases expanded (an alias counts as every node of
#: what it repeats). Real configs and bundle metadata have a few hundred to a few thousand; a
#: million is still walked in about a second, while nine levels of ten aliases make 10**9.
MAX_YAML_NODES = 1_000_000
#: Deepest nesting of YAML collections: configs nest a few levels; the YAML composer and
#: ``to_dict`` recurse once per level, so a deeper document would end in a RecursionError.
MAX_YAML_DEPTH = 100


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``parse_yaml`` (safe loading, guarded). An empty file gives ``{}``.

    Raises ValueError("<file>: <problem>") when the file is missing, unreadable, not valid YAML,
    or its top level is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    return parse_yaml(text, where=str(path))


class _GuardedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts nodes as they are composed, aliases expanded, and refuses
    (a ``ComposerError`` at the offending node) what the module docstring lists."""

    def __init__(self, stream: str, *, aliases: bool = True) -> None:
        super().__init__(stream)
        self._aliases = aliases
        self._nodes = 0  # nodes composed so far, aliases expanded
        self._depth = 0
        self._expanded: dict[str, int] = {}  # anchor -> nodes of its (finished) subtree

    def _refuse(self, problem: str, mark: Any) -> None:
        raise yaml.composer.ComposerError(None, None, problem, mark)

    def _count(self, nodes: int, mark: Any) -> None:
        self._nodes += nodes
        if self._nodes > MAX_YAML_NODES:
            self._refuse(f"expands to more than {MAX_YAML_NODES} nodes (aliases repeating aliases?)", mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if not self._aliases:
                self._refuse(f"alias *{event.anchor}: anchors and aliases are not allowed in this file", event.start_mark)
            if event.anchor in self.anchors and event.anchor not in self._expanded:
                self._refuse(f"alias *{event.anchor} refers to a node that contains it (recursive)", event.start_mark)
            self._count(self._expanded.get(event.anchor, 0), event.start_mark)
            return super().compose_node(parent, index)  # an undefined alias is refused there
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        before = self._nodes
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if event.anchor is not None:
            self._expanded[event.anchor] = self._nodes - before
        return node


def safe_load(text: str, *, aliases: bool = True) -> Any:
    """``yaml.safe_load`` with the guards of ``_GuardedLoader`` (raises ``yaml.YAMLError``)."""
    loader = _GuardedLoader(text, aliases=aliases)
    try:
        return loader.get_single_data()
    except RecursionError:  # a guard should come first; never let the interpreter's limit through
        raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels") from None
    finally:
        loader.dispose()


def parse_yaml(text: str, *, where: str = "config", aliases: bool = True) -> dict:
    """YAML ``text`` (read with ``safe_load``) that must be a mapping (or empty); errors name
    ``where``. ``aliases=False`` refuses anchors' aliases (``*name``) altogether."""
    try:
        data = safe_load(text, aliases=aliases)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: invalid YAML ({_one_line_yaml_error(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of keys to values at the top level, "
                         f"got {type(data).__name__}")
    return data


def _one_line_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    text = " ".join(str(problem).split())
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return text


def dump_yaml(data: Any) -> str:
    """YAML text of ``to_dict(data)`` in field order (what bundles and run folders write)."""
    return yaml.safe_dump(to_dict(data), sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# dict -> dataclass
# --------------------------------------------------------------------------------------------

def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursively, validating keys and value types.

    ``where`` names the source in messages (usually the YAML file); ``prefix`` is the dotted path
    of ``data`` inside that source (e.g. ``"model"`` when ``data`` is the ``model:`` section of a
    training config), so that messages name the full key such as ``model.generator.ngf``.
    Raises ValueError with a one-line message on unknown keys, missing required keys and values
    of the wrong type.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    return _convert_dataclass(cls, data, where, prefix)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert_dataclass(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, Mapping):
        label = f"'{path}'" if path else "the top level"
        raise ValueError(f"{label} in {where}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if not isinstance(key, str) or key not in fields:
            valid = ", ".join(fields) or "(none)"
            hint = ""
            if isinstance(key, str):
                close = difflib.get_close_matches(key, list(fields), n=1)
                if close:
                    hint = f" (did you mean '{close[0]}'?)"
            raise ValueError(f"unknown key '{_key(path, str(key))}' in {where}; valid keys: {valid}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], where, _key(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing key '{_key(path, name)}' in {where}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        label = f"'{path}'" if path else "config"
        raise ValueError(f"{label} in {where}: {exc}") from None


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _WrongType(ValueError):
    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def _wrong(tp: Any, value: Any, where: str, path: str) -> ValueError:
    return _WrongType(f"'{path}' in {where}: expected {_type_name(tp)}, got {_show(value)}", path)


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(tp, value, where, path)
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            try:
                return _convert(members[0], value, where, path)
            except _WrongType as exc:  # "expected X" -> "expected X or null" for this very key
                if exc.path == path:
                    raise _wrong(tp, value, where, path) from None
                raise
        for member in members:  # first member that accepts the value
            try:
                return _convert(member, value, where, path)
            except ValueError:
                continue
        raise _wrong(tp, value, where, path)

    if origin is Literal:
        for choice in args:  # exact type match so that True does not pass for 1
            if type(choice) is type(value) and choice == value:
                return value
        raise _wrong(tp, value, where, path)

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, value, where, path)

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(tp, value, where, path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _wrong(tp, value, where, path)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise _wrong(tp, value, where, path) from None
            if not math.isnan(number):
                return number
        raise _wrong(tp, value, where, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(tp, value, where, path)
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise _wrong(tp, value, where, path)

    if origin is list or tp is list:
        if not isinstance(value, list | tuple):
            raise _wrong(tp, value, where, path)
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise _wrong(tp, value, where, path)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            return tuple(_convert(item_tp, v, where, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"'{path}' in {where}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, where, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value,
                                                                                            strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong(tp, value, where, path)
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                raise ValueError(f"'{path}' in {where}: keys must be strings, got {_show(k)}")
            out[k] = _convert(val_tp, v, where, _key(path, str(k)))
        return out

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _wrong(tp, value, where, path)
    raise TypeError(f"from_dict: unsupported field type {tp!r} for '{path}'")


# --------------------------------------------------------------------------------------------
# dataclass -> dict
# --------------------------------------------------------------------------------------------

def to_dict(obj: Any) -> Any:
    """Plain, YAML-serialisable form of a dataclass (or of any nested value).

    Dataclasses become dicts in field order, tuples become lists, Paths strings, numpy / torch
    scalars and arrays Python numbers and lists.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {to_dict(k) if not isinstance(k, str) else k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    tolist = getattr(obj, "tolist", None)  # numpy / torch scalars and arrays
    if callable(tolist):
        return to_dict(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    return str(obj)


# --------------------------------------------------------------------------------------------
# command-line overrides
# --------------------------------------------------------------------------------------------

def apply_overrides(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...] | None) -> dict:
    """Return a copy of ``data`` with ``"a.b.c=VALUE"`` items applied (VALUE parsed as YAML).

    ``train.max_steps=5`` sets an int, ``optim.betas=[0.5,0.99]`` a list, ``data.roi=null`` None,
    ``x.name=abc`` a string. Missing intermediate mappings are created; unknown keys are caught
    later by ``from_dict``.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override '{item}' must look like key.path=value (e.g. train.max_steps=5)")
        try:
            value = safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ValueError(f"override '{item}': value is not valid YAML ({_one_line_yaml_error(exc)})") from None
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ValueError(f"override '{item}': '{where}' is {_show(child)}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out
