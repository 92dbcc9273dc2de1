"""TOML tables → dataclasses, checked against the fields' type hints with one-line errors.

Shared by the run config, site profiles and compressor hyper-parameters: a dataclass's fields
(names, type hints, defaults) are the schema, written once, next to what they configure.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal

from hpctrain.errors import UserError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly convert) one value against a field's type hint."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: [{key}] must be a table, got {value!r}")
        return build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"config: {key} = {value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config: {key} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a table, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise UserError(f"config: {key} must be {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type, table: dict[str, Any], prefix: str = "") -> Any:
    """A `cls` instance from a TOML table: unknown keys (with the closest valid one), wrong types
    and values outside a Literal's choices are one-line UserErrors naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"[{prefix}]" if prefix else "the top level"
            raise UserError(f"config: unknown key {full!r}{hint}; valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except UserError as exc:          # the dataclass's own checks (`__post_init__`): name the table
        if not prefix:
            raise
        raise UserError(f"config: [{prefix}] {exc}") from None
