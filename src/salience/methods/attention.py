"""Attention-based scores: what the first token ([CLS]) attends to, raw or rolled out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, position_attribution


@register("attention", aliases=("attn",), kind="attention", cost="1 forward",
          summary="Attention weight from the first token to each token (head mean; last layer or layer mean)")
@dataclass
class Attention:
    """Token score = attention probability from the first token to it, averaged over heads, in
    the last layer (``layer="last"``), averaged over layers (``"mean"``) or in layer ``int``.
    Unsigned, in [0, 1]; not an attribution to the target class (the target is ignored)."""

    layer: str | int = "last"
    needs: ClassVar[tuple[str, ...]] = ("attention_maps",)

    def attribute(self, ctx: Context) -> Attribution:
        maps = ctx.model.attention_maps(ctx.encoded).mean(1)  # (layers, T, T)
        if self.layer == "last":
            row = maps[-1, 0]
        elif self.layer == "mean":
            row = maps[:, 0].mean(0)
        else:
            try:
                row = maps[int(self.layer), 0]
            except (IndexError, ValueError):
                raise ParameterError(f"layer must be 'last', 'mean' or an index below {maps.shape[0]}, got {self.layer!r}") from None
        return position_attribution(row.expand(len(ctx.targets), -1), ctx)


@register("attention_rollout", aliases=("rollout",), kind="attention", cost="1 forward",
          summary="Attention rollout (Abnar & Zuidema, 2020) from the first token")
@dataclass
class AttentionRollout:
    """Rollout: per layer, A = (1 - residual) x head-mean attention + residual x I, rows
    renormalised; the product over layers (first to last) gives how much each input token flows
    into the first token's final representation. Unsigned; the target is ignored."""

    residual: float = 0.5
    needs: ClassVar[tuple[str, ...]] = ("attention_maps",)

    def attribute(self, ctx: Context) -> Attribution:
        maps = ctx.model.attention_maps(ctx.encoded).mean(1)
        eye = torch.eye(maps.shape[-1], dtype=maps.dtype)
        rollout = eye
        for layer in maps:
            mixed = (1 - self.residual) * layer + self.residual * eye
            rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
        return position_attribution(rollout[0].expand(len(ctx.targets), -1), ctx)
