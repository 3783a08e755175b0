"""Shared pieces of the config system: the error type, validation helpers and field docstrings.

Config fields are documented with attribute docstrings (a string literal right under the field), the form editors
and Sphinx understand. ``field_docs(cls)`` reads them back from the source so ``megatron-pgpo config --describe``
and the tests can use them.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache
from typing import Dict, Iterable


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and says what to change."""


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def require_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise unless ``value`` is one of ``choices``; the message lists them."""
    choices = tuple(choices)
    require(value in choices, f"{name}={value!r} is not valid; choose one of: {', '.join(map(repr, choices))}")


def require_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    require(ok, f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """``{field name: docstring}`` for a dataclass whose fields carry attribute docstrings."""
    source = textwrap.dedent(inspect.getsource(cls))
    class_node = ast.parse(source).body[0]
    docs: Dict[str, str] = {}
    body = class_node.body
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
    if missing:  # a developer error, caught by the tests
        raise RuntimeError(f"{cls.__name__}: fields without a docstring: {missing}")
    return docs


def coerce(value: object, annotation: object, name: str) -> object:
    """Check ``value`` against a field annotation and return it in the annotated type.

    Understands ``bool``, ``int``, ``float``, ``str``, ``Optional[X]``, ``Literal[...]``, ``List[X]`` / ``Tuple[X,
    ...]`` and nested config dataclasses (from a dict). ints are accepted for floats; strings such as ``"1e-6"``
    (which YAML 1.1 reads as text) are accepted for floats. Anything else raises ``ConfigError`` naming ``name``.
    """
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return coerce(value, option, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {inner}")
    if origin is typing.Literal:
        require(value in args, f"{name}={value!r} is not valid; choose one of: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), f"{name} must be a list, got {value!r}")
        item_type = args[0] if args else object
        items = [coerce(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        require(isinstance(value, dict), f"{name} must be a mapping of {annotation.__name__} fields, got {value!r}")
        from .loader import from_dict  # local: loader imports this module

        return from_dict(annotation, value, prefix=name)
    if annotation is bool:
        require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        require(isinstance(value, str), f"{name} must be a string, got {value!r}")
        return value
    return value


class Section:
    """Base of every config dataclass: type-checks fields, then runs the section's own ``validate()``.

    Subclasses are ``@dataclass`` classes with an attribute docstring under every field and a ``validate()`` that
    checks ranges and cross-field rules with messages that say what to change.
    """

    def __post_init__(self) -> None:
        import typing

        hints = typing.get_type_hints(type(self))
        prefix = getattr(type(self), "PATH", type(self).__name__)
        for f in dataclasses.fields(self):
            name = f"{prefix}.{f.name}" if prefix else f.name
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], name))
        self.validate()

    def validate(self) -> None:  # overridden by sections with rules
        pass
