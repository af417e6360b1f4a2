"""Metric contract and registry.

A metric is a function ``fn(model, explanation, **params) -> MetricResult`` registered under a
name with its direction (is higher better?) and what it needs (a human rationale, ground truth).
It perturbs inputs only through the adapter (``model.encode`` / ``model.score_perturbed``), so it
batches through the same utility as the methods, and it reports the model passes it used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from salience.core.explanation import Explanation
from salience.core.registry import normalise_name, unknown_name_message
from salience.errors import ParameterError, SalienceError


class MetricError(SalienceError, ValueError):
    """A metric cannot be computed for this explanation (e.g. plausibility without a rationale)."""


@dataclass
class MetricResult:
    """``value`` of metric ``name`` (direction in ``higher_is_better``), optional curve or
    per-bin details, and the forward passes it cost."""

    name: str
    value: float
    higher_is_better: bool
    details: dict[str, Any] = field(default_factory=dict)
    forward_passes: int = 0


MetricFn = Callable[..., MetricResult]


@dataclass(frozen=True)
class MetricInfo:
    name: str
    fn: MetricFn
    higher_is_better: bool
    summary: str
    needs: tuple[str, ...] = ()  # e.g. ("rationale",) or ("ground_truth",)


_METRICS: dict[str, MetricInfo] = {}


def register_metric(name: str, *, higher_is_better: bool, summary: str, needs: tuple[str, ...] = ()) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering a metric function under ``name``."""

    def decorate(fn: MetricFn) -> MetricFn:
        if name in _METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        _METRICS[name] = MetricInfo(name, fn, higher_is_better, summary, needs)
        return fn

    return decorate


def get_metric(name: str) -> MetricInfo:
    """Look a metric up by name; unknown names raise a one-line error listing the known ones."""
    _load_builtin_metrics()
    key = normalise_name(name)
    if key not in _METRICS:
        raise ParameterError(unknown_name_message("metric", name, list(_METRICS), list(_METRICS)))
    return _METRICS[key]


def all_metrics() -> list[MetricInfo]:
    _load_builtin_metrics()
    return sorted(_METRICS.values(), key=lambda m: m.name)


def evaluate_metric(name: str, model: Any, explanation: Explanation, **params: Any) -> MetricResult:
    """Compute metric ``name`` on one explanation, counting the model's forward passes."""
    info = get_metric(name)
    counter = getattr(model, "counter", None)
    before = dataclasses.replace(counter) if counter is not None else None
    result = info.fn(model, explanation, **params)
    if counter is not None and before is not None:
        result.forward_passes = counter.forward_passes - before.forward_passes
    if not np.isfinite(result.value):
        raise MetricError(f"metric {name} is not finite ({result.value}) for input {str(explanation.input)[:60]!r}")
    return result


def _load_builtin_metrics() -> None:
    import importlib

    for module in ("faithfulness", "plausibility", "sanity", "image", "complexity", "context"):
        try:
            importlib.import_module(f"salience.metrics.{module}")
        except ModuleNotFoundError as error:  # a metric family not written yet
            if error.name != f"salience.metrics.{module}":
                raise
