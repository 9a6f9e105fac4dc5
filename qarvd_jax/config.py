"""Typed dataclass configs from YAML files plus ``key=value`` overrides.

    cfg = load_config(QARVDConfig, "configs/qarvd_w4a8.yaml", ["w_bits=8", "outlier_method=iqr"])

Values are parsed with YAML syntax (``8``, ``true``, ``[0.999, 0.9999]``) and checked against the
field's annotated type; an unknown key or a value of the wrong type is an error naming the field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml

from qarvd_jax.errors import ConfigError

__all__ = ["load_config", "parse_overrides", "config_to_dict"]

T = TypeVar("T")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b=[1, 2]"]`` -> ``{"a": 1, "b": [1, 2]}`` (YAML-parsed values)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return out


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def _coerce(cls, name: str, tp, value):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(cls, name, a, value)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ConfigError(f"{cls.__name__}.{name}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{cls.__name__}.{name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{name}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return origin(_coerce(cls, name, elem, v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{cls.__name__}.{name}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads exponent floats without a dot (1e-3) as strings
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{cls.__name__}.{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{cls.__name__}.{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{cls.__name__}.{name}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{cls.__name__}.{name}: expected a mapping for {tp.__name__}")
        return _build(tp, value)
    return value


def _build(cls: type[T], values: dict[str, Any], origin: dict[str, str] | None = None) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in values.items():
        try:
            kwargs[k] = _coerce(cls, k, hints[k], v)
        except ConfigError as e:
            if origin and k in origin:
                raise ConfigError(f"{origin[k]}: {e}") from None
            raise
    return cls(**kwargs)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Instantiate dataclass ``cls`` from an optional YAML file, then ``key=value`` overrides."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path:
        if os.path.isdir(path):
            raise ConfigError(f"--config {path} is a folder; give a YAML file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (UTF-8) YAML file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of field: value")
        values.update(loaded)
        origin.update({str(k): f"{path} field {k}" for k in loaded})
    parsed = parse_overrides(overrides)
    values.update(parsed)
    origin.update({k: f"override {k}={v!r}" for k, v in parsed.items()})
    return _build(cls, values, origin)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
