"""Registry of attribution methods: names, aliases, typed parameters and a one-line cost."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from salience.errors import ParameterError, UnknownMethodError


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its class, canonical name, aliases, one-line summary and cost."""

    name: str
    cls: type
    aliases: tuple[str, ...]
    summary: str
    cost: str
    kind: str  # "gradient", "path", "perturbation", "optimisation", "attention" or "cam"

    def parameters(self) -> dict[str, tuple[Any, str]]:
        """Parameter name -> (default, type annotation as text)."""
        return {f.name: (f.default, str(f.type)) for f in dataclasses.fields(self.cls)}

    def build(self, params: dict[str, Any]) -> Any:
        """Instantiate with ``params``; unknown names raise :class:`ParameterError`."""
        known = self.parameters()
        unknown = sorted(set(params) - set(known))
        if unknown:
            listing = ", ".join(known) or "none"
            raise ParameterError(f"method {self.name!r} has no parameter {unknown[0]!r}; its parameters are: {listing}")
        return self.cls(**params)


_METHODS: dict[str, MethodInfo] = {}
_ALIASES: dict[str, str] = {}

C = TypeVar("C", bound=type)


def register(name: str, *, aliases: tuple[str, ...] = (), summary: str, cost: str, kind: str) -> Callable[[C], C]:
    """Class decorator adding a method (a dataclass of its parameters) to the registry."""

    def decorate(cls: C) -> C:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass of its parameters")
        for key in (name, *aliases):
            if key in _ALIASES:
                raise ValueError(f"method name {key!r} is registered twice")
            _ALIASES[key] = name
        _METHODS[name] = MethodInfo(name, cls, aliases, summary, cost, kind)
        return cls

    return decorate


def normalise_name(name: str) -> str:
    """Registry key of a user-typed name: case-insensitive, '-' same as '_'."""
    return name.strip().lower().replace("-", "_")


def unknown_name_message(kind: str, name: str, keys: list[str], canonical: list[str]) -> str:
    """One-line message for an unknown ``kind`` name, with the closest key and the known names."""
    close = difflib.get_close_matches(normalise_name(name), keys, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; known {kind}s: {', '.join(sorted(canonical))}"


def get_method(name: str) -> MethodInfo:
    """Look a method up by name or alias (case-insensitive, '-' same as '_')."""
    key = normalise_name(name)
    if key not in _ALIASES:
        raise UnknownMethodError(unknown_name_message("method", name, list(_ALIASES), list(_METHODS)))
    return _METHODS[_ALIASES[key]]


def all_methods() -> list[MethodInfo]:
    """Every registered method, sorted by kind then name."""
    order = {"gradient": 0, "path": 1, "perturbation": 2, "optimisation": 3, "attention": 4, "cam": 5}
    return sorted(_METHODS.values(), key=lambda m: (order.get(m.kind, 9), m.name))
