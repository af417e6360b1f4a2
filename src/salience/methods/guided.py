"""Gradients with modified ReLU backward rules: guided backpropagation, deconvnet and Guided
Grad-CAM (guided backpropagation times the Grad-CAM map). The rules live in
:mod:`salience.methods.rules`; they apply to every ReLU-family unit (ReLU, ReLU6, Hardtanh(0, m);
modules, functional and in-place forms) of the forward pass, nothing else, and are removed when
the pass ends (also on an error).

Unlike Captum's GuidedBackprop and Deconvolution, which hook ``nn.ReLU`` modules only, ReLU6
(MobileNet, EfficientNet-Lite) and functional ReLUs are guided too; on a model made of
``nn.ReLU`` modules the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.registry import get_method, register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, as_array, position_attribution
from salience.methods.rules import ClampRule, deconvnet_rule, guided_rule, relu_rules
from salience.methods.sharing import SharedInputs


def rule_gradient(ctx: Context, rule: ClampRule, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every target's output at the input (T,) and its gradient w.r.t. the input (T, P, C), with
    every ReLU-family unit back-propagating by ``rule``: one forward + backward row per target."""
    return rule_gradients([ctx], rule, method)[0]


def rule_gradients(contexts: list[Context], rule: ClampRule, method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`rule_gradient` of each context: one context with its T targets, or several of one
    grid with one target each, their images in one batch, each row read for its own target (the
    adapter's paired scoring). A model with no ReLU-family unit on the gradient path is refused
    (the rule would change nothing, and the result would be the plain gradient under another
    method's name)."""
    first = contexts[0]
    rows = torch.stack([ctx.model.input_and_baseline(ctx.encoded, "zero")[0] for ctx in contexts])
    paired = len(contexts) > 1
    targets = [ctx.targets[0] for ctx in contexts] if paired else first.targets
    options = {"paired": True} if paired else {}
    with relu_rules(rule) as mode:
        values, gradients = first.model.score_inputs(first.encoded, rows, targets, grad=True, batch_size=first.batch_size,
                                                     **options)
    if mode.applied == 0:
        raise ParameterError(f"{method} needs ReLU-family units (ReLU, ReLU6, F.relu, ...) between the input and the output, "
                             f"and {first.model.name} has none on its gradient path; "
                             "for its plain gradient use method='saliency', abs=False")
    assert gradients is not None  # (1, T, P, C), or paired (N, P, C)
    if not paired:
        return [(values[0], gradients[0])]
    return [(values[i:i + 1], gradients[i:i + 1]) for i in range(len(contexts))]


@dataclass
class _RuleGradient(SharedInputs):
    """Shared body of guided backpropagation and deconvnet: the rule's gradient per channel, summed
    over channels (of |.| with ``abs``). Several images of one grid (one target each) share one
    forward + backward call."""

    abs: bool = False
    rule: ClassVar[ClampRule]
    method: ClassVar[str]

    def attribute(self, ctx: Context) -> Attribution:
        return self.attribute_together([ctx])[0]

    def attribute_together(self, contexts: list[Context]) -> list[Attribution]:
        found = rule_gradients(contexts, type(self).rule, self.method)
        return [self._finish(ctx, values, per_channel) for ctx, (values, per_channel) in zip(contexts, found, strict=True)]

    def _finish(self, ctx: Context, values: torch.Tensor, per_channel: torch.Tensor) -> Attribution:
        summed = (per_channel.abs() if self.abs else per_channel).sum(-1)
        return position_attribution(summed, ctx, output_value=as_array(values), extras={"_per_channel": as_array(per_channel)})


@register("guided_backprop", aliases=("guided_backpropagation", "gbp", "guided_bp"), kind="gradient",
          cost="1 forward + 1 backward per target",
          summary="Gradient where ReLU-family units pass only positive gradient, only where active (Springenberg et al. 2015)")
@dataclass
class GuidedBackprop(_RuleGradient):
    """Guided backpropagation: the gradient of the output w.r.t. the input (normalised pixels,
    word embeddings), except that every ReLU-family unit passes back only the positive part of its
    incoming gradient, and only where it was active in the forward pass (ReLU: x > 0; ReLU6:
    0 < x < 6). Per channel it equals Captum's GuidedBackprop on a model whose ReLUs are
    ``nn.ReLU`` modules; Captum leaves ReLU6 and functional ReLUs unguided, Salience guides them.
    Position score = sum over channels (signed; of |.| with ``abs=True``); the per-channel map
    (T, P, C) is in ``extras["_per_channel"]`` (in memory). Units: output per unit of input. No
    baseline. Models without a ReLU-family unit are refused."""

    rule: ClassVar[ClampRule] = guided_rule
    method: ClassVar[str] = "guided_backprop"


@register("deconvnet", aliases=("deconvolution", "deconv"), kind="gradient", cost="1 forward + 1 backward per target",
          summary="Gradient where ReLU-family units pass only positive gradient, whatever their input (Zeiler & Fergus 2014)")
@dataclass
class Deconvnet(_RuleGradient):
    """Deconvnet: the gradient of the output w.r.t. the input, except that every ReLU-family unit
    passes back the positive part of its incoming gradient whatever its forward input was (Captum's
    Deconvolution on ``nn.ReLU`` modules; here also ReLU6 and functional ReLUs). Position score =
    sum over channels (signed; of |.| with ``abs=True``); per-channel map in
    ``extras["_per_channel"]``. No baseline. Models without a ReLU-family unit are refused."""

    rule: ClassVar[ClampRule] = deconvnet_rule
    method: ClassVar[str] = "deconvnet"


@register("guided_gradcam", aliases=("guided_grad_cam", "ggcam"), kind="cam",
          cost="2 forward + 2 backward per target (Grad-CAM's pass and guided backprop's)",
          summary="Guided backpropagation per channel times the upsampled Grad-CAM map (Selvaraju et al. 2017)")
@dataclass
class GuidedGradCAM:
    """Guided Grad-CAM: per channel, the guided-backpropagation gradient times the Grad-CAM map of
    ``layer`` (ReLU applied, not normalised) upsampled to the input grid (``upsample``: "bilinear",
    Salience's Grad-CAM default, or "nearest", Captum's GuidedGradCam default); summed over
    channels for the position score (signed; of |.| with ``abs=True``). The Grad-CAM part is the
    registered ``grad_cam`` method (ordinary gradients); the guided part applies the guided rule to
    every ReLU-family unit. Equals Captum's GuidedGradCam with the same layer and interpolation.
    Per-channel map in ``extras["_per_channel"]``, the raw Grad-CAM map in ``extras["cam"]``.
    Units: output per unit of input times Grad-CAM's (output per unit of activation times
    activation). Models without a ReLU-family unit are refused."""

    layer: str | None = None
    upsample: str = "bilinear"
    abs: bool = False
    needs: ClassVar[tuple[str, ...]] = ("layer_maps",)

    def attribute(self, ctx: Context) -> Attribution:
        cam = get_method("grad_cam").build({"layer": self.layer, "relu": True, "upsample": self.upsample, "normalise": "none"})
        maps = cam.attribute(ctx)
        assert maps.position_scores is not None  # (T, P)
        values, guided = rule_gradient(ctx, guided_rule, "guided_gradcam")
        per_channel = guided * torch.as_tensor(maps.position_scores).to(guided)[..., None]
        summed = (per_channel.abs() if self.abs else per_channel).sum(-1)
        return position_attribution(summed, ctx, output_value=as_array(values), details=maps.details,
                                    extras={**maps.extras, "_per_channel": as_array(per_channel)})
