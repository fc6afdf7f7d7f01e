"""Experiment configs: frozen dataclasses, registered by name, overridden from the command line.

In the spirit of Lingvo's registry without its boilerplate: a config is a frozen, typed dataclass; a
*registered* config is a named, zero-argument factory returning one, attached to the command it configures
(``run crowd-labels``, ``train ctr``). Names are unique across the project; registering a name twice is an
error, so two experiments can never silently shadow each other.

Overrides are ``dotted.key=value`` strings (``--set optimizer.learning_rate=0.01``). Values are parsed
against the field's declared type (int, float, bool, str, Optional, Literal, tuples, nested dataclasses),
so a typo fails at the command line with the field's name and type, never deep inside a pipeline.
Every run writes the resolved config (all fields, defaults included) next to its outputs with `dump`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from headrace.core.errors import ConfigError

__all__ = [
    "Registered",
    "apply_overrides",
    "dump",
    "dumps",
    "from_dict",
    "get",
    "lookup",
    "override",
    "parse_value",
    "register",
    "registered",
    "to_dict",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Registered:
    """A named config factory and the command (``run example``, ``train mlp``) it belongs to."""

    name: str
    command: str
    factory: Callable[[], Any]
    description: str


_REGISTRY: dict[str, Registered] = {}


def register(name: str, *, command: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
    """Registers a zero-argument factory returning a frozen dataclass under `name`.

    The factory's docstring (first line) is the description shown by ``headrace configs list``.
    """

    def decorator(factory: Callable[[], T]) -> Callable[[], T]:
        if name in _REGISTRY:
            existing = _REGISTRY[name].factory
            raise ValueError(
                f"config {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; config names must be unique"
            )
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Registered(name, command, factory, doc[0] if doc else "")
        return factory

    return decorator


def registered(command: str | None = None) -> list[Registered]:
    """All registered configs (of one command if given), sorted by name."""
    return sorted(
        (r for r in _REGISTRY.values() if command is None or r.command == command),
        key=lambda r: r.name,
    )


def lookup(name: str) -> Registered:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ConfigError(f"unknown config {name!r} (registered: {known})")
    return _REGISTRY[name]


def get(name: str) -> Any:
    """A fresh instance of the config registered as `name`."""
    config = lookup(name).factory()
    if not (dataclasses.is_dataclass(config) and type(config).__dataclass_params__.frozen):
        raise TypeError(f"config {name!r} must be a frozen dataclass, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"tuple of {inner} (comma-separated)"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def parse_value(text: str, tp: Any, *, key: str = "value") -> Any:
    """Parses the command-line string `text` as a value of type `tp`; raises ConfigError naming `key`."""

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{key} {text!r}: expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the informative one
            return parse_value(text, options[0], key=key)
        for arg in options:
            try:
                return parse_value(text, arg, key=key)
            except ConfigError:
                continue
        fail()
    if origin is typing.Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        fail()
    if origin is tuple:
        args = typing.get_args(tp)
        items = [s.strip() for s in text.split(",")] if text.strip() else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(s, args[0], key=key) for s in items)
        if len(items) != len(args):
            raise ConfigError(f"{key} {text!r}: expected {len(args)} comma-separated values")
        return tuple(parse_value(s, a, key=key) for s, a in zip(items, args))
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        fail()
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            fail()
    if tp is float:
        try:
            return float(text)
        except ValueError:
            fail()
    if tp is str:
        return text
    if tp is Any:
        return text
    raise ConfigError(f"{key}: fields of type {_type_name(tp)} cannot be set from the command line")


def override(config: T, key: str, value: Any, *, label: str | None = None) -> T:
    """Returns a copy of `config` with the dotted `key` set; string values are parsed to the field type.

    `label` is how errors name the setting (``--shards``); by default the dotted key.
    """
    head, _, rest = key.partition(".")
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"cannot set {key!r}: not a config")
    names = [f.name for f in dataclasses.fields(config)]
    if head not in names:
        raise ConfigError(
            f"unknown config field {head!r} in {type(config).__name__} (fields: {', '.join(names)})"
        )
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"cannot set {key!r}: {head!r} is not a nested config")
        new = override(current, rest, value, label=label or key)
    else:
        tp = _field_types(type(config))[head]
        if dataclasses.is_dataclass(current) and not isinstance(value, type(current)):
            raise ConfigError(f"{key} is a nested config; set its fields as {key}.FIELD=VALUE")
        new = parse_value(value, tp, key=label or key) if isinstance(value, str) else value
    return dataclasses.replace(config, **{head: new})


def apply_overrides(config: T, overrides: Iterable[str]) -> T:
    """Applies ``key=value`` strings in order."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        config = override(config, key.strip(), value, label=f"--set {key.strip()}")
    return config


# ---------------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """All fields of `config` (nested configs as dicts, tuples as lists): what JSON can hold."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        return value

    return convert(config)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuilds a config of type `cls` from `to_dict` output (for --resume and tests)."""
    hints = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def dumps(config: Any, *, extra: Mapping[str, Any] | None = None) -> str:
    """The resolved config (type name, all fields, and optional run facts) as JSON text."""
    body = {"config_class": f"{type(config).__module__}.{type(config).__qualname__}"}
    body.update(to_dict(config))
    if extra:
        body["run"] = dict(extra)
    return json.dumps(body, indent=2) + "\n"


def dump(config: Any, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> None:
    """Writes `dumps(config)` to a local `path`."""
    Path(path).write_text(dumps(config, extra=extra))
