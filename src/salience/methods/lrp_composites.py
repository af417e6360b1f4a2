"""LRP composites: which rule each linear layer of a model takes.

A composite maps keys to rules (a rule: a name of :data:`salience.methods.lrp_rules.RULES`, or
(name, {options}), or {"rule": name, **options}). A layer call looks its rule up by, in order:

1. its module's dotted name (``"features.0"``; not a name equal to a kind or ``"input"``, such as a
   top-level ``self.conv``: that key means the kind, looked up in step 4);
2. ``"input"``, if it is the first linear layer of the forward pass (the input layer);
3. its module's class name or that of a base class (``"Conv2d"`` also covers a subclass such as
   EfficientNet's ``Conv2dStaticSamePadding``; ``"Linear"``);
4. its kind: ``"conv"`` (F.conv1d/2d/3d), ``"linear"`` (F.linear), ``"batch_norm"`` (a batch norm
   not merged into a preceding layer), ``"avg_pool"`` (average pooling).

``batch_norm`` and ``avg_pool`` default to epsilon in every composite. A user composite may extend
a named one with ``"base": name``. A layer no key covers is refused (one line naming it, its type
and the named composites that cover it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from salience.errors import ParameterError
from salience.methods.lrp_rules import rule_spec

KINDS = ("input", "conv", "linear", "batch_norm", "avg_pool")
_EVERY = {"batch_norm": "epsilon", "avg_pool": "epsilon"}
NAMED: dict[str, dict[str, Any]] = {
    "epsilon": {"conv": "epsilon", "linear": "epsilon"},
    "epsilon_plus": {"input": "zbox", "conv": "zplus", "linear": "epsilon"},
    "epsilon_plus_flat": {"input": "flat", "conv": "zplus", "linear": "epsilon"},
    "epsilon_gamma_box": {"input": "zbox", "conv": "gamma", "linear": "epsilon"},
    "epsilon_alpha2_beta1": {"conv": "alpha2_beta1", "linear": "epsilon"},
}


@dataclass
class Composite:
    """A parsed composite: its name ("custom" for a user mapping) and key -> (rule, options)."""

    name: str
    entries: dict[str, tuple[str, dict[str, Any]]]

    def lookup(self, dotted: str, classes: list[str], kind: str, is_input: bool) -> tuple[str, str, dict[str, Any]] | None:
        """(matched key, rule name, options) for one layer call, or None when no key covers it. A module
        named like a kind (a top-level ``self.conv``) is not looked up by its name: the key is the
        kind's, in the kind's place (after "input")."""
        keys = ([dotted] if dotted not in KINDS else []) + (["input"] if is_input else []) + classes + [kind]
        for key in keys:
            if key in self.entries:
                return (key, *self.entries[key])
        return None

    def uses(self, rule: str) -> bool:
        return any(name == rule for name, _ in self.entries.values())

    def describe(self) -> dict[str, Any]:
        """JSON-ready: key -> rule name, or [rule name, options]."""
        return {key: (name if not options else [name, options]) for key, (name, options) in self.entries.items()}


def parse_composite(value: Any) -> Composite:
    """A named composite (string) or a user mapping (optionally with ``"base": name``)."""
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_")
        if key not in NAMED:
            raise ParameterError(f"lrp: unknown composite {value!r}; choose one of {', '.join(NAMED)} or give a mapping "
                                 "of layer names, types or kinds to rules")
        return Composite(key, {k: rule_spec(v) for k, v in {**_EVERY, **NAMED[key]}.items()})
    if not isinstance(value, Mapping) or not value:
        raise ParameterError(f"lrp: composite must be a name ({', '.join(NAMED)}) or a non-empty mapping, not {value!r}")
    entries: dict[str, tuple[str, dict[str, Any]]] = {k: rule_spec(v) for k, v in _EVERY.items()}
    base = value.get("base")
    if base is not None:
        entries.update(parse_composite(base).entries)
    for key, spec in value.items():
        if key != "base":
            entries[str(key)] = rule_spec(spec)
    return Composite("custom" if base is None else f"custom({base})", entries)


def covering(classes: list[str], kind: str, is_input: bool) -> list[str]:
    """The named composites that give this layer a rule."""
    return [name for name, composite in NAMED.items()
            if parse_composite(name).lookup("", classes, kind, is_input) is not None]
