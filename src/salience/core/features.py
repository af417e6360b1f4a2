"""Features: the units an explanation scores, each a group of input positions.

A model kind presents its input to methods as positions x channels (tokens x embedding dims,
pixels x colour channels). A :class:`FeatureSet` holds F features over P positions as a sparse
membership matrix, so methods never need to know what a feature is: they aggregate position
scores to features (sum), turn kept-feature rows into removed-position rows, and spread feature
scores back to positions (mean over the features covering a position, for overlapping patches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch


@dataclass(frozen=True)
class Feature:
    """One attributed unit of the input (a word, a token, a pixel, a patch, a superpixel).

    Text: ``start``/``end`` are character offsets into the input text the user gave (for a text
    pair, into text number ``segment``: 0 for the first, 1 for the second); ``tokens`` are the
    indices of the model positions (tokens) it covers. Images: ``box`` is (top, left, bottom,
    right) in the model's pixel grid (bottom/right exclusive) and ``start``/``end`` are -1.
    """

    text: str
    start: int
    end: int
    segment: int = 0
    tokens: tuple[int, ...] = ()
    box: tuple[int, int, int, int] | None = None


class FeatureSet(Sequence[Feature]):
    """F features over P positions. ``pairs`` (2, nnz) lists (feature, position) memberships.

    ``describe(i)`` builds feature i on demand (image pixel features are never all materialised);
    ``layout`` is a JSON-ready description for serialisation (None for text: features are listed).
    """

    def __init__(self, count: int, positions: int, pairs: torch.Tensor, describe: Callable[[int], Feature], *,
                 level: str, layout: dict[str, Any] | None = None, items: Sequence[Feature] | None = None) -> None:
        self.count, self.positions, self.level, self.layout = count, positions, level, layout
        self.pairs = pairs.long()
        self._describe = describe
        self._items = list(items) if items is not None else None

    @classmethod
    def from_features(cls, features: Sequence[Feature], positions: int, level: str) -> FeatureSet:
        """Text-style features that list their positions in ``Feature.tokens``."""
        if isinstance(features, FeatureSet):
            if features.positions == positions:
                return features
            if features._items is None:
                raise ValueError(f"these {features.level} features cover {features.positions} positions, not {positions}")
            # the same token features over a longer sequence (e.g. a text inside its NLI pair)
        items = list(features)
        rows = [(i, t) for i, f in enumerate(items) for t in f.tokens]
        pairs = torch.tensor(rows, dtype=torch.long).T if rows else torch.zeros(2, 0, dtype=torch.long)
        return cls(len(items), positions, pairs, items.__getitem__, level=level, items=items)

    @classmethod
    def from_assignment(cls, assignment: np.ndarray, describe: Callable[[int], Feature], *, level: str,
                        layout: dict[str, Any] | None = None) -> FeatureSet:
        """Disjoint features from a label per position (P,); -1 marks positions in no feature."""
        labels = torch.as_tensor(np.asarray(assignment), dtype=torch.long).reshape(-1)
        where = torch.nonzero(labels >= 0).reshape(-1)
        count = int(labels.max()) + 1 if len(where) else 0
        return cls(count, int(labels.numel()), torch.stack([labels[where], where]), describe, level=level, layout=layout)

    # -------------------------------------------------------------- sequence
    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> Feature: ...
    @overload
    def __getitem__(self, index: slice) -> list[Feature]: ...
    def __getitem__(self, index: int | slice) -> Feature | list[Feature]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(f"feature index {index} out of range for {self.count} features")
        index %= self.count
        return self._items[index] if self._items is not None else self._describe(index)

    def __iter__(self) -> Iterator[Feature]:
        return (self[i] for i in range(self.count))

    # ------------------------------------------------------------------ maths
    def position_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Dense (F, P) membership (small feature sets: text, patches)."""
        dense = torch.zeros(self.count, self.positions, dtype=dtype)
        dense[self.pairs[0], self.pairs[1]] = True if dtype == torch.bool else 1
        return dense

    def aggregate(self, position_scores: torch.Tensor) -> torch.Tensor:
        """Feature scores (..., F): the sum of each feature's position scores (..., P)."""
        flat = position_scores.reshape(-1, self.positions).double()
        gathered = flat[:, self.pairs[1]]
        out = torch.zeros(flat.shape[0], self.count, dtype=flat.dtype, device=flat.device)
        out.index_add_(1, self.pairs[0].to(flat.device), gathered)
        return out.reshape(*position_scores.shape[:-1], self.count)

    def removed(self, keep: torch.Tensor) -> torch.Tensor:
        """Positions removed (B, P) bool for kept-feature rows ``keep`` (B, F) bool: a position is
        removed when any feature covering it is not kept. Computed on ``keep``'s device."""
        dropped = (~keep.bool()).to(torch.float32)
        pairs = self.pairs.to(keep.device)
        hits = torch.zeros(keep.shape[0], self.positions, dtype=torch.float32, device=keep.device)
        hits.index_add_(1, pairs[1], dropped[:, pairs[0]])
        return hits > 0

    def spread(self, scores: torch.Tensor) -> torch.Tensor:
        """Position scores (..., P) from feature scores (..., F): the mean over the features covering
        each position (positions covered by none get NaN)."""
        flat = scores.reshape(-1, self.count).double()
        total = torch.zeros(flat.shape[0], self.positions, dtype=flat.dtype)
        total.index_add_(1, self.pairs[1], flat[:, self.pairs[0]])
        coverage = torch.zeros(self.positions, dtype=flat.dtype).index_add_(
            0, self.pairs[1], torch.ones(self.pairs.shape[1], dtype=flat.dtype))
        out = total / coverage
        return out.reshape(*scores.shape[:-1], self.positions)


def as_feature_set(features: Sequence[Feature], positions: int, level: str = "word") -> FeatureSet:
    """``features`` as a :class:`FeatureSet` (text features list their positions in ``tokens``)."""
    return FeatureSet.from_features(features, positions, level)
