"""Class activation maps (CAM) of an inner layer: Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM,
Score-CAM and Ablation-CAM, on one shared core.

Each method reads a layer's output A (K channels on an h x w grid: a convolutional map, or the
patch tokens of a vision transformer, see :mod:`salience.models.layers`) through the adapter's
``layer_maps`` capability and combines its channels into one map per target,
cam_t = sum_k w_tk A_k (LayerCAM: an element-wise weight). The map at the layer's resolution,
before ReLU and normalisation, is kept in ``Explanation.extras["cam"]`` (T x h x w nested lists);
then ReLU (``relu``), ``normalise`` ("none"; "minmax": (c - min) / (max - min + 1e-7) per target,
as pytorch-grad-cam; "max": c / (max |c| + 1e-7)) and ``upsample`` to the input grid ("bilinear",
align_corners=False, or "nearest") give the position scores; a feature's score is the sum of its
positions' scores. The layer used is recorded in ``params["layer"]``.

The explained output is the user's ``output`` (a classifier's default is the log-odds; the CAM
papers and pytorch-grad-cam explain the logit: pass ``output="logit"`` for theirs). Units: output
per unit of activation, times activation (Grad-CAM family); output-weighted activations (Score-
and Ablation-CAM). Unsigned after the default ReLU; ``relu=False`` keeps the sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from salience.core.batching import map_batches
from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, as_array, position_attribution
from salience.methods.sharing import SharedInputs
from salience.models.layers import LayerMaps

UPSAMPLING = ("bilinear", "nearest")
NORMALISATIONS = ("none", "minmax", "max")
NORMALISE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image
GRADCAM_PP_EPS = 1e-6  # pytorch-grad-cam's GradCAMPlusPlus
XGRADCAM_EPS = 1e-7  # pytorch-grad-cam's XGradCAM
SCORECAM_EPS = 1e-8  # pytorch-grad-cam's ScoreCAM (per-channel min-max of the upsampled maps)
MASKS_PER_CHUNK_POSITIONS = 64 * 224 * 224  # Score-CAM builds masked rows 64 images of 224 x 224 at a time
CAM_SUFFIX = "(a layer's channels weighted into one map, upsampled to the input)"


@dataclass(frozen=True)
class Reading:
    """One input's layer: activations A (K, h, w), gradients g = dy_t / dA (T, K, h, w) or None,
    outputs y (T,), the layer's name and the input grid (H, W)."""

    activations: torch.Tensor
    gradients: torch.Tensor | None
    outputs: torch.Tensor
    layer: str
    grid: tuple[int, int]


@dataclass
class CAM(SharedInputs):
    """The shared core: read the layer (with gradients when ``gradients``), weigh its channels
    (:meth:`combine`, one map per target), then ReLU, normalise and upsample. Several images of
    one grid with one target each are read in shared model calls (:meth:`attribute_together`:
    one forward pass of N rows, one backward pass from the output to the layer)."""

    layer: str | None = None
    relu: bool = True
    upsample: str = "bilinear"
    normalise: str = "none"
    needs: ClassVar[tuple[str, ...]] = ("layer_maps",)
    gradients: ClassVar[bool] = True

    def attribute(self, ctx: Context) -> Attribution:
        self._check()
        x, _ = ctx.model.input_and_baseline(ctx.encoded, "zero")
        maps = ctx.model.layer_maps(ctx.encoded, x[None], ctx.targets, self.layer, grad=self.gradients,  # type: ignore[attr-defined]
                                    batch_size=ctx.batch_size)
        return self._finish(ctx, reading(maps, 0))

    def attribute_together(self, contexts: list[Context]) -> list[Attribution]:
        """The layer read on every context's image in one batch, each for its own target (the
        adapter's paired layer maps); then each map is combined as by :meth:`attribute`."""
        self._check()
        first = contexts[0]
        rows = torch.stack([ctx.model.input_and_baseline(ctx.encoded, "zero")[0] for ctx in contexts])
        maps = first.model.layer_maps(first.encoded, rows, [ctx.targets[0] for ctx in contexts], self.layer,  # type: ignore[attr-defined]
                                      grad=self.gradients, batch_size=first.batch_size, paired=True)
        return [self._finish(ctx, reading(maps, i)) for i, ctx in enumerate(contexts)]

    def _check(self) -> None:
        if self.upsample not in UPSAMPLING:
            raise ParameterError(f"unknown upsample {self.upsample!r}; choose one of {', '.join(UPSAMPLING)}")
        if self.normalise not in NORMALISATIONS:
            raise ParameterError(f"unknown normalise {self.normalise!r}; choose one of {', '.join(NORMALISATIONS)}")

    def _finish(self, ctx: Context, reading: Reading) -> Attribution:
        """The map of ``reading`` combined, ReLU'd, normalised and upsampled into position scores."""
        cam, details = self.combine(ctx, reading)  # (T, h, w)
        shown = cam.clamp(min=0) if self.relu else cam
        scores = upsample(normalise(shown, self.normalise), reading.grid, self.upsample)
        return position_attribution(scores.reshape(len(ctx.targets), -1), ctx, output_value=as_array(reading.outputs),
                                    details={"layer": reading.layer, **details}, extras={"cam": cam.tolist()})

    def combine(self, ctx: Context, reading: Reading) -> tuple[torch.Tensor, dict[str, Any]]:
        """The raw map (T, h, w) and details to record, from the layer ``reading``."""
        assert reading.gradients is not None
        return weighted(self.weights(reading.activations, reading.gradients), reading.activations), {}

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Channel weights (T, K)."""
        raise NotImplementedError


def reading(maps: LayerMaps, row: int) -> Reading:
    """Row ``row`` of a layer read on several rows, in float64."""
    gradients = None if maps.gradients is None else maps.gradients[row].double()
    return Reading(maps.activations[row].double(), gradients, maps.outputs[row], maps.layer, maps.grid)


def weighted(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_k w_tk A_k: (T, K) x (K, h, w) -> (T, h, w)."""
    return torch.einsum("tk,khw->thw", weights.to(activations), activations)


def normalise(cam: torch.Tensor, how: str) -> torch.Tensor:
    """Per target (row of ``cam`` (T, h, w)): unchanged, min-max to [0, 1], or divided by max |c|."""
    if how == "none":
        return cam
    flat = cam.reshape(cam.shape[0], -1)
    if how == "minmax":
        low = flat.min(-1).values[:, None, None]
        return (cam - low) / ((flat.max(-1).values[:, None, None] - low) + NORMALISE_EPS)
    return cam / (flat.abs().max(-1).values[:, None, None] + NORMALISE_EPS)


def upsample(maps: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """(M, h, w) maps resized to ``grid`` (H, W): bilinear with align_corners=False, or nearest."""
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps[:, None], size=grid, mode=mode, **options)[:, 0]


@register("grad_cam", aliases=("gradcam",), kind="cam", cost="1 forward + 1 backward (from the layer on) per target",
          summary=f"Grad-CAM: channels weighted by their mean gradient {CAM_SUFFIX}")
@dataclass
class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al., 2017): w_tk = mean_ij dy_t / dA_kij, cam_t = ReLU(sum_k w_tk A_k)
    upsampled (see the module docstring for the options). The paper's y is the class logit (before
    the softmax): ``output="logit"`` gives it; Salience's default for classifiers is the log-odds.
    Equals Captum's LayerGradCam(relu_attributions=True) then LayerAttribution.interpolate."""

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean((-2, -1))


@register("grad_cam_plus_plus", aliases=("gradcam++", "gradcampp", "grad_cam++", "gradcam_plus_plus"), kind="cam",
          cost="1 forward + 1 backward (from the layer on) per target",
          summary=f"Grad-CAM++: channels weighted by positive gradients with per-pixel coefficients {CAM_SUFFIX}")
@dataclass
class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhay et al., 2018) in pytorch-grad-cam's closed form (the paper's eq. 19
    with exponential-output derivatives): alpha_kij = g^2 / (2 g^2 + (sum_ab A_kab) g^3 + 1e-6),
    0 where g = 0; w_tk = sum_ij ReLU(g_kij) alpha_kij; g = dy_t / dA."""

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        g2 = gradients * gradients
        total = activations.sum((-2, -1))[None, :, None, None]
        alpha = torch.where(gradients != 0, g2 / (2 * g2 + total * g2 * gradients + GRADCAM_PP_EPS), torch.zeros_like(g2))
        return (gradients.clamp(min=0) * alpha).sum((-2, -1))


@register("xgrad_cam", aliases=("xgradcam", "axiom_cam"), kind="cam", cost="1 forward + 1 backward (from the layer on) per target",
          summary=f"XGrad-CAM: gradients weighted by each channel's normalised activations {CAM_SUFFIX}")
@dataclass
class XGradCAM(CAM):
    """XGrad-CAM (Fu et al., 2020): w_tk = sum_ij (A_kij / (sum_ab A_kab + 1e-7)) dy_t / dA_kij
    (pytorch-grad-cam's eps)."""

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        share = activations / (activations.sum((-2, -1), keepdim=True) + XGRADCAM_EPS)
        return (share[None] * gradients).sum((-2, -1))


@register("layer_cam", aliases=("layercam",), kind="cam", cost="1 forward + 1 backward (from the layer on) per target",
          summary=f"LayerCAM: activations weighted element-wise by their positive gradients {CAM_SUFFIX}")
@dataclass
class LayerCAM(CAM):
    """LayerCAM (Jiang et al., 2021): cam_t = sum_k ReLU(dy_t / dA_k) * A_k element-wise, so the
    weight varies over positions (a shallower layer gives a finer map)."""

    def combine(self, ctx: Context, reading: Reading) -> tuple[torch.Tensor, dict[str, Any]]:
        assert reading.gradients is not None
        return (reading.gradients.clamp(min=0) * reading.activations[None]).sum(1), {}


@register("score_cam", aliases=("scorecam",), kind="cam", cost="1 + K forwards (K = the layer's channels; all targets share them)",
          summary=f"Score-CAM: channels weighted by the softmax of the output with each channel as a mask {CAM_SUFFIX}")
@dataclass
class ScoreCAM(CAM):
    """Score-CAM (Wang et al., 2020) as pytorch-grad-cam computes it: each channel A_k upsampled to
    the input grid (mode ``upsample``; pytorch-grad-cam's UpsamplingBilinear2d uses
    align_corners=True), min-max normalised to M_k in [0, 1] (eps 1e-8), the input masked as
    b + M_k (x - b), its output s_tk read; w_t = softmax_k(s_tk). ``baseline``: what a masked-out
    pixel becomes; "mean" (0 in the normalised space) makes b + M (x - b) = x * M, pytorch-grad-cam's
    masking. The K masked inputs are built in chunks and scored in the adapter's batches (one pass
    serves every target). Gradient-free."""

    baseline: str | None = None
    gradients: ClassVar[bool] = False

    def combine(self, ctx: Context, reading: Reading) -> tuple[torch.Tensor, dict[str, Any]]:
        baseline = ctx.baseline(self.baseline, "mean", perturbation=True)
        x, x0 = ctx.model.input_and_baseline(ctx.encoded, baseline)
        positions = x.shape[0]
        rows_per_chunk = ctx.batch_size or max(1, MASKS_PER_CHUNK_POSITIONS // positions)

        def score(chunk: slice) -> torch.Tensor:
            masks = upsample(reading.activations[chunk], reading.grid, self.upsample).reshape(-1, positions)
            low, high = masks.min(-1, keepdim=True).values, masks.max(-1, keepdim=True).values
            masks = ((masks - low) / (high - low + SCORECAM_EPS)).to(x)
            rows = x0[None] + masks[:, :, None] * (x - x0)[None]
            values, _ = ctx.model.score_inputs(ctx.encoded, rows, ctx.targets, grad=False, batch_size=ctx.batch_size)
            return values  # (chunk, T)

        scores = map_batches(score, reading.activations.shape[0], rows_per_chunk).double()  # (K, T)
        return weighted(torch.softmax(scores.T, dim=-1), reading.activations), {"baseline": baseline}


@register("ablation_cam", aliases=("ablationcam",), kind="cam", cost="1 + K forwards (K = the layer's channels; all targets share them)",
          summary=f"Ablation-CAM: channels weighted by the relative output drop when each is zeroed {CAM_SUFFIX}")
@dataclass
class AblationCAM(CAM):
    """Ablation-CAM (Desai and Ramaswamy, 2020): w_tk = (y_t - y_tk) / |y_t|, y_tk the output with
    channel k of the layer set to zero at every position (patch tokens only for a vision
    transformer), through the adapter's ``score_layer_ablation`` in batches of ablated copies.
    The paper and pytorch-grad-cam divide by y_t (they explain a positive logit); |y_t| keeps the
    sign meaning "zeroing the channel lowers the output" when y_t < 0 (e.g. a log-odds below 0);
    y_t = 0 gives weights of 0. pytorch-grad-cam zeroes a channel only when the layer's minimum is
    0 and otherwise sets it to (minimum - 1e7); Salience always zeroes (the paper's ablation).
    Gradient-free."""

    needs: ClassVar[tuple[str, ...]] = ("layer_maps", "score_layer_ablation")
    gradients: ClassVar[bool] = False

    def combine(self, ctx: Context, reading: Reading) -> tuple[torch.Tensor, dict[str, Any]]:
        channels = torch.arange(reading.activations.shape[0])
        ablated = ctx.model.score_layer_ablation(ctx.encoded, reading.layer, channels, ctx.targets,  # type: ignore[attr-defined]
                                                 batch_size=ctx.batch_size).double()  # (K, T)
        y = reading.outputs.double().to(ablated.device)
        scale = torch.where(y != 0, y.abs(), torch.ones_like(y))
        weights = torch.where(y[None] != 0, (y[None] - ablated) / scale[None], torch.zeros_like(ablated))
        return weighted(weights.T, reading.activations), {}
