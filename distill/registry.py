"""Registries of training methods and model plugins, looked up by the names a config uses.

Adding a method or a model family is one new module that calls `register_method` or
`register_model` at import; `distill.methods` and `distill.models` import their modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    config_cls: type


_METHODS: dict[str, MethodSpec] = {}
_MODELS: dict[str, type] = {}


def register_method(name: str, config_cls: type):
    """Class decorator: make a DistillMethod available as `method: <name>`."""

    def wrap(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodSpec(name, cls, config_cls)
        cls.name = name
        return cls

    return wrap


def register_model(name: str):
    """Class decorator: make a model plugin available as `model.family: <name>`."""

    def wrap(cls: type) -> type:
        if name in _MODELS:
            raise ValueError(f"model family {name!r} is registered twice")
        _MODELS[name] = cls
        return cls

    return wrap


def get_method(name: str, key: str = "method") -> MethodSpec:
    importlib.import_module("distill.methods")
    if name not in _METHODS:
        raise _unknown(key, name, _METHODS)
    return _METHODS[name]


def get_model(name: str, key: str = "model.family") -> type:
    # Model plugins import diffusers; the config check only needs the names.
    importlib.import_module("distill.models")
    if name not in _MODELS:
        raise _unknown(key, name, _MODELS)
    return _MODELS[name]


def _unknown(key: str, name: str, table: dict[str, Any]) -> Exception:
    from distill.config import ConfigError

    return ConfigError(f"{key}: unknown name {name!r}; registered: {', '.join(sorted(table)) or 'none'}")
