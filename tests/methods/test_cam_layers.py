"""CAM layers read at a module's input (``"name:input"``, a forward pre-hook) and channels-last
outputs (``":nhwc"``), and the automatic choice of the global pooling's input (issue 9).

Checked: a pooling module's input equals the output of the unshared activation before it, for
every CAM, at the layer named either way and at the automatic layer (which keeps the activation's
name when the two are the same tensor); several targets in one batch equal each alone and several
images in shared calls equal each alone at an ``":input"`` layer; no hook is left on any module
after a run or after an exception raised inside the model; the ``":input"`` and ``":nhwc"``
suffixes combine; on EfficientNet-Lite0 the automatic layer is the activated map (values in
[0, 6], ReLU6) and Grad-CAM's map there is not constant.

Tolerances: float64 models. Reading a tensor at the next module's input or at the previous module's
output runs the same operations in the same order, so 1e-12 of the largest value (round-off free in
practice); batches of several rows against one row may differ in the convolutions' summation order:
1e-10 of the largest value.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience.errors import ParameterError
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import LABELS, photo

GRID = 16
CAMS = ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "score_cam", "ablation_cam")


def pooled_cnn(seed: int = 4) -> nn.Module:
    """conv - ReLU - conv(stride 2) - ReLU (an unshared module) - global average pooling - Linear:
    the pooling's input is the second ReLU's output."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        net[2].bias.add_(0.2)
        net[-1].weight.mul_(4.0)
    return net.double().eval()


def classifier(net: nn.Module, **options: object) -> ImageClassifier:
    return ImageClassifier(net, labels=LABELS, name="pooled-cnn", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, GRID, GRID, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def explain(model: ImageClassifier, inputs: object, method: str, **options: object) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salience.explain(model, inputs, method=method, progress=False, **options)


def close(actual: object, expected: object, rel: float) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0,
                               atol=rel * max(float(np.abs(expected).max()), 1e-300))


def hooks(net: nn.Module) -> list[tuple[int, ...]]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [tuple(len(getattr(m, kind)) for kind in kinds) for m in net.modules()]


# ------------------------------------------------------------------ the input of a module
@pytest.mark.parametrize("method", CAMS)
def test_the_poolings_input_equals_the_activations_output(x, method):
    net = pooled_cnn()
    model = classifier(net)
    at_input = explain(model, x, method, layer="4:input", target="all")
    at_output = explain(model, x, method, layer="3", target="all")
    assert at_input.params["layer"] == "4:input" and at_output.params["layer"] == "3"
    close(at_input.extras["cam"], at_output.extras["cam"], 1e-12)
    close(at_input.token_scores, at_output.token_scores, 1e-12)
    assert np.ptp(at_input.token_scores) > 0
    # the automatic layer: the ReLU, whose output is the pooling's input (so it keeps the module's name)
    auto = explain(model, x, method, target="all")
    assert auto.params["layer"] == "3"
    close(auto.token_scores, at_output.token_scores, 1e-12)
    assert not any(any(counts) for counts in hooks(net))


@pytest.mark.parametrize("method", ["grad_cam", "score_cam"])
def test_targets_in_one_batch_equal_each_alone_at_an_input(x, method):
    model = classifier(pooled_cnn())
    one = explain(model, x, method, layer="4:input", target="all", batch_size=1)
    many = explain(model, x, method, layer="4:input", target="all")
    close(one.token_scores, many.token_scores, 1e-10)
    for row in range(3):
        alone = explain(model, x, method, layer="4:input", target=row)
        close(many.token_scores[row], alone.token_scores, 1e-10)


@pytest.mark.parametrize("method", ["grad_cam", "ablation_cam"])
def test_images_in_shared_calls_equal_each_alone_at_an_input(method):
    model = ImageClassifier(pooled_cnn(), ImagePreprocess(crop=GRID), LABELS, name="pooled-cnn")
    pictures = [photo(), 255 - photo(seed=1), photo(24, 18, seed=2)]
    together = explain(model, pictures, method, layer="4:input")
    for listed, image in zip(together, pictures, strict=True):
        alone = explain(model, image, method, layer="4:input")
        assert listed.target == alone.target and listed.params["layer"] == "4:input"
        close(listed.extras["cam"], alone.extras["cam"], 1e-10)
        close(listed.token_scores, alone.token_scores, 1e-10)


class Boom(nn.Module):
    """Raises on its ``fail_at``-th call (0: never)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, 0

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return value


@pytest.mark.parametrize("method", ["grad_cam", "score_cam"])
def test_no_pre_hook_left_after_an_exception(x, method):
    net = pooled_cnn()
    net.insert(5, Boom())  # after the pooling: runs in every pass that reaches the layer's input
    model = classifier(net)
    explain(model, x, method, layer="4:input", batch_size=2)
    total = net[5].calls  # the prediction's pass, then the layer's passes
    assert total >= 2
    for fail_at in (2, total):  # the first and the last pass that reads the layer
        net[5].calls, net[5].fail_at = 0, fail_at
        with pytest.raises(RuntimeError, match="boom"):
            explain(model, x, method, layer="4:input", batch_size=2)
        assert not any(any(counts) for counts in hooks(net))


def test_a_shared_module_read_at_its_input_is_refused(x):
    act = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 4, 3, padding=1), act, nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).double().eval()
    with pytest.raises(ParameterError, match=r"layer '1:input' runs 2 times in one forward pass"):
        explain(classifier(net), x, "grad_cam", layer="1:input")
    assert not any(any(counts) for counts in hooks(net))


# ------------------------------------------------------------------ channels last
class NHWCHead(nn.Module):
    """A user's head that takes a channels-last map (N, H, W, C): mean over positions, then linear."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 3)

    def forward(self, nhwc: torch.Tensor) -> torch.Tensor:
        return self.linear(nhwc.mean(dim=(1, 2)))


class ToNHWC(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value.permute(0, 2, 3, 1)


def test_input_and_channels_last_combine(x):
    torch.manual_seed(6)
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU())
    head = NHWCHead(5)
    net = nn.Sequential(conv, ToNHWC(), head).double().eval()
    model = classifier(net)
    with pytest.raises(ParameterError, match=r"looks channels-last .*layer='2:nhwc'"):
        explain(model, x, "grad_cam", layer="2:input")
    reference = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head.linear).double().eval()
    for method in ("grad_cam", "score_cam", "ablation_cam"):
        declared = explain(model, x, method, layer="2:input:nhwc", target="all")
        plain = explain(classifier(reference), x, method, layer="0", target="all")
        assert declared.params["layer"] == "2:input:nhwc"
        close(declared.extras["cam"], plain.extras["cam"], 1e-12)
        close(declared.token_scores, plain.token_scores, 1e-12)


# ------------------------------------------------------------------ EfficientNet-Lite0
def test_efficientnet_automatic_layer_is_the_activated_head():
    """Its head ReLU6 ``_swish`` is shared with the stem, so ``_bn1`` (before it) was chosen: the
    pooling's input is read instead, the activated map (in [0, 6])."""
    from salience.datasets.photos import load_photos

    model = salience.load_model("zoo:efficientnet-lite0")
    coffee = next(p for p in load_photos() if p.id == "coffee")
    e = explain(model, coffee.path, "grad_cam")
    assert e.params["layer"] == "_avg_pooling:input"
    cam = np.array(e.extras["cam"])
    assert cam.shape == (1, 7, 7) and np.ptp(cam) > 0 and np.ptp(e.scores) > 0
    kept = {}
    handle = model.model._avg_pooling.register_forward_pre_hook(lambda _m, inputs: kept.setdefault("a", inputs[0]))
    try:
        with torch.no_grad():
            model.model(model.encode(coffee.path).pixels[None])
    finally:
        handle.remove()
    assert float(kept["a"].min()) >= 0 and float(kept["a"].max()) <= 6 and float(kept["a"].max()) > 0


class SideBranch(nn.Module):
    """The pooled CNN plus a convolution of the input whose output the logits never read."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.side = pooled_cnn(), nn.Conv2d(3, 2, 3, padding=1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side(x)  # computed, unused (an auxiliary output, say)
        return self.main(x)


@pytest.mark.parametrize("method", ["grad_cam", "layer_cam"])
def test_a_layer_off_the_outputs_path_is_refused_not_a_map_of_zeros(x, method):
    with pytest.raises(ParameterError, match="does not depend on layer 'side'"):
        explain(classifier(SideBranch().eval()), x, method, layer="side")
