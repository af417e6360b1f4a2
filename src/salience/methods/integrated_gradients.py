"""Integrated Gradients in the adapter's attribution space (word embeddings, normalised pixels)."""

from __future__ import annotations

from dataclasses import dataclass

from salience.core.registry import register
from salience.methods.base import Attribution, Context, as_array, position_attribution
from salience.methods.path import adaptive_path_integral, fixed_path_integral


@register("integrated_gradients", aliases=("ig", "integratedgradients"), kind="gradient",
          cost="steps forward + backward per target (adaptive: as many as the tolerance needs) + 2 forward",
          summary="Path integral of gradients from a baseline to the input (per-feature error bound and completeness delta reported)")
@dataclass
class IntegratedGradients:
    """Position score = sum_c (x - x')_c * integral_0^1 dF/dx_c(x' + a (x - x')) da, with x' the
    ``baseline`` (text: non-special tokens replaced by the [PAD] embedding by default; images: the
    adapter's default); feature scores sum their positions. Scores sum to F(x) - F(x') up to
    ``delta``, which is always reported.

    ``steps=None`` (default) integrates adaptively: ``pieces`` equal pieces, each with a
    Gauss-Kronrod 7/15 pair (15 gradients), each target bisecting its own pieces where its
    per-feature error bound |K15 - G7| (see ``salience.methods.path.kronrod_estimate``) is
    largest, until every feature's bound and the completeness delta are within ``tolerance`` x
    the largest |feature score| of its target (or ``atol`` when that is larger), or ``max_steps``
    gradients of a target are spent (then a warning). ``steps_used`` is the most gradients any
    target took (with several targets, ``steps_per_target`` lists each; the forward pass of a path
    point is shared by the targets that need it). The largest per-feature bound is reported per
    target as ``error_bound`` in params (output units). It bounds the quadrature error of any
    integrand that the 15 nodes resolve; a peak narrower than the nodes' spacing can escape every
    node of a piece, which the delta check catches when it carries more than the allowance (the
    target then bisects first where the other targets refined, then its widest pieces).
    An integer ``steps`` uses one fixed ``rule`` (gausslegendre, riemann_left/right/middle/trapezoid).
    """

    baseline: str | None = None
    steps: int | None = None
    rule: str = "gausslegendre"
    tolerance: float = 0.01
    atol: float = 1e-5
    pieces: int = 2
    max_steps: int = 600

    def attribute(self, ctx: Context) -> Attribution:
        baseline = ctx.baseline(self.baseline, "pad", perturbation=False)
        x, x0 = ctx.model.input_and_baseline(ctx.encoded, baseline)
        if self.steps is None:
            result = adaptive_path_integral(ctx, x0, x, pieces=self.pieces, tolerance=self.tolerance, atol=self.atol,
                                            max_steps=self.max_steps)
        else:
            result = fixed_path_integral(ctx, x0, x, self.rule, self.steps)
        gap = result.end_value - result.start_value  # (T,)
        delta = result.position_scores.double().cpu().sum(-1) - gap
        warnings = []
        details: dict[str, object] = {"steps_used": result.steps, "baseline": baseline}
        if result.steps_per_target is not None and len(result.steps_per_target) > 1:
            details["steps_per_target"] = result.steps_per_target
        if result.error_bound is not None:
            worst = result.error_bound.max(-1)
            details["error_bound"] = worst.tolist() if len(worst) > 1 else float(worst[0])
            if not result.converged:
                warnings.append(f"adaptive integration stopped at max_steps={self.max_steps} with a per-feature error bound "
                                f"up to {worst.max():.3g} and a completeness delta up to {float(delta.abs().max()):.3g} "
                                f"(tolerance {self.tolerance} of the largest score)")
        else:
            bad = (delta.abs() > (0.05 * gap.abs()).clamp(min=self.atol)).nonzero().reshape(-1)
            if len(bad):
                t = int(bad[0])
                warnings.append(f"completeness delta {float(delta[t]):.3g} is {abs(float(delta[t])) / max(abs(float(gap[t])), 1e-12):.0%}"
                                f" of F(x) - F(baseline) = {float(gap[t]):.3g}; use more steps or steps=None (adaptive)")
        return position_attribution(result.position_scores, ctx, output_value=as_array(result.end_value),
                                    baseline_value=as_array(result.start_value), delta=as_array(delta),
                                    warnings=warnings, details=details)
