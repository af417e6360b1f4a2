"""What every method receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from salience.core.explanation import Feature
from salience.core.target import Target
from salience.models.base import Adapter, Encoded


@dataclass
class Context:
    """One input to explain: the adapter, the encoded input, the target, the features to score,
    the chunk size (None: the batching utility decides), the seed of any randomness and, for
    methods that set ``uses_input_gradient``, the gradient at the input when the prediction pass
    already computed it."""

    model: Adapter
    encoded: Encoded
    target: Target
    features: list[Feature]
    batch_size: int | None = None
    seed: int = 0
    input_gradient: tuple[float, torch.Tensor] | None = None  # (output, d output / d embeddings (T, D)) at the input

    def generator(self) -> torch.Generator:
        """A torch generator seeded with ``seed`` (CPU, so results do not depend on the device)."""
        return torch.Generator().manual_seed(self.seed)

    def rng(self) -> np.random.Generator:
        """A numpy generator seeded with ``seed``."""
        return np.random.default_rng(self.seed)


@dataclass
class Attribution:
    """A method's raw result: one score per feature, optional per-token scores, and, where defined,
    the output at the input and at the baseline and the completeness error ``delta``; ``details``
    records choices made while running (recorded in the Explanation's params)."""

    scores: np.ndarray
    token_scores: np.ndarray | None = None
    output_value: float | None = None
    baseline_value: float | None = None
    delta: float | None = None
    warnings: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)  # e.g. steps an adaptive rule used


def features_from_tokens(token_scores: torch.Tensor, features: list[Feature]) -> np.ndarray:
    """Feature scores as the sum of their tokens' scores (subwords merge by summing)."""
    values = token_scores.detach().double().cpu().numpy()
    return np.array([values[list(f.tokens)].sum() for f in features], dtype=np.float64)


def token_attribution(token_scores: torch.Tensor, ctx: Context, **extra: object) -> Attribution:
    """Wrap per-token scores (T,) as an :class:`Attribution` at the context's feature level."""
    return Attribution(
        scores=features_from_tokens(token_scores, ctx.features),
        token_scores=token_scores.detach().double().cpu().numpy(),
        **extra,  # type: ignore[arg-type]
    )
