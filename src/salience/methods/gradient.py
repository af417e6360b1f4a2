"""Local gradient methods at the word-embedding layer: gradient, input x gradient, SmoothGrad,
GradientSHAP. Token scores sum the per-dimension scores over the embedding dimension."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.registry import register
from salience.methods.base import Attribution, Context, token_attribution


def gradient_at_input(ctx: Context) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Word embeddings x (T, D), the target's output F(x) and dF/dx (T, D): from the context when the
    prediction pass computed them, else by one forward + backward pass."""
    x, _ = ctx.model.embedding_path_ends(ctx.encoded, "zero")
    if ctx.input_gradient is not None:
        value, gradient = ctx.input_gradient
        return x, value, gradient
    values, grads = ctx.model.score_embeddings(ctx.encoded, x[None], ctx.target, grad=True, batch_size=ctx.batch_size)
    assert grads is not None
    return x, float(values[0]), grads[0]


@register("saliency", aliases=("gradient", "grad"), kind="gradient", cost="1 forward + 1 backward",
          summary="Gradient of the output w.r.t. each token's embedding (L1 norm by default)")
@dataclass
class Saliency:
    """Token score = sum over embedding dims of |dF/de| (``abs=True``, unsigned, as Captum's
    Saliency) or of dF/de (``abs=False``). Units: output per unit of embedding. No baseline."""

    abs: bool = True
    uses_input_gradient: ClassVar[bool] = True

    def attribute(self, ctx: Context) -> Attribution:
        _, value, gradient = gradient_at_input(ctx)
        per_dim = gradient.abs() if self.abs else gradient
        return token_attribution(per_dim.sum(-1), ctx, output_value=value)


@register("input_x_gradient", aliases=("ixg", "inputxgradient", "gradient_x_input"), kind="gradient",
          cost="1 forward + 1 backward", summary="Embedding times gradient, summed over dimensions (signed)")
@dataclass
class InputXGradient:
    """Token score = sum_d e_d * dF/de_d (signed; a first-order estimate of the output change when
    the embedding is set to zero)."""

    uses_input_gradient: ClassVar[bool] = True

    def attribute(self, ctx: Context) -> Attribution:
        x, value, gradient = gradient_at_input(ctx)
        return token_attribution((x * gradient).sum(-1), ctx, output_value=value)


@register("smoothgrad", aliases=("smooth_grad", "sg"), kind="gradient", cost="n_samples forward + backward",
          summary="Gradient averaged over Gaussian-noised copies of the embeddings")
@dataclass
class SmoothGrad:
    """Mean over ``n_samples`` noisy embeddings (noise std = ``noise_level`` x (max - min) of the
    input's embedding values, as in the SmoothGrad paper) of the per-dimension gradient, |.|
    first when ``abs`` (Captum's NoiseTunnel over Saliency), then summed over dimensions."""

    n_samples: int = 20
    noise_level: float = 0.1
    abs: bool = True

    def attribute(self, ctx: Context) -> Attribution:
        x, _ = ctx.model.embedding_path_ends(ctx.encoded, "zero")
        std = self.noise_level * float(x.max() - x.min())
        noise = torch.randn((self.n_samples, *x.shape), generator=ctx.generator(), dtype=torch.float64).to(x)
        _, grads = ctx.model.score_embeddings(ctx.encoded, x[None] + std * noise, ctx.target, grad=True, batch_size=ctx.batch_size)
        assert grads is not None
        per_dim = (grads.abs() if self.abs else grads).mean(0)
        return token_attribution(per_dim.sum(-1), ctx)


@register("gradient_shap", aliases=("gradshap", "gshap", "expected_gradients"), kind="gradient",
          cost="n_samples forward + backward", summary="Expected gradients: IG points at random alphas and noisy baselines")
@dataclass
class GradientShap:
    """Monte-Carlo estimate of expected gradients: mean over samples of
    dF/de(b + a (x - b)) * (x - b), a ~ U(0, 1), b = the named ``baseline`` embedding plus Gaussian
    noise of std ``stdev``; summed over dimensions. ``delta`` = sum of scores - (F(x) - mean F(b))."""

    n_samples: int = 20
    baseline: str = "mask"
    stdev: float = 0.0

    def attribute(self, ctx: Context) -> Attribution:
        x, x0 = ctx.model.embedding_path_ends(ctx.encoded, self.baseline)
        generator = ctx.generator()
        alphas = torch.rand(self.n_samples, generator=generator, dtype=torch.float64).to(x)[:, None, None]
        movable = (~ctx.encoded.special).to(x.device)[None, :, None]
        noise = torch.randn((self.n_samples, *x.shape), generator=generator, dtype=torch.float64).to(x)
        baselines = x0[None] + self.stdev * noise * movable
        points = baselines + alphas * (x[None] - baselines)
        _, grads = ctx.model.score_embeddings(ctx.encoded, points, ctx.target, grad=True, batch_size=ctx.batch_size)
        ends, _ = ctx.model.score_embeddings(ctx.encoded, torch.cat([x[None], baselines]), ctx.target, grad=False,
                                             batch_size=ctx.batch_size)
        assert grads is not None
        token_scores = (grads * (x[None] - baselines)).mean(0).sum(-1)
        output, reference = float(ends[0]), float(ends[1:].mean())
        return token_attribution(token_scores, ctx, output_value=output, baseline_value=reference,
                                 delta=float(token_scores.sum()) - (output - reference))
