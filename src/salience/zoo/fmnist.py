"""A small CNN trained on Fashion-MNIST in full precision (``fmnist-cnn``) and the same architecture
binarized (``fmnist-bnn``), with their preprocessing and class names.

Architecture (:class:`FashionCNN`; 94,186 parameters each; input ``(N, 1, 28, 28)``, output
``(N, 10)`` logits; every convolution 3 x 3, stride 1, padding 1, no bias, followed by batch norm)::

    block1  conv 1 -> 32    BN  act  maxpool 2   (N, 32, 14, 14)
    block2  conv 32 -> 64   BN  act  maxpool 2   (N, 64, 7, 7)
    block3  conv 64 -> 128  BN  act              (N, 128, 7, 7)   GRAD_CAM_LAYER = "block3"
    global average pool -> classifier: linear 128 -> 10

* ``cnn``: act = ReLU, every layer in full precision (float32).
* ``bnn``: act = :class:`Sign`, so every activation between layers is in {-1, +1}; ``block2.conv`` and
  ``block3.conv`` are :class:`BinaryConv2d`, whose weights enter the convolution as ``sign(w)`` in
  {-1, +1} with no scale factor (the batch norm that follows normalises each output channel, so it
  would undo XNOR-Net's per-channel ``mean |w|`` scale, up to the norm's epsilon). So the two middle
  convolutions see binary inputs and binary weights. As usual for binarized networks, the first
  convolution (real pixels in) and the last linear layer (real weights, on the average of binary
  maps) stay in full precision; batch norm is kept after every convolution.

sign(x) here is +1 for x >= 0 and -1 for x < 0 (never 0). Its derivative is 0 almost everywhere, so
training uses the straight-through estimator of Hubara et al. (2016): backward passes the incoming
gradient where ``|x| <= 1`` and 0 elsewhere, i.e. hardtanh's derivative (torch's hardtanh gives 0 at
exactly ``|x| = 1``; this gives 1 there, as Hubara et al.). **The STE stays in the graph at
explanation time**: gradient methods (Gradient, SmoothGrad, Integrated Gradients, Grad-CAM) on
``fmnist-bnn`` differentiate this surrogate, not the true piecewise-constant network, whose gradient
w.r.t. the pixels is 0 almost everywhere. Studies of gradient methods on BNNs do the same; read
their maps as "the gradient of the hardtanh relaxation at the binary network's operating point".
One visible consequence: Integrated Gradients' completeness delta on the BNN does not shrink with more
steps (the surrogate is not the gradient of F; on test image 0 it stays at 13% of F(x) - F(baseline),
where the CNN's falls below 0.1%). Perturbation methods (occlusion, LIME, KernelSHAP) see the true
binary network.

Weights: ``fmnist_cnn.safetensors`` and ``fmnist_bnn.safetensors`` next to this module (the BNN's
latent real weights; only their signs are used), with a JSON of metadata each (test accuracy, seed,
epochs, command), written by ``scripts/train_zoo_fmnist.py``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from salience.core.grid import grid_to_original
from salience.datasets.fashion_mnist import CLASS_NAMES, IMAGE_SIZE
from salience.errors import ModelLoadError, ParameterError

KINDS = ("cnn", "bnn")
GRAD_CAM_LAYER = "block3"  # output (N, 128, 7, 7): the last spatial map, after batch norm and the activation
BINARY_LAYERS = ("block2.conv", "block3.conv")  # in the BNN: binary inputs and binary weights
CHANNELS = (32, 64, 128)
# Fashion-MNIST training set (60,000 images): mean and standard deviation of pixel / 255
TRAIN_MEAN = 0.2860
TRAIN_STD = 0.3530
ZOO_DIR = Path(__file__).parent


def weights_path(kind: str) -> Path:
    """The committed safetensors file of ``kind`` ("cnn" or "bnn")."""
    return ZOO_DIR / f"fmnist_{_check_kind(kind)}.safetensors"


def metadata_path(kind: str) -> Path:
    """The JSON beside the weights: test accuracy, seed, epochs, training command."""
    return ZOO_DIR / f"fmnist_{_check_kind(kind)}.json"


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ParameterError(f"unknown Fashion-MNIST model kind {kind!r}; choose {', '.join(KINDS)}")
    return kind


class _SignSTE(torch.autograd.Function):
    """sign with the straight-through estimator: forward +1 (x >= 0) / -1 (x < 0); backward
    ``grad * (|x| <= 1)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binarise ``x`` to {-1, +1} (0 -> +1); its gradient is the straight-through estimator
    ``1 if |x| <= 1 else 0`` (hardtanh's derivative)."""
    result: torch.Tensor = _SignSTE.apply(x)
    return result


class Sign(nn.Module):
    """The BNN's activation: :func:`sign_ste` as a module (so hooks and layer names see it).
    Declared elementwise (``salience_elementwise``): the propagation methods run it as one unit with
    their rule for an activation (DeepLIFT: (sign(x) - sign(x_ref)) / (x - x_ref); LRP: relevance
    passed through) instead of meeting the custom autograd Function, which they cannot see into."""

    salience_elementwise = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x)


class BinaryConv2d(nn.Conv2d):
    """A convolution whose weights enter as ``sign(w)`` in {-1, +1} (no scale); ``self.weight``
    holds the latent real weights that training updates through the STE."""

    def binary_weight(self) -> torch.Tensor:
        """The weights the convolution uses: ``sign(self.weight)``, in {-1, +1}."""
        return sign_ste(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.binary_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _block(conv: nn.Conv2d, act: nn.Module, pool: bool) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv, bn=nn.BatchNorm2d(conv.out_channels), act=act)
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


class FashionCNN(nn.Module):
    """The Fashion-MNIST network of this module's docstring; ``binary=True`` gives the BNN."""

    def __init__(self, binary: bool = False) -> None:
        super().__init__()
        self.binary = binary
        middle = BinaryConv2d if binary else nn.Conv2d

        def act() -> nn.Module:
            return Sign() if binary else nn.ReLU()

        c1, c2, c3 = CHANNELS
        self.block1 = _block(nn.Conv2d(1, c1, 3, padding=1, bias=False), act(), pool=True)
        self.block2 = _block(middle(c1, c2, 3, padding=1, bias=False), act(), pool=True)
        self.block3 = _block(middle(c2, c3, 3, padding=1, bias=False), act(), pool=False)
        self.classifier = nn.Linear(c3, len(CLASS_NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.block3(self.block2(self.block1(x)))
        return self.classifier(features.mean(dim=(2, 3)))


@dataclass(frozen=True)
class GreyPreprocess:
    """Turn a PIL image into the model input ``(1, 28, 28)`` float32, and map the grid back.

    The image is converted to grey (L) and resized as a whole to 28 x 28 (aspect ratio not kept,
    nothing cut off; bilinear, antialiased when shrinking), then ``(pixel / 255 - mean) / std``.
    The model knows Fashion-MNIST's look: a light garment on a black background, centred, filling
    the frame; invert a photo taken on a white background first.

    Coordinates as in :mod:`salience.zoo.efficientnet_lite0`: ``(x, y)`` right and down, pixel edges
    at integers, sizes ``(width, height)``.
    """

    crop: int = IMAGE_SIZE
    mean: float = TRAIN_MEAN
    std: float = TRAIN_STD
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def geometry(self, original_size: tuple[int, int]) -> tuple[tuple[float, float], tuple[int, int, int, int]]:
        """Return ``(scale, crop_box)``: grid pixels per original pixel along x and y, and the input as a
        box of the resized image (the whole of it): an input-grid point ``(u, v)`` is the original
        point ``(u / sx, v / sy)``."""
        width, height = original_size
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {original_size}")
        return (self.crop / width, self.crop / height), (0, 0, self.crop, self.crop)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """Return the model input for ``image``: float32, shape ``(1, crop, crop)``, normalised."""
        grey = image.convert("L")
        if grey.size != (self.crop, self.crop):
            grey = grey.resize((self.crop, self.crop), resample=self.resample)
        pixels = torch.from_numpy(np.asarray(grey, dtype=np.float32).copy())[None]
        return (pixels / 255.0 - self.mean) / self.std

    def to_unit_range(self, tensor: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: model input -> grey values in ``[0, 1]`` (for display)."""
        return (tensor * self.std + self.mean).clamp(0.0, 1.0)

    def heatmap_to_original(self, heatmap: torch.Tensor, original_size: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
        """Map a heatmap ``(h, w)`` covering the 28 x 28 input evenly (pixel scores, or Grad-CAM's 7 x 7)
        onto the original image: ``(height, width)``, bilinear at each original pixel centre."""
        scale, crop_box = self.geometry(original_size)
        return grid_to_original(heatmap, original_size, scale, crop_box, fill)


PREPROCESS = GreyPreprocess()


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Fashion-MNIST uint8 images ``(N, 28, 28)`` -> the normalised model input ``(N, 1, 28, 28)``
    float32, the same values as :meth:`GreyPreprocess.to_tensor` on each image."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        raise ParameterError(f"expected uint8 images (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.dtype} {images.shape}")
    pixels = torch.from_numpy(images.astype(np.float32))[:, None]
    return (pixels / 255.0 - TRAIN_MEAN) / TRAIN_STD


def load_metadata(kind: str) -> dict[str, Any]:
    """The training record of ``kind``: test accuracy, seed, epochs, command (see the training script)."""
    path = metadata_path(kind)
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    return data


def build_fmnist(kind: str = "cnn") -> tuple[FashionCNN, GreyPreprocess, list[str]]:
    """Load ``kind`` ("cnn": full precision, "bnn": binarized) with its committed weights: the model in
    eval mode (float32, CPU), its preprocessing and the 10 class names.

    ``model(preprocess.to_tensor(image)[None])`` gives ``(1, 10)`` logits.

    Raises:
        ParameterError: an unknown kind.
        ModelLoadError: the weights file is missing or does not fit the network.
    """
    path = weights_path(kind)
    model = FashionCNN(binary=kind == "bnn")
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as error:  # missing, or not a safetensors file
        raise ModelLoadError(f"cannot read the {kind} weights {path}: {error}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ModelLoadError(f"the weights in {path} do not fit the {kind} network: {first_line}") from None
    return model.float().eval(), PREPROCESS, list(CLASS_NAMES)
