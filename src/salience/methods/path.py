"""Path integrals of gradients along straight lines in the attribution space, fixed or adaptive.

Along x(a) = start + a (end - start), the integral of dF/dx . (end - start) over [0, 1] equals
F(end) - F(start). The adaptive integrator integrates each piece of [0, 1] with a Gauss-Kronrod
7/15 pair: the 15 gradients of a piece give two estimates of every feature's share of the piece
(K15 and the embedded G7), and |K15 - G7| bounds the error of the K15 estimate (K15 is exact for
polynomials of degree 22, G7 for degree 13, so on a smooth piece K15's error is far below it).
Pieces are bisected where these per-feature bounds are largest until, for every target and
feature, the summed bound is within tolerance of the largest feature score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from salience.methods.base import Context
from salience.methods.quadrature import gauss_kronrod_15, quadrature


@dataclass
class PathResult:
    """Per-position attributions (T, P) (summed over channels), F of every target at both ends
    (T,), gradient evaluations used (per target), and, for the adaptive rule, the per-feature error
    bound (T, F) and whether it met the tolerance."""

    position_scores: torch.Tensor
    start_value: torch.Tensor
    end_value: torch.Tensor
    steps: int
    error_bound: np.ndarray | None = None
    converged: bool = True


def fixed_path_integral(ctx: Context, start: torch.Tensor, end: torch.Tensor, rule: str, steps: int) -> PathResult:
    """Integrate with one quadrature ``rule`` of ``steps`` points over [0, 1]."""
    alphas, weights = quadrature(rule, steps)
    contribution = _pieces(ctx, start, end, alphas[None], weights[None])[0]
    starts, ends = _end_values(ctx, start, end)
    return PathResult(contribution, starts, ends, steps)


def adaptive_path_integral(ctx: Context, start: torch.Tensor, end: torch.Tensor, *, pieces: int, tolerance: float,
                           atol: float, max_steps: int) -> PathResult:
    """Start from ``pieces`` equal pieces; bisect the pieces with the largest per-feature bound
    |K15 - G7| until, for each target t, every feature's summed bound is at most
    max(tolerance x max_f |score_t,f|, atol), or ``max_steps`` gradients per target are spent."""
    alphas, kronrod, gauss = gauss_kronrod_15()
    nodes = len(alphas)
    integrated: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}  # piece -> (K15 (T, F), |K15 - G7| (T, F))
    position_parts: dict[tuple[float, float], torch.Tensor] = {}
    pending = [(i / pieces, (i + 1) / pieces) for i in range(pieces)]
    steps = 0
    while True:
        lows = np.array([a for a, _ in pending])
        widths = np.array([b - a for a, b in pending])
        points = lows[:, None] + widths[:, None] * alphas
        weights = np.stack([widths[:, None] * kronrod, widths[:, None] * gauss], axis=1)  # (pieces, 2, nodes)
        parts = _pieces(ctx, start, end, points, weights)  # (pieces, 2, T, P)
        steps += len(pending) * nodes
        for piece, part in zip(pending, parts):
            features_k, features_g = ctx.features.aggregate(part[0].cpu()), ctx.features.aggregate(part[1].cpu())
            integrated[piece] = (features_k, (features_k - features_g).abs())
            position_parts[piece] = part[0]
        scores = torch.stack([k for k, _ in integrated.values()]).sum(0)  # (T, F)
        bounds = torch.stack([e for _, e in integrated.values()])  # (pieces, T, F)
        allowed = torch.clamp(tolerance * scores.abs().amax(-1), min=atol)  # (T,)
        total = bounds.sum(0)  # (T, F)
        converged = bool((total <= allowed[:, None]).all())
        worst_per_piece = (bounds / allowed[None, :, None]).flatten(1).amax(1)  # (pieces,)
        order = list(integrated)
        to_split = [order[i] for i in range(len(order)) if worst_per_piece[i] >= 0.5 * worst_per_piece.max()]
        if converged or steps + 2 * nodes * len(to_split) > max_steps:
            break
        pending = []
        for a, b in to_split:
            del integrated[(a, b)], position_parts[(a, b)]
            pending += [(a, (a + b) / 2), ((a + b) / 2, b)]
    position_scores = torch.stack(list(position_parts.values())).sum(0)
    starts, ends = _end_values(ctx, start, end)
    return PathResult(position_scores, starts, ends, steps, total.numpy(), converged)


def _pieces(ctx: Context, start: torch.Tensor, end: torch.Tensor, alphas: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """For each row of ``alphas`` (pieces, n) and each weight vector ``weights`` (pieces, [R,] n):
    sum_k w_k dF_t/dx(x(a_k)) . (end - start), summed over channels: (pieces, [R,] T, P)."""
    direction = end - start
    flat = torch.as_tensor(alphas.reshape(-1), dtype=start.dtype, device=start.device)
    points = start[None] + flat[:, None, None] * direction[None]
    _, grads = ctx.model.score_inputs(ctx.encoded, points, ctx.targets, grad=True, batch_size=ctx.batch_size)
    assert grads is not None  # (pieces * n, T, P, C)
    projected = (grads * direction[None, None].to(grads)).sum(-1)  # (pieces * n, T, P)
    projected = projected.reshape(*alphas.shape, *projected.shape[1:])  # (pieces, n, T, P)
    w = torch.as_tensor(weights, dtype=projected.dtype, device=projected.device)
    if w.dim() == 2:
        return torch.einsum("pn,pntq->ptq", w, projected)
    return torch.einsum("prn,pntq->prtq", w, projected)


def _end_values(ctx: Context, start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, _ = ctx.model.score_inputs(ctx.encoded, torch.stack([start, end]), ctx.targets, grad=False, batch_size=ctx.batch_size)
    values = values.double().cpu()
    return values[0], values[1]
