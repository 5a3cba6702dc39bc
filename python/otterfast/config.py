"""Config loading shared by every command: YAML documents, `--set a.b=c` overrides, typed dataclass sections,
key checks, and the one error they raise. Imports nothing of ours, so that any layer may use it.

Two ways to validate a mapping, both raising `ConfigError` with the key path that caused it:

- `build(cls, doc, path)`: a dataclass section from a mapping, every value coerced to its annotation (nested
  dataclasses too); an unknown key names its full path, the closest valid key and the valid keys of its section.
  `Rules` holds a schema's exceptions (keys that another owner sets, a constructor other than the class, a value
  rewritten before typing). train/config.py builds the training config this way.
- `check_keys(doc, valid, where)`: a free-form mapping whose valid keys depend on other values (an eval model's
  kind, a task's options); lists every unknown key and the valid ones. eval/runner.py checks its entries this way.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import yaml


class ConfigError(ValueError):
    """A config problem, with the key path that caused it."""


# ---- documents and overrides ----------------------------------------------------------------------------

def read_yaml(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_document(src: str | dict | None, overrides: list[str] | None = None) -> tuple[dict, str]:
    """A YAML path (or a dict, copied) with `key.path=value` overrides applied -> (mapping, where), `where` being
    the path or "config" for the message prefix."""
    if isinstance(src, str):
        doc, where = read_yaml(src) or {}, src
    else:
        doc, where = dict(src or {}), "config"
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys")
    doc = copy.deepcopy(doc)
    for k, v in parse_overrides(overrides):
        set_key(doc, k, v)
    return doc, where


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"--set {o!r}: expected key.path=value")
        k, v = o.split("=", 1)
        out.append((k.strip(), v))
    return out


def set_key(doc: dict, dotted: str, raw: str) -> None:
    """Apply one `a.b.c=value` override to a raw YAML dict (value parsed as YAML: numbers, bools, null)."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}={raw}: empty key")
    cur = doc
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    cur[keys[-1]] = value


# ---- free-form mappings ---------------------------------------------------------------------------------

def check_keys(doc: Any, valid, where: str) -> dict:
    """`doc` itself when it is a mapping with only `valid` keys, else a ConfigError listing the unknown ones."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(doc).__name__}")
    bad = sorted(set(doc) - set(valid))
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; valid: {list(valid)}")
    return doc


# ---- typed dataclass sections ---------------------------------------------------------------------------

@dataclass
class Rules:
    """A schema's exceptions to plain typed loading, by dataclass."""
    owned: dict[type, dict[str, str]] = field(default_factory=dict)  # keys set elsewhere: {key: by whom}
    make: dict[type, Callable[..., Any]] = field(default_factory=dict)  # constructor(**kwargs) instead of cls
    adjust: Callable[[type, str, Any], Any] | None = None  # (cls, key, raw value) -> value, before typing


def type_name(t) -> str:
    if t is type(None):
        return "null"
    args = typing.get_args(t)
    if typing.get_origin(t) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    return getattr(t, "__name__", str(t))


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_NOT = object()


def _scalar(value: Any, t: type):
    """`value` as the scalar type `t`, or _NOT. Beyond the type itself: an integral float as an integer, a numeric
    string as a number (PyYAML reads 1e-4, no dot, as a string), a number as a string (resume: a numeric folder)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = number and (isinstance(value, int) or value.is_integer())
    elif t is float:
        ok = number
        if isinstance(value, str):
            try:
                float(value)
                ok = True
            except ValueError:
                pass
    else:
        ok = isinstance(value, str) or number
    return t(value) if ok else _NOT


def coerce(value: Any, t, path: str, rules: Rules | None = None):
    """`value` (from YAML or a --set string already YAML-parsed) as type `t`, or a ConfigError."""
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path, rules)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {type_name(t)}, got {value!r}")
    if t in _SCALARS:
        v = _scalar(value, t)
        if v is _NOT:
            raise ConfigError(f"{path}: expected {_SCALARS[t]}, got {value!r}")
        return v
    if t is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    if t is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(t):
        return build(t, value, path, rules)
    raise ConfigError(f"{path}: unsupported type {t}")  # a schema bug, not a user error


def build(cls, doc: Any, path: str = "", rules: Rules | None = None):
    """A `cls` instance from a mapping, every key checked against the fields and typed by their annotations."""
    rules = rules or Rules()
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {doc!r}")
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    owned = rules.owned.get(cls, {})
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in doc.items():
        where = f"{path}.{k}" if path else str(k)
        if k in owned:
            raise ConfigError(f"{where}: set by {owned[k]}, not in {path}")
        if k not in names:
            valid = [n for n in names if n not in owned]
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {where!r}{hint}; valid keys{' of ' + path if path else ''}: "
                              f"{', '.join(valid)}")
        if rules.adjust is not None:
            v = rules.adjust(cls, k, v)
        kwargs[k] = coerce(v, hints[k], where, rules)
    try:
        return rules.make.get(cls, cls)(**kwargs)
    except (TypeError, ValueError) as e:  # e.g. a dataclass that validates in __post_init__
        raise ConfigError(f"{path or 'config'}: {e}") from None
