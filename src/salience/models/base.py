"""The adapter contract every model kind implements, and the encoded input of the token models.

Methods see an input as a tensor of positions x channels (tokens x embedding dims for text and
causal LMs, pixels x colour channels for images), a :class:`~salience.core.features.FeatureSet`
and a list of targets; they ask the adapter for outputs of perturbed rows or of points in the
input space (with gradients). Everything that depends on the kind of model lives behind this
contract: how a feature is removed (a [MASK] token, deletion, a black or blurred patch), where
gradients are taken, which positions can influence which target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from salience.core.features import Feature, FeatureSet
from salience.core.target import Prediction, Target


@dataclass
class PassCounter:
    """Rows sent through the model since creation (one batch of 16 rows = 16 passes)."""

    forward_passes: int = 0
    backward_passes: int = 0
    model_calls: int = 0
    cached_positions: int = 0  # token positions of forward rows read from a key/value cache, not recomputed


@dataclass
class Encoded:
    """One token input (text, text pair, prompt + continuation), tokenised: what methods perturb.

    ``special[t]`` marks positions that baselines keep ([CLS], [SEP], BOS, ...). ``words`` and
    ``token_features`` are the two feature levels; each feature lists its token indices.
    """

    input: Any
    input_ids: torch.Tensor  # (T,)
    token_type_ids: torch.Tensor | None  # (T,) or None
    tokens: list[str]
    special: torch.Tensor  # (T,) bool
    words: list[Feature]
    token_features: list[Feature]
    truncated: bool = False
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of positions (tokens, special ones included)."""
        return int(self.input_ids.shape[0])

    def features(self, level: str) -> list[Feature]:
        """The features of ``level`` ("word" or "token")."""
        return self.words if level == "word" else self.token_features


@runtime_checkable
class Adapter(Protocol):
    """What methods and metrics may ask of a model.

    ``kind`` names the model kind ("text classifier", "image classifier", "causal LM"); a method
    that needs a capability the adapter lacks (e.g. attention maps) is refused with a message
    naming the kinds that have it. Outputs of several targets come back as columns (B, T).
    """

    name: str
    kind: str
    labels: list[str]
    counter: PassCounter
    baselines: tuple[str, ...]  # named baselines this adapter understands; the first is its default

    def encode(self, inputs: Any, *, truncate: bool = False) -> Any: ...

    def predict(self, encoded: Any) -> Prediction | None:
        """The class prediction on the unperturbed input (None for a causal LM: it has no classes)."""
        ...

    def features(self, encoded: Any, level: str, **options: Any) -> FeatureSet:
        """The features of ``level`` (text: word/token; image: pixel/patch/superpixel)."""
        ...

    def available(self, encoded: Any, targets: Sequence[Target], features: FeatureSet) -> np.ndarray:
        """(T, F) bool: which features can influence which target (a causal LM's later tokens cannot)."""
        ...

    def score_perturbed(self, encoded: Any, keep: torch.Tensor, features: Sequence[Feature], baseline: str,
                        target: Target | Sequence[Target], batch_size: int | None = None) -> torch.Tensor:
        """Output for each row of ``keep`` (B, F) bool: features not kept are replaced by
        ``baseline`` or deleted ("delete"). Returns (B,) for one target, (B, T) for a list."""
        ...

    def input_and_baseline(self, encoded: Any, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The input in attribution space and its baseline, both (P, C); positions marked special
        keep their input value in the baseline."""
        ...

    def score_inputs(self, encoded: Any, rows: torch.Tensor, target: Target | Sequence[Target], *, grad: bool,
                     batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs for rows (N, P, C) of the attribution space: (N,) for one target, (N, T) for a list;
        with ``grad`` also d output / d rows: (N, P, C), or (N, T, P, C) for a list."""
        ...

    def bytes_per_row(self, length: int, *, backward: bool) -> int: ...
