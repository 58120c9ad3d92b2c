"""Pipeline options from config ``[pipelines.<name>]``: a mapping into a frozen dataclass.

Every pipeline declares its options as a frozen dataclass (the defaults live there) and builds
it with :func:`parse_options`, which refuses unknown keys and values of the wrong type with a
``ValueError`` naming the key as ``pipelines.<name>.<key>`` (what ``prognode config check``
prints).  Values are coerced by the field's annotation:

- ``bool``: true/false only; ``int``: an integer (not a bool); ``float``: a finite number;
- ``str``: a text;
- ``tuple[X, ...]``: a list (or a single value) of X; ``tuple[X, Y]``: a list of exactly that length;
- anything else (mappings, unions, ...) is passed through for the pipeline to check.

Checks between fields (a range, a known name) stay in the pipeline, after parsing.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["coerce", "parse_options", "reject_unknown"]


def reject_unknown(options: Mapping[str, Any], known: typing.Iterable[str], section: str) -> None:
    """``ValueError`` ``pipelines.<section>.<key>: unknown option (known: ...)`` for the first unknown key."""
    names = sorted(known)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"pipelines.{section}.{unknown[0]}: unknown option (known: {', '.join(names)})")


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to ``annotation`` (see the module's list); ``where`` names it in errors."""
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a text, got {value!r}")
        return value
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        items = list(value) if isinstance(value, list | tuple) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args, strict=True)))
    return value


def parse_options(cls: type[T], options: Mapping[str, Any], section: str) -> T:
    """Build the frozen dataclass ``cls`` from ``options`` (config ``[pipelines.<section>]``).

    Keys left out take the dataclass's defaults; a field without a default is required.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(options, fields, section)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        kwargs[key] = coerce(raw, hints.get(key, Any), f"pipelines.{section}.{key}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"pipelines.{section}.{name}: required")
    return cls(**kwargs)

