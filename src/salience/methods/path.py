"""Path integrals of gradients along straight lines in embedding space, fixed or adaptive.

Along x(a) = start + a (end - start), the integral of dF/dx . (end - start) over [a, b] equals
F(x(b)) - F(x(a)) exactly. The adaptive integrator uses that identity on each sub-interval: it
measures each piece's quadrature error with two forward passes, and bisects the pieces with the
largest error until the summed absolute error is within tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from salience.methods.base import Context
from salience.methods.quadrature import quadrature


@dataclass
class PathResult:
    """Per-dimension attributions (T, D), F at both ends, gradient evaluations used, and the summed
    absolute error of the pieces (adaptive) or None (fixed rule)."""

    per_dim: torch.Tensor
    start_value: float
    end_value: float
    steps: int
    error_bound: float | None = None
    converged: bool = True


def fixed_path_integral(ctx: Context, start: torch.Tensor, end: torch.Tensor, rule: str, steps: int) -> PathResult:
    """Integrate with one quadrature ``rule`` of ``steps`` points over [0, 1]."""
    alphas, weights = quadrature(rule, steps)
    contribution = _pieces(ctx, start, end, alphas[None], weights[None])[0]
    ends, _ = ctx.model.score_embeddings(ctx.encoded, torch.stack([start, end]), ctx.target, grad=False, batch_size=ctx.batch_size)
    return PathResult(contribution, float(ends[0]), float(ends[1]), steps)


def adaptive_path_integral(ctx: Context, start: torch.Tensor, end: torch.Tensor, *, rule: str, nodes: int,
                           pieces: int, tolerance: float, atol: float, max_steps: int) -> PathResult:
    """Start from ``pieces`` equal pieces of ``nodes`` points each; bisect the pieces with the
    largest error until sum |error| <= max(tolerance * |F(end) - F(start)|, atol)."""
    base_alphas, base_weights = quadrature(rule, nodes)
    values: dict[float, float] = {}
    breaks = [i / pieces for i in range(pieces + 1)]
    _evaluate_points(ctx, start, end, breaks, values)
    gap = values[1.0] - values[0.0]
    allowed = max(tolerance * abs(gap), atol)
    integrated: dict[tuple[float, float], tuple[torch.Tensor, float]] = {}  # piece -> (contribution, error)
    pending = list(zip(breaks[:-1], breaks[1:]))
    steps = 0
    while True:
        lows = np.array([a for a, _ in pending])
        widths = np.array([b - a for a, b in pending])
        contributions = _pieces(ctx, start, end, lows[:, None] + widths[:, None] * base_alphas, widths[:, None] * base_weights)
        steps += len(pending) * nodes
        for (a, b), contribution in zip(pending, contributions):
            integrated[(a, b)] = (contribution, float(contribution.sum()) - (values[b] - values[a]))
        errors = {piece: abs(err) for piece, (_, err) in integrated.items()}
        bound = sum(errors.values())
        worst = max(errors.values())
        to_split = [piece for piece, err in errors.items() if err >= 0.5 * worst]
        if bound <= allowed or steps + 2 * nodes * len(to_split) > max_steps:
            break
        _evaluate_points(ctx, start, end, [(a + b) / 2 for a, b in to_split], values)
        pending = []
        for a, b in to_split:
            del integrated[(a, b)]
            pending += [(a, (a + b) / 2), ((a + b) / 2, b)]
    per_dim = torch.stack([c for c, _ in integrated.values()]).sum(0)
    return PathResult(per_dim, values[0.0], values[1.0], steps, bound, bound <= allowed)


def _pieces(ctx: Context, start: torch.Tensor, end: torch.Tensor, alphas: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """For each row of ``alphas``/``weights`` (P, n): sum_k w_k dF/dx(x(a_k)) * (end - start), (P, T, D)."""
    direction = end - start
    flat = torch.as_tensor(alphas.reshape(-1), dtype=start.dtype, device=start.device)
    points = start[None] + flat[:, None, None] * direction[None]
    _, grads = ctx.model.score_embeddings(ctx.encoded, points, ctx.target, grad=True, batch_size=ctx.batch_size)
    assert grads is not None
    w = torch.as_tensor(weights, dtype=grads.dtype, device=grads.device)
    grads = grads.reshape(*alphas.shape, *grads.shape[1:])
    return torch.einsum("pn,pntd->ptd", w, grads) * direction[None].to(grads)


def _evaluate_points(ctx: Context, start: torch.Tensor, end: torch.Tensor, alphas: list[float], into: dict[float, float]) -> None:
    flat = torch.tensor(alphas, dtype=start.dtype, device=start.device)
    points = start[None] + flat[:, None, None] * (end - start)[None]
    values, _ = ctx.model.score_embeddings(ctx.encoded, points, ctx.target, grad=False, batch_size=ctx.batch_size)
    into.update({a: float(v) for a, v in zip(alphas, values)})
