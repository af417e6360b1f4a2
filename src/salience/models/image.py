"""Adapter for torch image classifiers: any ``nn.Module`` mapping (N, C, H, W) images to logits
(N, classes) (a Hugging Face output with ``.logits`` works too).

Attribution space: the normalised model input as P = H x W positions (row-major) x C colour
channels. Gradient methods differentiate the explained output w.r.t. the normalised pixels and sum
per-channel scores over channels; a removed feature's pixels take the baseline's values in every
channel (baselines: :mod:`salience.models.image_values`; features and geometry:
:mod:`salience.core.grid`).

Inputs: a path, a PIL image or an H x W [x C] uint8 array go through ``preprocess``; a (C, H, W)
tensor is taken as the model input itself, already normalised as the model expects. Greyscale,
palette and RGBA images are converted to the model's mode (RGB, or L for a 1-channel model) with a
note in ``Explanation.warnings``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from salience.core.batching import PIXELS, choose_batch_size, map_batches
from salience.core.features import Feature, FeatureSet, as_feature_set
from salience.core.grid import (
    LEVELS,
    identity_geometry,
    patch_features,
    pixel_features,
    slic_labels,
    stretch_geometry,
    superpixel_features,
)
from salience.core.grid import geometry as make_geometry
from salience.core.target import Prediction, Target, prediction_from_logits, read_outputs
from salience.errors import InputError, ModelOutputError, ParameterError
from salience.models.attention_access import Combine
from salience.models.base import PassCounter
from salience.models.image_attention import called, recorded_attention, used_weights
from salience.models.image_attention import query_rows as attention_rows
from salience.models.image_attention import to_pixels as attention_pixels
from salience.models.image_input import read_image
from salience.models.image_values import NAMED, Levels, build, check_name, tensor_name
from salience.models.layers import (
    LayerMaps,
    as_spatial,
    capture,
    captured_value,
    choose_layer,
    describe,
    get_layer,
    needs_gradients,
    parse_layer,
    recording,
    zero_channels,
)
from salience.models.passes import as_targets, check_finite, frozen_parameters, score_rows

PATCHES_PER_SIDE = 14  # default patch size: the grid's short side / 14 (16 px at 224 x 224, as ViT-B/16)
SLIC_DEFAULTS = {"n_segments": 100, "compactness": 10.0, "slic_sigma": 0.0}  # scikit-image's own defaults
LEVEL_OPTIONS = {"pixel": (), "patch": ("patch_size", "stride"), "superpixel": tuple(SLIC_DEFAULTS)}


@dataclass
class EncodedImage:
    """One image as the model sees it: ``pixels`` (C, H, W) normalised; ``geometry`` maps the model
    grid back to the image the user gave (JSON-ready, see :mod:`salience.core.grid`); ``levels`` the
    black/white levels; ``image`` the user's picture (RGB/L, for overlays; in memory only, never
    serialised); ``notes`` conversions made. No position is special; nothing is ever truncated."""

    input: str
    pixels: torch.Tensor
    geometry: dict[str, Any]
    levels: Levels
    image: Image.Image | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    truncated: bool = False
    special: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.special = torch.zeros(self.length, dtype=torch.bool)

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    @property
    def length(self) -> int:
        """Number of positions P = H x W."""
        return self.grid[0] * self.grid[1]


class ImageClassifier:
    """Wraps a torch image classifier (NCHW in, logits out; put in eval mode).

    ``preprocess``: an object like :class:`salience.zoo.efficientnet_lite0.ImagePreprocess`
    (``to_tensor(PIL image) -> (C, H, W)`` normalised, and ``geometry(size) -> (scale, crop_box)``:
    heatmaps map back exactly), or a plain callable PIL image -> (C, H, W) tensor (its geometry is
    *assumed* to resize the whole image onto the grid, no crop; recorded ``exact: False``), or None
    (inputs must be (C, H, W) tensors at the model's size; no "black" baseline then, the value range
    being unknown). ``labels``: class names (default "0", "1", ...). ``input_shape`` (C, H, W):
    checked against tensor inputs (default: C from the first Conv2d, H x W from ``preprocess.crop``).
    """

    kind = "image classifier"
    default_output = "log_odds"  # log(p / (1 - p)): unlike p, it does not saturate near 0 and 1
    explanation_kind = "image"
    default_level = "pixel"
    # perturbation and per-feature path methods cost one row per feature: patches unless asked
    default_levels = {"perturbation": "patch", "path": "patch"}
    levels = LEVELS
    feature_options = ("patch_size", "stride", *SLIC_DEFAULTS)
    encode_options: tuple[str, ...] = ()
    encoded_type = EncodedImage

    def __init__(self, net: nn.Module, preprocess: Any = None, labels: Sequence[str] | None = None, name: str | None = None,
                 *, input_shape: tuple[int, int, int] | None = None) -> None:
        if not isinstance(net, nn.Module):
            raise ParameterError(f"ImageClassifier needs a torch.nn.Module, got {type(net).__name__}")
        if preprocess is not None and not callable(getattr(preprocess, "to_tensor", preprocess)):
            raise ParameterError("preprocess must have a to_tensor(image) method or be callable on a PIL image")
        self.model = net.eval()
        self.preprocess = preprocess
        self.name = name or type(net).__name__
        self.counter = PassCounter()
        self.channels = int(input_shape[0]) if input_shape else _first_conv_channels(net)
        crop = getattr(preprocess, "crop", None)
        self.size: tuple[int, int] | None = (
            (int(input_shape[1]), int(input_shape[2])) if input_shape else (crop, crop) if isinstance(crop, int) else None)
        self._labels_given = labels is not None
        self.labels: list[str] = [str(label) for label in labels] if labels is not None else _default_labels(net)
        self.baselines: tuple[str, ...] = NAMED if preprocess is not None else tuple(b for b in NAMED if b != "black")
        self._tensors: dict[str, torch.Tensor] = {}  # user baseline tensors by their recorded name
        self._grids: dict[int, tuple[int, int]] = {}
        self._activation_bytes: dict[tuple[int, int], tuple[int, int]] = {}
        self._attention_tokens: dict[tuple[int, int], int] = {}  # attention tokens per input grid (vision transformers)

    @property
    def device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        first = next(self.model.parameters(), None)
        return first.dtype if first is not None and first.is_floating_point() else torch.float32

    # --------------------------------------------------------------- encoding
    def is_single_input(self, inputs: Any) -> bool:
        """Lists and tuples are several inputs; anything else is one image."""
        return not isinstance(inputs, (list, tuple))

    def encode(self, inputs: Any, *, truncate: bool = False) -> EncodedImage:
        """Read and preprocess one image (path, PIL image, uint8 array) or take a normalised (C, H, W)
        tensor as it is. ``truncate`` is ignored (images are never cut)."""
        if isinstance(inputs, EncodedImage):
            return inputs
        if isinstance(inputs, torch.Tensor):
            encoded = self._encode_tensor(inputs)
        else:
            encoded = self._encode_picture(inputs)
        self._grids[encoded.length] = encoded.grid
        return encoded

    def _mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def _encode_picture(self, inputs: Any) -> EncodedImage:
        if self.preprocess is None:
            raise InputError(f"{self.name} has no preprocessing: give a (C, H, W) tensor normalised as the model expects, "
                             "or build the ImageClassifier with preprocess=...")
        image, description, notes = read_image(inputs, self._mode())
        pixels = self._check_pixels(self._apply(image), description)
        if callable(getattr(self.preprocess, "geometry", None)):
            scale, crop_box = self.preprocess.geometry(image.size)
            geometry = make_geometry(image.size, (pixels.shape[1], pixels.shape[2]), scale, crop_box)
        else:
            geometry = stretch_geometry(image.size, (pixels.shape[1], pixels.shape[2]))
        levels = Levels(self._apply(Image.new(self._mode(), image.size, 0)), self._apply(Image.new(self._mode(), image.size, "white")))
        return EncodedImage(description, pixels, geometry, levels, image, notes)

    def _encode_tensor(self, tensor: torch.Tensor) -> EncodedImage:
        if tensor.dim() != 3:
            raise InputError(f"an image tensor must be (C, H, W); got shape {tuple(tensor.shape)}")
        pixels = self._check_pixels(tensor.detach() if tensor.is_floating_point() else tensor.detach().float(), "the tensor")
        channels, height, width = pixels.shape
        levels = Levels()
        if self.preprocess is not None:
            black = self._apply(Image.new(self._mode(), (width, height), 0))
            white = self._apply(Image.new(self._mode(), (width, height), "white"))
            if black.shape == pixels.shape:
                levels = Levels(black, white)
        shown = (levels.display(pixels) * 255).round().astype(np.uint8)
        image = Image.fromarray(shown[..., 0] if channels == 1 else shown[..., :3])
        return EncodedImage(f"tensor {channels}x{height}x{width}", pixels, identity_geometry((height, width)), levels, image)

    def _apply(self, image: Image.Image) -> torch.Tensor:
        function: Callable[[Image.Image], Any] = getattr(self.preprocess, "to_tensor", self.preprocess)
        out = torch.as_tensor(function(image)).detach()
        if out.dim() == 4 and out.shape[0] == 1:
            out = out[0]
        if out.dim() != 3:
            raise InputError(f"the preprocessing returned shape {tuple(out.shape)}; expected (C, H, W)")
        return out if out.is_floating_point() else out.float()

    def _check_pixels(self, pixels: torch.Tensor, what: str) -> torch.Tensor:
        channels, height, width = pixels.shape
        if self.channels is not None and channels != self.channels:
            raise InputError(f"{self.name} expects {self.channels} channels, got {channels} ({what}, shape {tuple(pixels.shape)})")
        if self.size is not None and (height, width) != self.size:
            raise InputError(f"{self.name} expects {self.size[0]}x{self.size[1]} pixels (H x W), got {height}x{width} ({what})")
        return pixels

    def describe_input(self, encoded: EncodedImage) -> dict[str, Any]:
        """Explanation extras: the geometry (serialised), the picture (``_image``) and the encoded input
        (``_encoded``: what the metrics perturb; both in memory only)."""
        return {"geometry": encoded.geometry, "_image": encoded.image, "_encoded": encoded}

    # --------------------------------------------------------------- features
    def features(self, encoded: EncodedImage, level: str, **options: Any) -> FeatureSet:
        """Pixels, square patches (``patch_size``, default grid side / 14; ``stride``, default the
        size; edge patches clipped) or SLIC superpixels (``n_segments``, ``compactness``,
        ``slic_sigma``; scikit-image's defaults) of the model grid."""
        if level not in LEVELS:
            raise ParameterError(f"unknown level {level!r} for an {self.kind}; choose {', '.join(LEVELS)}")
        extra = sorted(set(options) - set(LEVEL_OPTIONS[level]))
        if extra:
            owner = next((lv for lv, names in LEVEL_OPTIONS.items() if extra[0] in names), None)
            raise ParameterError(f"{extra[0]} is an option of level {owner!r}, not of level {level!r}")
        grid = encoded.grid
        if level == "pixel":
            return pixel_features(grid)
        if level == "patch":
            size = options.get("patch_size")
            size = _positive_int(max(1, round(min(grid) / PATCHES_PER_SIDE)) if size is None else size, "patch_size")
            stride = options.get("stride")
            return patch_features(grid, size, _positive_int(size if stride is None else stride, "stride"))
        params = {**SLIC_DEFAULTS, **options}
        labels = slic_labels(encoded.levels.display(encoded.pixels), n_segments=_positive_int(params["n_segments"], "n_segments"),
                             compactness=float(params["compactness"]), sigma=float(params["slic_sigma"]))
        return superpixel_features(labels, {"method": "slic", **params})

    def available(self, encoded: EncodedImage, targets: Sequence[Target], features: FeatureSet) -> np.ndarray:
        """(T, F): every feature can influence every class."""
        return np.ones((len(targets), len(features)), dtype=bool)

    # --------------------------------------------------------------- baselines
    def check_baseline(self, baseline: Any, *, perturbation: bool) -> str:
        """The recorded name of ``baseline``: a named one (black, mean, blur[:SIGMA], noise[:SEED]) or a
        (C, H, W) tensor in the normalised space (kept by the adapter under its shape and hash)."""
        if isinstance(baseline, (torch.Tensor, np.ndarray)):
            name = tensor_name(baseline)
            self._tensors[name] = torch.as_tensor(baseline).detach().clone()
            return name
        if not isinstance(baseline, str):
            raise ParameterError(f"an image baseline is a name or a (C, H, W) tensor, not a {type(baseline).__name__}")
        return check_name(baseline, self.baselines, self._tensors)

    def input_and_baseline(self, encoded: EncodedImage, baseline: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised input and its baseline as (P, C) rows (model dtype and device)."""
        name = baseline if isinstance(baseline, str) else self.check_baseline(baseline, perturbation=False)
        pixels = encoded.pixels.to(self.device, self.dtype)
        reference = build(name, pixels, encoded.levels, self._tensors)
        return _rows(pixels[None])[0], _rows(reference[None])[0]

    def pixel_grid(self, encoded: EncodedImage) -> tuple[int, int]:
        """(H, W) of the model input: positions are its pixels, row-major (methods that work on a 2-D
        grid, e.g. RISE's masks or NeuroMask's smoothness term, need it)."""
        return encoded.grid

    # ---------------------------------------------------------------- running
    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """One model call on (B, C, H, W) images: logits (B, classes), counted and checked."""
        output = self.model(images.to(self.device, self.dtype))
        logits = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
        self.counter.forward_passes += int(images.shape[0])
        self.counter.model_calls += 1
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ModelOutputError(f"{self.name} must return logits of shape (N, classes); it returned {shape}")
        if logits.shape[1] != len(self.labels):
            if self._labels_given:
                raise ModelOutputError(f"{self.name} returned {logits.shape[1]} classes but {len(self.labels)} labels were given")
            self.labels = [str(i) for i in range(logits.shape[1])]
        return check_finite(logits)

    def predict(self, encoded: EncodedImage) -> Prediction:
        """The prediction on the unperturbed image (one forward pass)."""
        with torch.no_grad():
            logits = self._logits(encoded.pixels[None])
        return prediction_from_logits(logits[0], self.labels)

    def predict_many(self, encoded: Sequence[EncodedImage], batch_size: int | None = None) -> list[Prediction]:
        """The predictions of several images, in order: the images of one grid in shared forward
        calls (chunked as any forward pass); equal to :meth:`predict` image by image up to the
        rounding of batched arithmetic."""
        found: dict[int, Prediction] = {}
        grids = [e.grid for e in encoded]
        for grid in dict.fromkeys(grids):
            members = [i for i, g in enumerate(grids) if g == grid]
            images = torch.stack([encoded[i].pixels for i in members])
            size = choose_batch_size(grid[0] * grid[1], backward=False, batch_size=batch_size, budget=PIXELS)
            with torch.no_grad():
                logits = map_batches(lambda chunk, images=images: self._logits(images[chunk]), len(members), size)
            found.update((i, prediction_from_logits(row, self.labels)) for i, row in zip(members, logits))
        return [found[i] for i in range(len(encoded))]

    def predict_with_input_gradient(self, encoded: EncodedImage, resolve: Callable[[Prediction], Target]
                                    ) -> tuple[Prediction, Target, torch.Tensor, torch.Tensor]:
        """Prediction, the one target ``resolve`` picks, its output at the input and its gradient
        (P, C), from one forward + backward pass."""
        images = encoded.pixels[None].to(self.device, self.dtype).requires_grad_(True)
        with frozen_parameters(self.model), torch.enable_grad():
            logits = self._logits(images)
            prediction = prediction_from_logits(logits[0], self.labels)
            target = resolve(prediction)
            value = read_outputs(logits, [target])[:, 0]
            (gradient,) = torch.autograd.grad(value.sum(), images)
            self.counter.backward_passes += 1
        return prediction, target, value.detach()[0], _rows(gradient)[0]

    def score_inputs(self, encoded: EncodedImage, rows: torch.Tensor, target: Target | Sequence[Target], *, grad: bool,
                     batch_size: int | None = None, paired: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs for rows (N, P, C) of normalised pixels: (N,) for one target, (N, T) for a list; with
        ``grad`` also d output / d rows, (N, P, C) or (N, T, P, C), one backward row per (row, target).
        ``paired`` (a list of N targets, e.g. each row another image's predicted class): row i is read
        for target i only, (N,) and (N, P, C). ``encoded`` only gives the grid: rows of any images
        of that grid may be scored together."""
        targets, single = as_targets(target)
        if paired and len(targets) != rows.shape[0]:
            raise ParameterError(f"paired scoring needs one target per row: {len(targets)} targets for {rows.shape[0]} rows")
        size = choose_batch_size(encoded.length, backward=grad, batch_size=batch_size, budget=PIXELS)
        grid = encoded.grid

        def run(source: torch.Tensor, which: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            images = _images(source, grid).to(self.device, self.dtype)
            if which is None:
                with torch.no_grad():
                    return read_outputs(self._logits(images), targets), torch.empty(0)
            images = images.detach().requires_grad_(True)
            with torch.enable_grad():
                outputs = read_outputs(self._logits(images), targets)
                values = outputs.gather(1, which[:, None].to(outputs.device))[:, 0]
                (gradient,) = torch.autograd.grad(values.sum(), images)
            self.counter.backward_passes += int(images.shape[0])
            return values.detach(), _rows(gradient)

        return score_rows(self.model, run, rows, len(targets), size, grad=grad, single=single, paired=paired)

    def score_perturbed(self, encoded: EncodedImage, keep: torch.Tensor, features: Sequence[Feature], baseline: str,
                        target: Target | Sequence[Target], batch_size: int | None = None) -> torch.Tensor:
        """Output for each row of ``keep`` (B, F) bool: pixels of features not kept take the
        ``baseline``'s values (all channels). Rows are built chunk by chunk. (B,) or (B, T)."""
        targets, single = as_targets(target)
        feature_set = features if isinstance(features, FeatureSet) else as_feature_set(features, encoded.length, "patch")
        x, x0 = self.input_and_baseline(encoded, baseline)
        size = choose_batch_size(encoded.length, backward=False, batch_size=batch_size, budget=PIXELS)

        def run(chunk: slice) -> torch.Tensor:
            removed = feature_set.removed(keep[chunk].to(x.device))  # built on the model's device
            rows = torch.where(removed[:, :, None], x0[None], x[None])
            return read_outputs(self._logits(_images(rows, encoded.grid)), targets)

        with torch.no_grad():
            values = map_batches(run, keep.shape[0], size)
        return values[:, 0] if single else values

    # ------------------------------------------------------------------ layers
    def layer_maps(self, encoded: EncodedImage, rows: torch.Tensor, targets: Sequence[Target], layer: str | nn.Module | None,
                   *, grad: bool, batch_size: int | None = None, paired: bool = False) -> LayerMaps:
        """A layer read on rows (N, P, C) of normalised pixels: its output as a map (N, K, h, w) (see
        :mod:`salience.models.layers`), every target's output (N, T) and, with ``grad``, d output_t /
        d map (N, T, K, h, w): one forward pass per row serves every target, then one backward row
        per (row, target) pair, each stopping at the layer. ``paired`` (a list of N targets, e.g.
        each row another image's predicted class): row i is read for target i only, so T = 1:
        outputs (N, 1) and gradients (N, 1, K, h, w), one backward row per row. ``encoded`` only
        gives the grid: rows of any images of that grid may be read together. ``layer``: a dotted
        module name or the module; None chooses it (:func:`choose_layer`) from one extra forward
        pass on the first row for its target(s) (for a vision transformer a second one, with a
        backward pass)."""
        targets = list(targets)
        if paired and len(targets) != rows.shape[0]:
            raise ParameterError(f"paired layer maps need one target per row: {len(targets)} targets for {rows.shape[0]} rows")
        name, module = self._layer(encoded, rows[0], targets[:1] if paired else targets, layer)
        grid = encoded.grid
        size = choose_batch_size(encoded.length, backward=grad, batch_size=batch_size, budget=PIXELS)

        def read(logits: torch.Tensor, chunk: slice) -> torch.Tensor:
            """(B, T) outputs; paired: each row's own target, (B, 1), from the chunk's distinct targets."""
            if not paired:
                return read_outputs(logits, targets)
            mine = targets[chunk]
            distinct = list(dict.fromkeys(mine))
            columns = torch.tensor([distinct.index(t) for t in mine], device=logits.device)
            return read_outputs(logits, distinct).gather(1, columns[:, None])

        def run(chunk: slice) -> tuple[torch.Tensor, ...]:
            with capture(module, name, grad=grad) as seen, torch.set_grad_enabled(grad):
                outputs = read(self._logits(_images(rows[chunk], grid)), chunk)
                leaf = captured_value(seen)
                if not grad:
                    return outputs, as_spatial(leaf, grid, name)
                unused = ParameterError(f"the output of {self.name} does not depend on layer {name!r}")
                if not outputs.requires_grad:
                    raise unused
                gradients = []
                columns = outputs.shape[1]
                for t in range(columns):  # rows are independent: the gradient of their sum is each row's
                    (gradient,) = torch.autograd.grad(outputs[:, t].sum(), leaf, retain_graph=t < columns - 1,
                                                      allow_unused=True)
                    if gradient is None:  # a layer off the output's path (a side branch): not a map of zeros
                        raise unused
                    gradients.append(as_spatial(gradient, grid, name))
            self.counter.backward_passes += int(outputs.shape[0]) * columns
            return outputs.detach(), as_spatial(leaf.detach(), grid, name), torch.stack(gradients, 1)

        if not grad:
            outputs, activations = map_batches(run, rows.shape[0], size)
            return LayerMaps(activations, None, outputs, name, grid)
        with frozen_parameters(self.model):
            outputs, activations, gradients = map_batches(run, rows.shape[0], size)
        return LayerMaps(activations, gradients, outputs, name, grid)

    def score_layer_ablation(self, encoded: EncodedImage, layer: str | nn.Module, channels: torch.Tensor,
                             targets: Sequence[Target], batch_size: int | None = None) -> torch.Tensor:
        """Outputs (B, T) of the input with channel ``channels[b]`` of ``layer``'s output set to zero
        at every spatial position in row b (B = len(channels)); chunked like any forward pass."""
        targets = list(targets)
        name, module = self._layer(encoded, None, targets, layer)
        grid = encoded.grid
        image = encoded.pixels[None].to(self.device, self.dtype)
        size = choose_batch_size(encoded.length, backward=False, batch_size=batch_size, budget=PIXELS)

        def run(chunk: slice) -> torch.Tensor:
            picked = channels[chunk]

            def ablate(output: torch.Tensor) -> torch.Tensor:
                width = as_spatial(output, grid, name).shape[1]
                if int(picked.min()) < 0 or int(picked.max()) >= width:
                    raise ParameterError(f"layer {name!r} has {width} channels; cannot ablate channel {int(picked.max())}")
                return zero_channels(output, picked, grid, name)

            with capture(module, name, grad=False, edit=ablate), torch.no_grad():
                return read_outputs(self._logits(image.expand(len(picked), -1, -1, -1)), targets)

        return map_batches(run, len(channels), size)

    def _layer(self, encoded: EncodedImage, row: torch.Tensor | None, targets: list[Target],
               layer: str | nn.Module | None) -> tuple[str, nn.Module]:
        """(name, module) of ``layer``; None: the automatic choice from a probe pass on ``row``."""
        grid = encoded.grid
        if row is None:
            row = _rows(encoded.pixels[None])[0]
        if layer is not None:
            return get_layer(self.model, layer, lambda: describe(self._probe(row, targets, grid, grad=False)[0], grid))
        records, value = self._probe(row, targets, grid, grad=False)
        if needs_gradients(records, grid):
            records, value = self._probe(row, targets, grid, grad=True)
        choice = choose_layer(records, value, grid, self.name)
        self.counter.backward_passes += int(choice.backward)
        return choice.name, self.model.get_submodule(parse_layer(choice.name).module)

    def _probe(self, row: torch.Tensor, targets: list[Target], grid: tuple[int, int], *,
               grad: bool) -> tuple[list[Any], torch.Tensor]:
        """Every module's output in one forward pass on ``row`` and the targets' summed output (with
        ``grad``: with their graph)."""
        image = _images(row[None], grid).to(self.device, self.dtype).detach().requires_grad_(grad)
        with frozen_parameters(self.model), torch.set_grad_enabled(grad), recording(self.model) as records:
            value = read_outputs(self._logits(image), targets).sum()
        return records, value

    # ------------------------------------------------------------------ attention (vision transformers)
    def attention_maps(self, encoded: EncodedImage) -> torch.Tensor:
        """Per-head attention weights (layers, heads, T, T) of a vision transformer built on
        ``nn.MultiheadAttention``, on the unperturbed image, float64 on the CPU (one forward pass,
        counted; see :mod:`salience.models.image_attention`)."""
        with recorded_attention(self.model, self.name) as seen, torch.no_grad():
            self._logits(encoded.pixels[None])
        maps = torch.stack([w[0] for w in called(seen, self.name)]).double().cpu()
        self._attention_tokens[encoded.grid] = int(maps.shape[-1])
        return maps

    def attention_query_rows(self, encoded: EncodedImage, targets: Sequence[Target]) -> list[list[int]]:
        """Every target reads the class token's row, or, without leading tokens, every token's (the
        head then reads their mean). The token count is the last attention pass's on this grid (a
        forward pass of its own if none ran yet)."""
        if encoded.grid not in self._attention_tokens:
            self.attention_maps(encoded)
        rows = attention_rows(self._attention_tokens[encoded.grid], encoded.grid, self.name)
        return [rows for _ in targets]

    def attention_gradients(self, encoded: EncodedImage, targets: Sequence[Target], combine: Combine,
                            batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``combine(maps, grads)`` per target, (T, ...), and the targets' outputs (T,): one forward pass
        of the image (parameters frozen) and one backward per target through the attention weights."""
        images = encoded.pixels[None].to(self.device, self.dtype).requires_grad_(True)
        targets = list(targets)
        results = []
        with recorded_attention(self.model, self.name) as seen, frozen_parameters(self.model), torch.enable_grad():
            values = read_outputs(self._logits(images), targets)[0]  # (T,)
            used = [used_weights(w) for w in called(seen, self.name)]
            for t in range(len(targets)):
                grads = torch.autograd.grad(values[t], used, retain_graph=t < len(targets) - 1, allow_unused=True)
                if any(g is None for g in grads):
                    raise ModelOutputError(f"{self.name}'s output is not computed from the attention weights its "
                                           "nn.MultiheadAttention layers return")
                results.append(combine([w.detach() for w in seen], [g.reshape(w.shape) for g, w in zip(grads, seen)]))
        self.counter.backward_passes += len(targets)
        self._attention_tokens[encoded.grid] = int(seen[0].shape[-1])
        return torch.cat(results), values.detach()

    def attention_positions(self, encoded: EncodedImage, scores: torch.Tensor) -> torch.Tensor:
        """Token scores (T, tokens) as position scores (T, pixels): each pixel its patch's score."""
        return attention_pixels(scores, encoded.grid, self.name)

    # ------------------------------------------------------------------ memory
    def bytes_per_row(self, length: int, *, backward: bool) -> int:
        """Estimated activation bytes of one row of ``length`` pixels, for ``max_memory``. Measured
        once per grid by a probe row (one counted forward pass) that sums the outputs of every leaf
        module: a gradient pass keeps them all (autograd saves each layer's input); a pass without
        gradients holds about the two largest at a time. A 25 % margin is added."""
        side = math.isqrt(length)
        grid = self._grids.get(length, (side, length // max(side, 1)))
        if grid not in self._activation_bytes:
            self._activation_bytes[grid] = self._probe_activations(grid)
        kept, largest = self._activation_bytes[grid]
        return int(1.25 * (kept if backward else 2 * largest))

    def _probe_activations(self, grid: tuple[int, int]) -> tuple[int, int]:
        sizes: list[int] = []

        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                sizes.append(output.numel() * output.element_size())

        handles = [m.register_forward_hook(record) for m in self.model.modules() if not any(True for _ in m.children())]
        try:
            with torch.no_grad():
                self._logits(torch.zeros(1, self.channels or 3, *grid))
        finally:
            for handle in handles:
                handle.remove()
        first = grid[0] * grid[1] * (self.channels or 3) * torch.finfo(self.dtype).bits // 8
        return first + sum(sizes), max([first, *sizes])


def _rows(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, P, C), positions row-major."""
    n, channels = images.shape[:2]
    return images.permute(0, 2, 3, 1).reshape(n, -1, channels)


def _images(rows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, P, C) -> (N, C, H, W)."""
    return rows.reshape(rows.shape[0], grid[0], grid[1], rows.shape[-1]).permute(0, 3, 1, 2)


def _first_conv_channels(net: nn.Module) -> int | None:
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else None


def _default_labels(net: nn.Module) -> list[str]:
    """"0", "1", ... for the out_features of the last Linear layer (fixed on the first call if wrong)."""
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return [str(i) for i in range(linear[-1].out_features)] if linear else []


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
