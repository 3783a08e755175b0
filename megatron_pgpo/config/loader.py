"""Building configs from YAML files and dotted command-line overrides.

    cfg = load_config("examples/tiny_cpu.yaml", ["algorithm.pgpo.tau=0.3", "trainer.lr=1e-5"])

Precedence: overrides > file > dataclass defaults. Unknown keys are errors (with a "did you mean" hint), never
ignored: a typo must not silently train with a default.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Type, TypeVar

import yaml

from .base import ConfigError, field_docs
from .root import Config

T = TypeVar("T")


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(key, names, n=1)
    where = f"{prefix}.{key}" if prefix else key
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown config key {where!r}{suggestion} (valid keys here: {', '.join(names)})")


def from_dict(cls: Type[T], data: Dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a (nested) dict; unknown keys raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key_error(cls, key, prefix)
    return cls(**data)  # Section.__post_init__ coerces nested dicts and validates


def to_dict(cfg: Any) -> Dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_override(text: str) -> tuple:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], value); VALUE is parsed as YAML (``true``, ``3``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. algorithm.pgpo.tau=0.3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides: Iterable[str], cls: type = Config) -> Dict[str, Any]:
    """Set each dotted override in the nested dict ``data`` (in place and returned), checking keys against ``cls``."""
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls, prefix = data, cls, ""
        for i, part in enumerate(path):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in fields:
                raise _unknown_key_error(node_cls, part, prefix)
            field_type = _resolved_type(node_cls, part)
            prefix = f"{prefix}.{part}" if prefix else part
            if i == len(path) - 1:
                node[part] = value
            else:
                if not dataclasses.is_dataclass(field_type):
                    raise ConfigError(f"override {text!r}: {prefix!r} is a value, not a section")
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"override {text!r}: {prefix!r} is not a mapping in the config file")
                node, node_cls = child, field_type
    return data


def _resolved_type(cls: type, name: str) -> Any:
    import typing

    return typing.get_type_hints(cls)[name]


def read_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config file into a dict; an empty file is ``{}``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``section.key=value``)."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides)
    return from_dict(Config, data)


def describe(cls: type = Config, prefix: str = "") -> List[tuple]:
    """``[(dotted key, type, default, docstring)]`` for every leaf field, in declaration order."""
    import typing

    rows: List[tuple] = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key))
        else:
            type_name = str(hints[f.name]).replace("typing.", "")
            rows.append((key, type_name, getattr(defaults, f.name), docs[f.name]))
    return rows
