"""Registries of training methods and model families, looked up by the names a config uses.

Plain dicts of name → spec; the registry imports no plugin. A method registers itself with
`@register_method` in its own module; a model family registers with `register_model`, either
on its class or, for a family whose module imports a model library, by the module's path (so
that loading a config never imports diffusers). The built-in ones are listed in
`distill/methods/__init__.py` and `distill/models/__init__.py`, imported by `build_config`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from distill.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    """The DistillMethod subclass."""
    config_cls: type
    """The dataclass that types `method_config`."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    target: type | str
    """The ModelPlugin subclass, or "package.module:Class", imported on first `load()`."""
    num_train_timesteps: int
    """T of the family's noise schedule: what config checks of timesteps need, without loading the plugin."""
    presets: tuple[str, ...] | None = None
    """Names of the family's in-code presets (`model.preset`), checked when a config loads; None = the
    plugin checks them when it is built."""
    attention_backends: tuple[str, ...] = ()
    """Names `model.attention_backend` takes, checked when a config loads; empty = the family has no choice."""

    def load(self) -> type:
        if isinstance(self.target, type):
            return self.target
        module, _, name = self.target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if cls.num_train_timesteps != self.num_train_timesteps:
            raise TypeError(f"model family {self.name!r}: {self.target} has num_train_timesteps "
                            f"{cls.num_train_timesteps}, its registration says {self.num_train_timesteps}")
        if self.presets is not None and tuple(cls.presets) != self.presets:
            raise TypeError(f"model family {self.name!r}: {self.target} has presets {tuple(cls.presets)}, "
                            f"its registration says {self.presets}")
        return cls

    def check_preset(self, preset: str | None, key: str = "model.preset") -> None:
        if preset is not None and self.presets is not None and preset not in self.presets:
            raise ConfigError(f"{key}: unknown preset {preset!r} of family {self.name!r}; known: {', '.join(self.presets)}")

    def check_attention_backend(self, name: str | None, key: str = "model.attention_backend") -> None:
        if name is not None and name not in self.attention_backends:
            known = ", ".join(self.attention_backends) or "none (the family has no choice of attention)"
            raise ConfigError(f"{key}: unknown attention backend {name!r} of family {self.name!r}; known: {known}")


_METHODS: dict[str, MethodSpec] = {}
_MODELS: dict[str, ModelSpec] = {}


def register_method(name: str, config_cls: type):
    """Class decorator: make a DistillMethod available as `method: <name>`."""

    def wrap(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodSpec(name, cls, config_cls)
        cls.name = name
        return cls

    return wrap


def register_model(name: str, target: str | None = None, *, num_train_timesteps: int | None = None,
                   presets: tuple[str, ...] | None = None, attention_backends: tuple[str, ...] = ()):
    """Make a model plugin available as `model.family: <name>`.

    As a class decorator (`@register_model("points")`), or as a line naming the class by path
    (`register_model("wan", "distill.models.wan:WanPlugin", num_train_timesteps=1000, presets=(...))`).
    """

    def add(spec_target: type | str, timesteps: int, names: tuple[str, ...] | None) -> None:
        if name in _MODELS:
            raise ValueError(f"model family {name!r} is registered twice")
        _MODELS[name] = ModelSpec(name, spec_target, timesteps, names, tuple(attention_backends))

    if target is not None:
        if num_train_timesteps is None:
            raise ValueError(f"register_model({name!r}, {target!r}): give num_train_timesteps")
        add(target, num_train_timesteps, presets)
        return None

    def wrap(cls: type) -> type:
        names = getattr(cls, "presets", None)
        add(cls, cls.num_train_timesteps, None if names is None else tuple(names))
        return cls

    return wrap


def get_method(name: str, key: str = "method") -> MethodSpec:
    if name not in _METHODS:
        raise _unknown(key, name, _METHODS)
    return _METHODS[name]


def model_spec(name: str, key: str = "model.family") -> ModelSpec:
    if name not in _MODELS:
        raise _unknown(key, name, _MODELS)
    return _MODELS[name]


def get_model(name: str, key: str = "model.family") -> type:
    """The plugin class of a family (imports its module, and so its model library)."""
    return model_spec(name, key).load()


def _unknown(key: str, name: str, table: dict[str, Any]) -> ConfigError:
    return ConfigError(f"{key}: unknown name {name!r}; registered: {', '.join(sorted(table)) or 'none'}")
