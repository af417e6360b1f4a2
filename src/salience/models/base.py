"""The adapter contract every model family implements, and the encoded input it works on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from salience.core.explanation import Feature
from salience.core.target import Prediction, Target


@dataclass
class Encoded:
    """One input, tokenised: what methods perturb.

    ``special[t]`` marks tokens that baselines keep ([CLS], [SEP], ...). ``words`` and
    ``token_features`` are the two feature levels; each feature lists its token indices.
    """

    input: str | tuple[str, str]
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
        return int(self.input_ids.shape[0])

    def features(self, level: str) -> list[Feature]:
        """The features of ``level`` ("word" or "token")."""
        return self.words if level == "word" else self.token_features


@runtime_checkable
class Adapter(Protocol):
    """What methods and metrics may ask of a model. Scores are the explained output of ``target``."""

    name: str
    labels: list[str]

    def encode(self, inputs: str | tuple[str, str], *, truncate: bool = False) -> Encoded: ...

    def predict(self, encoded: Encoded) -> Prediction: ...

    def score_perturbed(self, encoded: Encoded, keep: torch.Tensor, features: list[Feature], baseline: str,
                        target: Target, batch_size: int | None = None) -> torch.Tensor:
        """Output for each row of ``keep`` (B, F) bool: features not kept are replaced by
        ``baseline`` ("mask", "pad", "unk") or deleted ("delete"). Returns (B,)."""
        ...

    def embedding_path_ends(self, encoded: Encoded, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings of the input and of the baseline input, both (T, D); the baseline
        replaces non-special tokens only."""
        ...

    def score_embeddings(self, encoded: Encoded, embeds: torch.Tensor, target: Target, *,
                         grad: bool, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs (N,) for word-embedding rows ``embeds`` (N, T, D), and their gradients (N, T, D)
        when ``grad``."""
        ...

    def attention_maps(self, encoded: Encoded) -> torch.Tensor:
        """Attention probabilities (layers, heads, T, T)."""
        ...
