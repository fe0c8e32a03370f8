"""Build typed frozen-dataclass configs from plain mappings (YAML / JSON), recursively.

One strict converter for every config class: unknown keys raise with the known ones, values
are checked against the field types, lists become tuples. A typo must never be silently
ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from .errors import ConfigError
from .validate import check_bool, check_int, check_number


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping of keys, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"known keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        section = where.rstrip(".")
        if not section or str(e).startswith(section):
            raise
        raise type(e)(f"{section}: {e}") from None  # which section of the config is wrong


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # `model:` with nothing under it: YAML reads null, which must not mean "the defaults"
            raise ConfigError(
                f"{where} is empty (null): write its keys under it (e.g. {where}: {{{dataclasses.fields(tp)[0].name}: ...}}), "
                "or delete the line to use its defaults"
            )
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(opt, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(item, v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, where): _coerce(vt, v, where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 as a string
        except ValueError:
            pass
    if tp is bool:
        return check_bool(value, where)
    if tp is int:
        return check_int(value, where)
    if tp is float:
        return check_number(value, where)  # an int was made a float above; a bool is refused
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value
