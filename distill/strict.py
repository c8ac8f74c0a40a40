"""Strict typed sections: build keyword-only dataclasses from YAML mappings, naming the key of any error.

An unknown key, a missing required key, a wrong type or a value outside a literal's choices
raises a ConfigError naming the key path (``training.learning_rate``); after building, a
section's own `validate(path)` checks its values. `positive` / `non_negative` serve those.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from distill.errors import ConfigError

_FLOAT_STR = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is ambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept plain numeric strings for floats.
        if isinstance(value, str) and _FLOAT_STR.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = args
        return {_convert(k, key_tp, path): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def build_section(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and missing required ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def positive(obj: Any, path: str, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and not value > 0:  # `not >` also rejects NaN
            raise ConfigError(f"{path}.{key}: must be > 0, got {value}")


def non_negative(obj: Any, path: str, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and not value >= 0:  # `not >=` also rejects NaN
            raise ConfigError(f"{path}.{key}: must be >= 0, got {value}")
