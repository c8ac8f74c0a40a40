"""Strict typed sections: build keyword-only dataclasses from YAML mappings, naming the key of any error.

An unknown key, a missing required key, a wrong type or a value outside a literal's choices
raises a ConfigError naming the key path (``training.learning_rate``); a float key takes finite
numbers only (no .inf or .nan). After building, a section's own `validate(path)` checks its
values; `positive` / `non_negative` / `in_range` serve those. `load_yaml` reads YAML that
writes no key twice.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import yaml

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
        if not math.isfinite(value):  # YAML's .inf / .nan would train NaN weights
            raise ConfigError(f"{path}: expected a finite number, got {value}")
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


def check_seeds(path: str, key: str, seeds: list[int]) -> None:
    """Seeds lie in [0, 2**32): torch's generators refuse larger ones, and derived seeds must not overflow."""
    for seed in seeds:
        if not 0 <= seed < 2**32:
            raise ConfigError(f"{path}.{key}: a seed must be in [0, 2**32), got {seed}")


def in_range(obj: Any, path: str, key: str, low: float, high: float, *, low_open: bool = False) -> None:
    """`key` lies in [low, high] (or (low, high] with low_open); unset passes."""
    value = getattr(obj, key)
    above = value > low if low_open else value >= low
    if value is not None and not (above and value <= high):  # `not` also rejects NaN
        raise ConfigError(f"{path}.{key}: must be in {'(' if low_open else '['}{low}, {high}], got {value}")


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML read from `source` (a file, or a `--set` value); a mapping that writes a key twice is
    an error naming the key path and both lines (PyYAML alone keeps the last one silently)."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as err:  # a character YAML does not allow (binary data)
        raise ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", source)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: str, source: str) -> None:
    """Walk the composed document; keys merged in with `<<` may be overridden, as YAML intends."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", source)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = f"on line {line}" if seen[key] == line else f"on lines {seen[key]} and {line}"
                raise ConfigError(f"{source}: {key} is written twice, {where} (YAML would keep the last "
                                  f"silently); keep one")
            seen[key] = line
            _refuse_duplicate_keys(value_node, key, source)
