"""Typed dataclass configs <-> JSON, validated field by field, and `--set key=value` overrides.

Configs are loaded from files users may have edited (or that may be hostile), so nothing here
evaluates code: values are parsed as JSON and checked against the dataclass's annotations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import GenbenchError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    """Check `value` (from JSON) against annotation `tp`; return it converted (lists -> tuples etc.)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except GenbenchError as e:
                errors.append(str(e))
        raise GenbenchError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise GenbenchError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise GenbenchError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise GenbenchError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GenbenchError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise GenbenchError(f"{where}: {str(value)[:20]}... is too large for a number") from None
        if not math.isfinite(value):
            raise GenbenchError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise GenbenchError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise GenbenchError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise GenbenchError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise GenbenchError(f"{where}: expected a list, got {value!r}")
        (arg,) = get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise GenbenchError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    raise GenbenchError(f"{where}: unsupported config type {_type_name(tp)}")


def from_dict(cls, data: Any, where: str | None = None):
    """Build dataclass `cls` from a JSON-like dict: unknown keys, wrong types and invalid values
    are refused with a message naming the field. Calls `validate()` when the class has one; a class
    whose fields were renamed maps the old names first in a static `upgrade_fields(dict) -> dict`."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise GenbenchError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    upgrade = getattr(cls, "upgrade_fields", None)  # configs saved by an older genbench: renamed fields
    if callable(upgrade):
        data = upgrade(dict(data))
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise GenbenchError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj) -> dict:
    """dataclass -> JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; `override` wins."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """Parse one `--set key=value`: value as JSON (numbers, true/false, lists), else a string."""
    if "=" not in item:
        raise GenbenchError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise GenbenchError(f"--set {item!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_sets(sections: dict[str, tuple[type, dict]], sets: typing.Iterable[str]) -> None:
    """Apply `--set` items to `sections` = {"model": (ModelConfig, dict), "train": (TrainConfig, dict)}.

    A bare key (no section) goes to the one section that has such a field; ambiguous or unknown keys
    are refused with the valid names. Values are type-checked later by `from_dict`.
    """
    for item in sets:
        path, value = parse_set(item)
        if path[0] in sections and len(path) > 1:
            section, path = path[0], path[1:]
        else:
            owners = [s for s, (cls, _) in sections.items() if path[0] in {f.name for f in dataclasses.fields(cls)}]
            if len(owners) != 1:
                valid = ", ".join(f"{s}.{f.name}" for s, (cls, _) in sections.items() for f in dataclasses.fields(cls))
                what = "ambiguous" if owners else "unknown"
                raise GenbenchError(f"--set {item!r}: {what} key {path[0]!r}; valid keys: {valid}")
            section = owners[0]
        cls, data = sections[section]
        names = {f.name for f in dataclasses.fields(cls)}
        if path[0] not in names:
            raise GenbenchError(f"--set {item!r}: {section} has no field {path[0]!r}; valid: {sorted(names)}")
        target = data
        for p in path[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise GenbenchError(f"--set {item!r}: {p!r} is not a nested section")
        target[path[-1]] = value


def check_at_least(obj, where: str, minimum, *names: str) -> None:
    """Each named field of `obj` is >= `minimum`, else a GenbenchError naming it (`where`: whose config)."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise GenbenchError(f"{where}: {name} must be >= {minimum}, got {value}")
