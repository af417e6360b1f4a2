"""Integrated Gradients at the word-embedding layer."""

from __future__ import annotations

from dataclasses import dataclass

from salience.core.registry import register
from salience.methods.base import Attribution, Context, token_attribution
from salience.methods.path import adaptive_path_integral, fixed_path_integral


@register("integrated_gradients", aliases=("ig", "integratedgradients"), kind="gradient",
          cost="steps forward + backward (adaptive: as many as the tolerance needs) + 2 forward",
          summary="Path integral of gradients from a baseline to the input (completeness delta reported)")
@dataclass
class IntegratedGradients:
    """Token score = sum_d (x - x')_d * integral_0^1 dF/dx_d(x' + a (x - x')) da, with x' the
    ``baseline`` input (non-special tokens replaced; special tokens kept). Scores sum to
    F(x) - F(x') up to ``delta``, which is always reported.

    ``steps=None`` (default) integrates adaptively: starting from ``pieces`` equal pieces, each
    integrated with ``nodes`` Gauss-Legendre points, the pieces are bisected where the integrand
    changes until the summed absolute error of the pieces (each exact, from two forward passes) is
    within ``tolerance`` x |F(x) - F(x')|, or ``atol`` when that is larger (a gap near 0), or
    ``max_steps`` gradients are spent (then a warning). An integer ``steps`` uses one fixed
    ``rule`` (gausslegendre, riemann_left/right/middle/trapezoid).
    """

    baseline: str = "pad"
    steps: int | None = None
    rule: str = "gausslegendre"
    tolerance: float = 0.01
    atol: float = 1e-4
    nodes: int = 8
    pieces: int = 2
    max_steps: int = 512

    def attribute(self, ctx: Context) -> Attribution:
        x, x0 = ctx.model.embedding_path_ends(ctx.encoded, self.baseline)
        if self.steps is None:
            result = adaptive_path_integral(ctx, x0, x, rule=self.rule, nodes=self.nodes, pieces=self.pieces,
                                            tolerance=self.tolerance,
                                            atol=self.atol, max_steps=self.max_steps)
        else:
            result = fixed_path_integral(ctx, x0, x, self.rule, self.steps)
        token_scores = result.per_dim.sum(-1)
        gap = result.end_value - result.start_value
        delta = float(token_scores.sum()) - gap
        warnings = []
        if not result.converged:
            warnings.append(f"adaptive integration stopped at max_steps={self.max_steps} with error bound "
                            f"{result.error_bound:.3g} (tolerance {self.tolerance} of |gap| {abs(gap):.3g})")
        elif self.steps is not None and abs(delta) > max(0.05 * abs(gap), self.atol):
            warnings.append(f"completeness delta {delta:.3g} is {abs(delta) / max(abs(gap), 1e-12):.0%} of "
                            f"F(x) - F(baseline) = {gap:.3g}; use more steps or steps=None (adaptive)")
        return token_attribution(token_scores, ctx, output_value=result.end_value, baseline_value=result.start_value,
                                 delta=delta, warnings=warnings, details={"steps_used": result.steps})
