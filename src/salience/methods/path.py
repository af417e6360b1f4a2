"""Path integrals of gradients along straight lines in the attribution space, fixed or adaptive.

Along x(a) = start + a (end - start), the integral of dF/dx . (end - start) over [0, 1] equals
F(end) - F(start). The adaptive integrator integrates each piece of [0, 1] with a Gauss-Kronrod
7/15 pair: the 15 gradients of a piece give two estimates of every feature's share of the piece
(K15 and the embedded G7), and their difference bounds the error of the
K15 value (:func:`kronrod_estimate`: |K15 - G7|, a conservative bound on any piece whose nodes
resolve the integrand). Each target bisects its own pieces where its per-feature bounds are
largest until, for every feature, the summed bound is within tolerance of the target's largest
feature score, and so is the completeness delta (the safeguard against a narrow peak that every
node of a piece missed, which no bound sees): a target whose integrand is smooth stops early while
another refines around its peaks, and a point's forward pass serves every target that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from salience.core.target import Target
from salience.methods.base import Context
from salience.methods.quadrature import gauss_kronrod_15, quadrature


@dataclass
class PathResult:
    """Per-position attributions (T, P) (summed over channels), F of every target at both ends
    (T,), gradient evaluations used (the most any target used), and, for the adaptive rule, the
    per-feature error bound (T, F), whether every target met the tolerance, and the gradient
    evaluations of each target (T,)."""

    position_scores: torch.Tensor
    start_value: torch.Tensor
    end_value: torch.Tensor
    steps: int
    error_bound: np.ndarray | None = None
    converged: bool = True
    steps_per_target: list[int] | None = None


Piece = tuple[float, float]  # (a, b): a piece [a, b] of [0, 1]


def fixed_path_integral(ctx: Context, start: torch.Tensor, end: torch.Tensor, rule: str, steps: int) -> PathResult:
    """Integrate with one quadrature ``rule`` of ``steps`` points over [0, 1]."""
    alphas, weights = quadrature(rule, steps)
    contribution = _pieces(ctx, start, end, alphas[None], weights[None])[0]
    starts, ends = _end_values(ctx, start, end)
    return PathResult(contribution, starts, ends, steps)


def adaptive_path_integral(ctx: Context, start: torch.Tensor, end: torch.Tensor, *, pieces: int, tolerance: float,
                           atol: float, max_steps: int) -> PathResult:
    """Start every target from ``pieces`` equal pieces; each target bisects its own pieces (see
    :func:`_pieces_to_split`) until every feature's summed bound and the completeness delta are at
    most max(tolerance x max_f |score_t,f|, atol), or ``max_steps`` gradients of that target are
    spent. A path point's forward pass is shared by the targets that need it (one call per set of
    targets)."""
    alphas, kronrod, gauss = gauss_kronrod_15()
    nodes, count = len(alphas), len(ctx.targets)
    starts, ends = _end_values(ctx, start, end)
    # per target: piece -> (K15 feature integral (F,), its error bound (F,), K15 position integral (P,))
    integrated: list[dict[Piece, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [{} for _ in range(count)]
    pending: dict[Piece, list[int]] = {(i / pieces, (i + 1) / pieces): list(range(count)) for i in range(pieces)}
    spent = np.zeros(count, dtype=int)
    converged = np.zeros(count, dtype=bool)
    while pending:
        for which, group in _by_targets(pending).items():
            lows = np.array([a for a, _ in group])
            widths = np.array([b - a for a, b in group])
            targets = [ctx.targets[t] for t in which]
            per_node = _integrand(ctx, start, end, lows[:, None] + widths[:, None] * alphas, targets)  # (pieces, nodes, T', P)
            spent[list(which)] += len(group) * nodes
            for piece, width, values in zip(group, widths, per_node):
                features = ctx.features.aggregate(values.double().cpu())  # (nodes, T', F)
                integral, error = kronrod_estimate(features, float(width), kronrod, gauss)
                positions = torch.einsum("n,ntp->tp", torch.as_tensor(width * kronrod, dtype=values.dtype, device=values.device), values)
                for row, t in enumerate(which):
                    integrated[t][piece] = (integral[row], error[row], positions[row])
        breaks = [np.array(sorted({x for piece in parts for x in piece})) for parts in integrated]
        decisions = []
        for t, parts in enumerate(integrated):
            if converged[t]:  # its pieces no longer change
                decisions.append(([], False))
                continue
            others = np.concatenate([b for u, b in enumerate(breaks) if u != t] or [np.empty(0)])
            converged[t], split, blind = _pieces_to_split(parts, float(ends[t] - starts[t]),
                                                          float(starts[t].abs() + ends[t].abs()), tolerance, atol, others)
            decisions.append((split if spent[t] + 2 * nodes * len(split) <= max_steps else [], blind))
        # a blind search waits while another target still refines: where it refines shows where to look
        informed = any(split and not blind for split, blind in decisions)
        pending = {}
        for t, (split, blind) in enumerate(decisions):
            for a, b in split if not (blind and informed) else []:
                del integrated[t][(a, b)]
                for half in ((a, (a + b) / 2), ((a + b) / 2, b)):
                    pending.setdefault(half, []).append(t)
    position_scores = torch.stack([torch.stack([p for _, _, p in parts.values()]).sum(0) for parts in integrated])  # (T, P)
    bound = torch.stack([torch.stack([e for _, e, _ in parts.values()]).sum(0) for parts in integrated])  # (T, F)
    return PathResult(position_scores, starts, ends, int(spent.max()), bound.numpy(), bool(converged.all()), spent.tolist())


def _pieces_to_split(parts: dict[Piece, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], gap: float, scale: float,
                     tolerance: float, atol: float, others: np.ndarray) -> tuple[bool, list[Piece], bool]:
    """Whether one target's pieces meet the tolerance, and the pieces to bisect next. Met: every
    feature's summed bound, and the completeness delta |sum of scores - gap| (``gap`` = F(end) -
    F(start)), are at most max(tolerance x max_f |score_f|, atol) (the delta also at least the
    model dtype's rounding of ``scale`` = |F(start)| + |F(end)| and of the scores; the missing
    share may sit on one feature, so the delta gets one feature's allowance). To bisect: the
    pieces whose largest per-feature bound is at least half the largest of any piece. When every
    bound is met but the delta is not, a peak narrower than some piece's nodes holds the missing
    share: the targets of one path share its sharp transitions, so the pieces holding the most of
    the other targets' piece ends (``others``: where they refined) are bisected first, and the
    widest pieces when none holds any (a blind search, flagged by the third value)."""
    order = list(parts)
    scores = torch.stack([parts[piece][0] for piece in order]).sum(0)  # (F,)
    errors = torch.stack([parts[piece][1] for piece in order])  # (pieces, F)
    positions = torch.stack([parts[piece][2] for piece in order]).double().sum(0)  # (P,)
    allowed = max(tolerance * float(scores.abs().max()), atol)
    rounding = 16 * torch.finfo(parts[order[0]][2].dtype).eps * (scale + float(positions.abs().sum()))
    bounded = bool((errors.sum(0) <= allowed).all())
    closes = abs(float(positions.sum()) - gap) <= max(allowed, rounding)
    if bounded and closes:
        return True, [], False
    if not bounded:
        return False, _at_least_half_the_largest(order, errors.amax(1).numpy()), False
    inside = np.array([np.count_nonzero((others > a) & (others < b)) for a, b in order])
    if inside.max() > 0:
        return False, _at_least_half_the_largest(order, inside), False
    widest = max(b - a for a, b in order)
    return False, [(a, b) for a, b in order if b - a == widest], True


def _at_least_half_the_largest(order: list[Piece], values: np.ndarray) -> list[Piece]:
    """The pieces of ``order`` whose value (one per piece) is at least half the largest."""
    return [piece for piece, value in zip(order, values) if value >= 0.5 * values.max()]


def _by_targets(pending: dict[Piece, list[int]]) -> dict[tuple[int, ...], list[Piece]]:
    """Pending pieces grouped by the targets that need them, so each group is one call."""
    groups: dict[tuple[int, ...], list[Piece]] = {}
    for piece, targets in pending.items():
        groups.setdefault(tuple(targets), []).append(piece)
    return groups


def kronrod_estimate(values: torch.Tensor, width: float, kronrod: np.ndarray, gauss: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """K15 integral of ``values`` (nodes, ...) over a piece of ``width``, and |K15 - G7| as its
    error bound. |K15 - G7| estimates the error of the G7 value; K15, exact for polynomials of
    degree 22 against G7's 13, is far more accurate on any piece where G7 is already close, so the
    bound is conservative (on the zoo MiniLM's paths: 40-1000x the K15 error measured against a
    1024-node reference). QUADPACK's sharper-looking rule, resasc x (200 |K15 - G7| / resasc)^1.5,
    was tried and is *more* pessimistic for these integrands (it doubled the gradients spent)."""
    k = torch.as_tensor(width * kronrod, dtype=values.dtype)
    g = torch.as_tensor(width * gauss, dtype=values.dtype)
    integral = torch.tensordot(k, values, dims=1)
    return integral, (integral - torch.tensordot(g, values, dims=1)).abs()


def _integrand(ctx: Context, start: torch.Tensor, end: torch.Tensor, alphas: np.ndarray,
               targets: list[Target] | None = None) -> torch.Tensor:
    """dF_t/dx(x(a)) . (end - start), summed over channels, for ``targets`` (default: the context's)
    at every alpha of ``alphas`` (pieces, n): (pieces, n, T, P)."""
    direction = end - start
    flat = torch.as_tensor(alphas.reshape(-1), dtype=start.dtype, device=start.device)
    points = start[None] + flat[:, None, None] * direction[None]
    _, grads = ctx.model.score_inputs(ctx.encoded, points, ctx.targets if targets is None else targets, grad=True,
                                      batch_size=ctx.batch_size)
    assert grads is not None  # (pieces * n, T, P, C)
    projected = (grads * direction[None, None].to(grads)).sum(-1)  # (pieces * n, T, P)
    return projected.reshape(*alphas.shape, *projected.shape[1:])


def _pieces(ctx: Context, start: torch.Tensor, end: torch.Tensor, alphas: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """For each row of ``alphas``/``weights`` (pieces, n): sum_k w_k dF_t/dx(x(a_k)) . (end - start),
    summed over channels: (pieces, T, P)."""
    projected = _integrand(ctx, start, end, alphas)
    w = torch.as_tensor(weights, dtype=projected.dtype, device=projected.device)
    return torch.einsum("pn,pntq->ptq", w, projected)


def _end_values(ctx: Context, start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, _ = ctx.model.score_inputs(ctx.encoded, torch.stack([start, end]), ctx.targets, grad=False, batch_size=ctx.batch_size)
    values = values.double().cpu()
    return values[0], values[1]
