"""Layer-wise relevance propagation (Bach et al. 2015) with composable rules, as zennit: a
composite (:mod:`salience.methods.lrp_composites`) picks each linear layer's rule
(:mod:`salience.methods.lrp_rules`), batch norm is merged into the preceding layer, residual sums
split relevance in proportion, activations pass it through; all as a modified gradient
(:mod:`salience.methods.lrp_mode`), so one forward + one backward row per target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, as_array, position_attribution
from salience.methods.deeplift import check_logit_targets
from salience.methods.lrp_composites import Composite, parse_composite
from salience.methods.lrp_mode import LRPMode, predict_in_mode, run_with_copies_if_needed, sums_tensor
from salience.methods.lrp_rules import STABILISER
from salience.methods.sharing import SharedInputs

OUTPUT_RELEVANCE = ("logit", "one")
LOST_WARNING = 1e-6  # relative share of relevance on zero-valued inputs that is worth a warning


@dataclass
class _Recorded:
    """What LRP's own prediction pass leaves for :meth:`LRP.attribute`."""

    mode: LRPMode
    composite: Composite
    bounds: tuple[torch.Tensor, torch.Tensor] | None


def _channel_values(value: Any, channels: int, name: str, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=like.dtype).flatten()
    if tensor.numel() == 1:
        return tensor.expand(channels).clone()
    if tensor.numel() != channels:
        raise ParameterError(f"lrp: {name} must be a number or one value per channel ({channels}), got {tensor.numel()} values")
    return tensor


@register("lrp", aliases=("layerwise_relevance_propagation", "layer_wise_relevance_propagation"), kind="gradient",
          cost="1 forward + 1 backward per target",
          summary="Layer-wise relevance propagation with zennit-style composites of rules (Bach et al. 2015; Montavon et al. 2019)")
@dataclass
class LRP(SharedInputs):
    """Layer-wise relevance propagation. Position score = sum over channels of the relevance of
    each input value (normalised pixels; per channel in ``extras["_per_channel"]``). Signed:
    positive = evidence for the target. The relevance at the output is the target's logit
    (``output_relevance="logit"``; ``"one"`` divides by it, so scores are shares of 1). Units:
    logits. Each linear layer takes the rule its ``composite`` gives it: a named composite
    (``epsilon``, ``epsilon_plus`` = z^B input layer, z+ convolutions, epsilon dense layers (the
    default), ``epsilon_plus_flat``, ``epsilon_gamma_box``, ``epsilon_alpha2_beta1``) or a mapping of
    module names, class names or kinds (input, conv, linear, batch_norm, avg_pool) to rules, e.g.
    ``{"base": "epsilon_plus", "Linear": "epsilon", "features.0": ("gamma", {"gamma": 0.5})}``.
    ``eps``: epsilon of the epsilon rule (default 0: LRP-0, which per unit of input is each layer's
    own gradient and runs as the plain call); ``gamma``: of the gamma rule; ``low``/``high``: z^B's
    bounds (numbers or one per channel; default: the normalised black and white levels of the input,
    else its per-channel minimum and maximum). Batch norm is merged into the preceding conv/linear
    layer (``merge_batch_norm``). Conservation: ``extras["conservation"]`` per target (output,
    sum of relevance, error); rules with biases (epsilon, gamma) and a stabiliser do not conserve
    exactly. ``stabiliser``: e in the denominators z + e sign(z) of the rules other than
    epsilon (z+, alpha-beta, gamma, flat, w-square, z^B); residual sums need none (per unit of
    input their proportional split is their gradient). ``trace``: record every rule layer's
    relevance at its output and input per target (``extras["_layers"]``, for checking
    conservation layer by layer); it costs a few passes over each layer's tensors (7% of
    EfficientNet-Lite0's time with ``epsilon_plus``). Untraced, the relevance that flat, w-square
    and z^B put on inputs equal to 0 (lost: a warning) is still counted. Explains logits only. No
    baseline (z^B's bounds play that part at the input layer)."""

    composite: Any = "epsilon_plus"
    eps: float = 0.0
    gamma: float = 0.25
    low: Any = None
    high: Any = None
    merge_batch_norm: bool = True
    output_relevance: str = "logit"
    stabiliser: float = STABILISER
    trace: bool = False
    default_output: ClassVar[str] = "logit"

    uses_input_gradient: ClassVar[bool] = True  # the prediction pass is LRP's own (input_gradient_pass)

    def attribute(self, ctx: Context) -> Attribution:
        return self._run([ctx], paired=False)[0]

    def attribute_together(self, contexts: list[Context]) -> list[Attribution]:
        if all(isinstance(ctx.input_gradient_state, _Recorded) for ctx in contexts) or self._own_bounds(contexts):
            # each prediction pass was LRP's; or z^B's default bounds differ between the images, and
            # one shared pass would take them over the whole group (an image's map would depend on the others)
            return [self._run([ctx], paired=False)[0] for ctx in contexts]
        return self._run(contexts, paired=True)

    def _own_bounds(self, contexts: list[Context]) -> bool:
        """Whether z^B takes its bounds from the inputs and they are not the same for every context."""
        if self.low is not None or self.high is not None or not parse_composite(self.composite).uses("zbox"):
            return False
        found = [self._bounds([ctx.encoded], ctx.model.input_and_baseline(ctx.encoded, "zero")[0][None]) for ctx in contexts]
        return any(not (torch.equal(low, found[0][0]) and torch.equal(high, found[0][1])) for low, high in found[1:])

    def input_gradient_pass(self, model: Any, encoded: Any, resolve: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor, object]:
        """The prediction pass run in LRP mode (one forward + one backward for the prediction, its
        target's logit and the relevance per unit of input); the state goes to :meth:`attribute`."""
        composite = self._composite()
        inputs = model.input_and_baseline(encoded, "zero")[0]
        bounds = self._bounds([encoded], inputs[None]) if composite.uses("zbox") else None
        *found, mode = predict_in_mode(model, encoded, resolve, "lrp", lambda copy: self._mode(composite, bounds, copy))
        return (*found, _Recorded(mode, composite, bounds))  # type: ignore[return-value]

    def _composite(self) -> Composite:
        if self.output_relevance not in OUTPUT_RELEVANCE:
            raise ParameterError(f"lrp: output_relevance must be one of {', '.join(OUTPUT_RELEVANCE)}, got {self.output_relevance!r}")
        if self.eps < 0 or self.gamma < 0:
            raise ParameterError(f"lrp: eps and gamma must be >= 0, got eps={self.eps}, gamma={self.gamma}")
        return parse_composite(self.composite)

    def _mode(self, composite: Composite, bounds: tuple[torch.Tensor, torch.Tensor] | None, copy_outputs: bool) -> LRPMode:
        return LRPMode(composite, eps=self.eps, gamma=self.gamma, bounds=bounds, merge_batch_norm=self.merge_batch_norm,
                       stabiliser=self.stabiliser, copy_outputs=copy_outputs, tracing=self.trace, count_lost=True)

    def _run(self, contexts: list[Context], *, paired: bool) -> list[Attribution]:
        first = contexts[0]
        inputs = [ctx.model.input_and_baseline(ctx.encoded, "zero")[0] for ctx in contexts]
        recorded = first.input_gradient_state
        if not paired and isinstance(recorded, _Recorded) and first.input_gradient is not None:
            mode, composite, bounds = recorded.mode, recorded.composite, recorded.bounds  # the prediction pass was LRP's
            values, gradients = (t[None] for t in first.input_gradient)  # (T,), (T, P, C) -> one input's (1, T), (1, T, P, C)
        else:
            composite = self._composite()
            for ctx in contexts:
                check_logit_targets(ctx.targets, "lrp")
            rows = torch.stack(inputs)
            bounds = self._bounds([ctx.encoded for ctx in contexts], rows) if composite.uses("zbox") else None
            targets = [ctx.targets[0] for ctx in contexts] if paired else first.targets
            options = {"paired": True} if paired else {}

            def run(copy_outputs: bool) -> tuple[LRPMode, torch.Tensor, torch.Tensor | None]:
                with self._mode(composite, bounds, copy_outputs) as mode:
                    found = first.model.score_inputs(first.encoded, rows, targets, grad=True, batch_size=first.batch_size,
                                                     **options)
                return mode, *found

            mode, values, found_gradients = run_with_copies_if_needed(run)
            assert found_gradients is not None
            gradients = found_gradients
        if mode.layers == 0:
            raise ParameterError(f"lrp found no convolution or linear layer on {first.model.name}'s gradient path (a TorchScript "
                                 "or compiled model, or custom kernels, are not seen); explain a plain nn.Module")
        if paired:  # (N,), (N, P, C) -> per context (1,), (1, P, C)
            values, gradients = values[:, None], gradients[:, None]
        details: dict[str, object] = {
            "composite": composite.name, "composite_rules": composite.describe(), "epsilon": self.eps, "gamma": self.gamma,
            "stabiliser": self.stabiliser,
            "rules": {kind: sorted(names) for kind, names in sorted(mode.rules.items())},
            "batch_norm_merged": mode.merged, "output_relevance": self.output_relevance, "traced": mode.tracing}
        if bounds is not None:
            details["bounds"] = {"low": bounds[0].tolist(), "high": bounds[1].tolist()}
        lost = float(sum(float(sums_tensor(t.lost).sum()) for t in mode.trace)
                     + sum(float(sums_tensor(sums).sum()) for sums in mode.lost))
        layers = [{"layer": t.layer, "rule": t.rule, "relevance_out": as_array(t.relevance_out),
                   "relevance_in": as_array(t.relevance_in)} for t in mode.trace]
        results = []
        for i, ctx in enumerate(contexts):
            per_channel = inputs[i][None] * gradients[i]  # (T, P, C)
            value = values[i].detach()
            if self.output_relevance == "one":
                per_channel = per_channel / value.to(per_channel)[:, None, None]
            totals = per_channel.double().sum((-1, -2)).cpu()
            reference = value.double().cpu() if self.output_relevance == "logit" else torch.ones_like(totals)
            conservation = [{"output": float(o), "relevance_sum": float(s), "error": float(s - o)}
                            for o, s in zip(reference, totals, strict=True)]
            warnings = []
            scale = float(per_channel.abs().sum()) or 1.0
            if abs(lost) > LOST_WARNING * scale:
                warnings.append(f"relevance {lost:.3g} fell on inputs equal to 0 (flat, w-square or z^B rules) and is "
                                "not in the scores")
            extras: dict[str, object] = {"conservation": conservation, "relevance_lost_at_zero_inputs": lost,
                                         "_per_channel": as_array(per_channel), "_layers": layers}
            results.append(position_attribution(per_channel.sum(-1), ctx, output_value=as_array(value), details=details,
                                                extras=extras, warnings=warnings))
        return results

    def _bounds(self, encoded: Sequence[Any], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of the input for z^B: given, else the inputs' black and white
        levels (their per-channel min and max when there are none), widened to hold the inputs."""
        channels = rows.shape[-1]
        lows, highs = [], []
        for item in encoded:
            levels = getattr(item, "levels", None)
            pixels = getattr(item, "pixels", None)
            if levels is not None and isinstance(pixels, torch.Tensor):
                low, high = levels.value_range(pixels)
                lows.append(low.reshape(channels, -1).amin(1))
                highs.append(high.reshape(channels, -1).amax(1))
        if self.low is not None or self.high is not None:
            if self.low is None or self.high is None:
                raise ParameterError("lrp: give both low= and high= for the z^B rule")
            low = _channel_values(self.low, channels, "low", rows)
            high = _channel_values(self.high, channels, "high", rows)
        elif lows:
            low, high = torch.stack(lows).amin(0).to(rows), torch.stack(highs).amax(0).to(rows)
        else:
            raise ParameterError("lrp: the z^B rule needs the input's bounds and this input has none: give low= and high= "
                                 "(or a composite without zbox, e.g. composite='epsilon'; for a transformer, "
                                 "method='attnlrp')")
        flat = rows.reshape(-1, channels)
        if bool((flat.amin(0) < low - 1e-6).any() or (flat.amax(0) > high + 1e-6).any()):
            raise ParameterError(f"lrp: the input lies outside z^B's bounds low={low.tolist()}, high={high.tolist()}")
        return low.detach().cpu(), high.detach().cpu()
