"""Attention-based scores: what the explained position attends to, raw or rolled out.

Each target reads the attention row(s) its adapter names (``attention_query_rows``): a text
classifier's targets the first token's ([CLS]) row, which its head reads; a causal LM's target the
row of the position that predicts its token (``position - 1``); a span target the mean of its
tokens' rows. Scores are unsigned, in [0, 1] (each row of an attention or rollout matrix sums to 1),
and do not depend on the explained output kind: the target only picks the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, position_attribution

NEEDS = ("attention_maps", "attention_query_rows")


def query_rows(matrix: torch.Tensor, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(T, P): for each target the mean of ``matrix``'s (P, P) rows it reads."""
    return torch.stack([matrix[list(r)].mean(0) for r in rows])


def as_positions(ctx: Context, scores: torch.Tensor) -> torch.Tensor:
    """Token scores (T, tokens) as the adapter's position scores: the same for text and causal LMs
    (their positions are tokens), the patches' pixels for an image transformer."""
    convert = getattr(ctx.model, "attention_positions", None)
    return scores if convert is None else convert(ctx.encoded, scores)


def pick_layer(maps: torch.Tensor, layer: str | int) -> torch.Tensor:
    """The (P, P) matrix of ``layer`` from per-layer maps (L, P, P): ``"last"``, ``"mean"`` (of the
    layers) or a layer index (negative counts from the last)."""
    if layer == "last":
        return maps[-1]
    if layer == "mean":
        return maps.mean(0)
    if isinstance(layer, bool) or not isinstance(layer, (int, str)) or not str(layer).lstrip("-").isdigit() \
            or not -maps.shape[0] <= int(layer) < maps.shape[0]:
        raise ParameterError(f"layer must be 'last', 'mean' or an index below {maps.shape[0]}, got {layer!r}")
    return maps[int(layer)]


@register("attention", aliases=("attn",), kind="attention", cost="1 forward",
          summary="Attention weight from the explained position to each token (head mean; last layer, layer mean or one layer)")
@dataclass
class Attention:
    """Token score = attention probability from the target's query row (module docstring) to it,
    averaged over heads, in the last layer (``layer="last"``), averaged over layers (``"mean"``) or
    in layer ``int``. Unsigned, in [0, 1]; not an attribution to the output (the target only
    chooses the row)."""

    layer: str | int = "last"
    needs: ClassVar[tuple[str, ...]] = NEEDS

    def attribute(self, ctx: Context) -> Attribution:
        maps = ctx.model.attention_maps(ctx.encoded).mean(1)  # type: ignore[attr-defined]  # (layers, P, P)
        matrix = pick_layer(maps, self.layer)
        rows = ctx.model.attention_query_rows(ctx.encoded, ctx.targets)  # type: ignore[attr-defined]
        return position_attribution(as_positions(ctx, query_rows(matrix, rows)), ctx, details={"query_rows": rows})


def rollout(maps: torch.Tensor, residual: float) -> torch.Tensor:
    """Abnar & Zuidema's rollout of head-mean maps (L, P, P): per layer A = (1 - residual) W + residual I,
    rows renormalised; R = A_L ... A_1 (the first layer rightmost)."""
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype)
    result = eye
    for layer in maps:
        mixed = (1 - residual) * layer + residual * eye
        result = (mixed / mixed.sum(-1, keepdim=True)) @ result
    return result


@register("attention_rollout", aliases=("rollout",), kind="attention", cost="1 forward",
          summary="Attention rollout (Abnar & Zuidema, 2020) read at the explained position")
@dataclass
class AttentionRollout:
    """Rollout: per layer, A = (1 - residual) x head-mean attention + residual x I, rows
    renormalised; the product over layers (first to last) gives how much each input token flows
    into the final representation of the target's query row (module docstring). Unsigned, in
    [0, 1] (rows sum to 1); the target only chooses the row."""

    residual: float = 0.5
    needs: ClassVar[tuple[str, ...]] = NEEDS

    def attribute(self, ctx: Context) -> Attribution:
        if not 0 <= self.residual <= 1:
            raise ParameterError(f"residual must be in [0, 1], got {self.residual}")
        maps = ctx.model.attention_maps(ctx.encoded).mean(1)  # type: ignore[attr-defined]
        rows = ctx.model.attention_query_rows(ctx.encoded, ctx.targets)  # type: ignore[attr-defined]
        return position_attribution(as_positions(ctx, query_rows(rollout(maps, self.residual), rows)), ctx,
                                    details={"query_rows": rows})
