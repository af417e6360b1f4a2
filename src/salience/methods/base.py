"""What every method receives and returns.

A method sees the input as positions x channels (the adapter's attribution space), a
:class:`FeatureSet` of F features and T targets; it returns one row of F feature scores per target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from salience.core.features import FeatureSet
from salience.core.target import Target
from salience.models.base import Adapter


@dataclass
class Context:
    """One input to explain: the adapter, the encoded input, the targets, the features to score,
    which features can influence which target (``available``, (T, F) bool), the chunk size (None:
    the batching utility decides), the seed of any randomness and, for methods that set
    ``uses_input_gradient``, the outputs (T,) and gradients (T, P, C) at the input when the
    prediction pass already computed them (``input_gradient_state``: what a method's own
    ``input_gradient_pass`` recorded during that pass, e.g. LRP's trace)."""

    model: Adapter
    encoded: object
    targets: list[Target]
    features: FeatureSet
    available: np.ndarray
    batch_size: int | None = None
    seed: int = 0
    input_gradient: tuple[torch.Tensor, torch.Tensor] | None = None
    input_gradient_state: object = None

    def generator(self) -> torch.Generator:
        """A torch generator seeded with ``seed`` (CPU, so results do not depend on the device)."""
        return torch.Generator().manual_seed(self.seed)

    def rng(self) -> np.random.Generator:
        """A numpy generator seeded with ``seed``."""
        return np.random.default_rng(self.seed)

    def baseline(self, requested: str | None, prefer: str, *, perturbation: bool) -> str:
        """:func:`choose_baseline` for this context's adapter."""
        return choose_baseline(self.model, requested, prefer, perturbation=perturbation)


def choose_baseline(model: Adapter, requested: str | None, prefer: str, *, perturbation: bool) -> str:
    """The baseline to use: ``requested`` if given, else ``prefer`` when the adapter knows it,
    else the adapter's default (the first of ``model.baselines``); the adapter refuses one it
    cannot build (one-line error listing those it can) and returns the name it records."""
    known = tuple(getattr(model, "baselines", ()))
    if requested is not None:
        chosen = requested
    else:
        chosen = prefer if prefer in known or not known else known[0]
    checker = getattr(model, "check_baseline", None)
    return checker(chosen, perturbation=perturbation) if callable(checker) else chosen


@dataclass
class Attribution:
    """A method's raw result for T targets: ``scores`` (T, F); optional per-position scores (T, P);
    where defined, the output at the input and at the baseline and the completeness error
    ``delta``, each (T,); ``details`` records choices made while running (recorded in params);
    ``extras`` are method outputs kept beside the scores (``Explanation.extras``: e.g. a raw CAM
    map or a loss curve; JSON-ready values, or keys starting with ``_`` for in-memory objects)."""

    scores: np.ndarray
    position_scores: np.ndarray | None = None
    output_value: np.ndarray | None = None
    baseline_value: np.ndarray | None = None
    delta: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    extras: dict[str, object] = field(default_factory=dict)


def as_array(values: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    """float64 numpy copy (None stays None)."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def position_attribution(position_scores: torch.Tensor, ctx: Context, **extra: object) -> Attribution:
    """Wrap per-position scores (T, P) as an :class:`Attribution`: each feature's score is the sum
    of its positions' scores (subwords merge by summing, pixels of a patch too)."""
    scores = ctx.features.aggregate(position_scores.detach().double().cpu())
    return Attribution(scores=scores.numpy(), position_scores=as_array(position_scores), **extra)  # type: ignore[arg-type]
