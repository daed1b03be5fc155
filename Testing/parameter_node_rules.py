"""A test double of Slicer's ``parameterNodeWrapper`` that enforces its serializer rules.

slicer-core (PyPI) has real MRML but not ``slicer.parameterNodeWrapper``, which lives in the
Slicer application (``Base/Python/slicer/parameterNodeWrapper/serializers.py``). Replacing the
decorator with ``lambda cls: cls`` accepted anything and hid a parameter node that cannot be
created in any Slicer release. This double checks, when the class is decorated, what the real
serializers check when the wrapper is instantiated:

- str / bool / int / float: the default is not None and is an instance of the type (NotNone,
  IsInstance); ``Annotated[T, WithinRange(lo, hi)]``: the default lies in the range.
- an MRML node class: the default is None or a node of that class (IsInstance only).
- ``typing.Union[...]``: every member is serializable; the default is the first member's default
  (None for a node), unless the Union is exactly ``Union[X, None]`` (then None); writing that
  default needs a member that can serialize its type, so a Union of nodes without ``None`` fails
  with the real wrapper's ``TypeError: Unable to write value 'None' of type ...``.
- PEP 604 unions (``A | B``) are ``types.UnionType``, which Slicer's UnionSerializer only accepts
  from 5.10 on (it checks ``typing.get_origin(t) == typing.Union``): refused, so the module also
  works on the lowest Slicer it supports without relying on that.
"""

from __future__ import annotations

import types
import typing

import slicer


class WithinRange:
    def __init__(self, low, high) -> None:
        self.low, self.high = low, high

    def check(self, value) -> None:
        if not self.low <= value <= self.high:
            raise ValueError(f"value {value!r} is not within [{self.low}, {self.high}]")


_NO_DEFAULT = object()


def _split(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, [e for e in extras if isinstance(e, WithinRange)]
    return annotation, []


def _is_node(t) -> bool:
    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


def _serializer_default(t):
    """The value the real serializer of ``t`` defaults to; TypeError when ``t`` has none."""
    if t in (str,):
        return ""
    if t is bool:
        return False
    if t in (int, float):
        return t(0)
    if t is type(None) or _is_node(t):
        return None
    if isinstance(t, types.UnionType):
        raise TypeError(f"PEP 604 union {t} needs Slicer >= 5.10; use typing.Union[..., None]")
    if typing.get_origin(t) is typing.Union:
        members = typing.get_args(t)
        for m in members:
            _serializer_default(_split(m)[0])  # every member must be serializable
        if len(members) == 2 and members[1] is type(None):
            return None
        return _serializer_default(_split(members[0])[0])
    raise TypeError(f"no parameter-node serializer for {t!r}")


def _can_write(t, value, in_union: bool = False) -> bool:
    if typing.get_origin(t) is typing.Union:
        # UnionSerializer picks a member by ``canSerialize(type(value))``: a node member cannot
        # take None (NodeSerializer.canSerialize(NoneType) is False), only a NoneType member can
        return any(_can_write(_split(m)[0], value, in_union=True) for m in typing.get_args(t))
    if t is type(None):
        return value is None
    if _is_node(t):
        return isinstance(value, t) or (value is None and not in_union)
    return value is not None and isinstance(value, t) and not (t is int and isinstance(value, bool))


def check_parameter_class(cls) -> list[str]:
    """Problems the real wrapper would raise for ``cls`` (empty when it would accept it)."""
    problems = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, annotation in hints.items():
        base, validators = _split(annotation)
        try:
            default = cls.__dict__.get(name, _NO_DEFAULT)
            if default is _NO_DEFAULT:
                default = _serializer_default(base)
            else:
                _serializer_default(base)
            if not _can_write(base, default):
                raise TypeError(f"Unable to write value '{default}' of type '{type(default)}'")
            for v in validators:
                v.check(default)
        except (TypeError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
    return problems


def parameterNodeWrapper(cls):  # noqa: N802 - Slicer's name
    problems = check_parameter_class(cls)
    if problems:
        raise TypeError(f"{cls.__name__}: " + "; ".join(problems))
    return cls
