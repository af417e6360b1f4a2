"""Guided backpropagation, deconvnet and Guided Grad-CAM (salience.methods.guided, rules in
salience.methods.rules).

Checked: the rules by hand on a 2-layer ReLU net; per channel against Captum's GuidedBackprop and
Deconvolution on a tiny float64 ReLU CNN and on the text toy with ReLU activations; ReLU6 against
Captum once Captum can see it (a ``nn.ReLU`` subclass computing ReLU6; Captum hooks ``nn.ReLU``
modules only, so on a ReLU6 model its GuidedBackprop is the plain gradient), also on
EfficientNet-Lite0; Guided Grad-CAM against Captum's GuidedGradCam (both interpolations);
in-place, shared-module, functional and tensor-method ReLUs equal separate ``nn.ReLU`` modules;
models without a ReLU-family unit are refused; nothing survives a run or an exception raised
inside the model.

Tolerances: Salience and Captum run the same float64 graph and differ only in where the rule is
applied (a custom autograd Function around the ReLU vs a full backward hook on the module), i.e.
in the summation order of round-off at most: 1e-12 of the largest value (observed: below 3e-16).
EfficientNet-Lite0 is float32: 1e-6 of the largest value (observed: 0.0). The ReLU forms compute
the same operations in the same order, so they agree exactly (atol 0).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import salience
from oracles import require
from salience.core.registry import get_method
from salience.errors import ParameterError
from salience.methods.rules import gradient_rule, guided_rule, relu_rules
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import photo, tiny_classifier

captum_attr = require("captum.attr")

GRID = 16
RELU_FORMS = ("modules", "inplace", "shared", "functional", "tensor_method")
RELU6_FORMS = ("relu6", "relu6_inplace", "relu6_functional", "hardtanh_zero_six")
CAPTUM = {"guided_backprop": "GuidedBackprop", "deconvnet": "Deconvolution"}


class ReluCNN(nn.Module):
    """conv(3->6) - unit - conv(6->8, stride 2) - unit - AdaptiveAvgPool(2) - Linear(32, 3), float64,
    eval, seeded. ``form`` says how the two units are written; every form of ReLU (and every form
    of ReLU6) computes the same function with the same weights. The first conv's weights are scaled
    so that some units exceed 6 (ReLU6 saturates). ``fail`` raises inside forward, after a unit."""

    def __init__(self, form: str = "modules", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.form = form
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.linear = nn.Linear(32, 3)
        with torch.no_grad():
            self.conv1.weight.mul_(20.0)
            self.linear.weight.mul_(4.0)
        units = {"modules": (nn.ReLU(), nn.ReLU()), "inplace": (nn.ReLU(inplace=True), nn.ReLU(inplace=True)),
                 "relu6": (nn.ReLU6(), nn.ReLU6()), "relu6_inplace": (nn.ReLU6(inplace=True), nn.ReLU6(inplace=True))}
        if form == "shared":
            shared = nn.ReLU()
            units["shared"] = (shared, shared)
        self.unit1, self.unit2 = units.get(form, (nn.Identity(), nn.Identity()))
        self.fail = False
        self.double().eval()

    def _unit(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.form == "functional":
            return F.relu(x)
        if self.form == "tensor_method":
            return x.relu()
        if self.form == "relu6_functional":
            return F.relu6(x)
        if self.form == "hardtanh_zero_six":
            return F.hardtanh(x, 0.0, 6.0)
        return module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._unit(self.unit1, self.conv1(x))
        if self.fail:
            raise RuntimeError("boom")
        x = self._unit(self.unit2, self.conv2(x))
        return self.linear(F.adaptive_avg_pool2d(x, 2).flatten(1))


class CaptumVisibleReLU6(nn.ReLU):
    """ReLU6 as an ``nn.ReLU`` subclass, so that Captum's ModifiedReluGradientAttribution hooks it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, 0.0, 6.0)


def _classifier(net: nn.Module) -> ImageClassifier:
    return ImageClassifier(net, ImagePreprocess(crop=GRID), ["cat", "dog", "bird"], name=f"relu-cnn-{getattr(net, 'form', '')}")


def _input(model: ImageClassifier, image: np.ndarray) -> torch.Tensor:
    return model.preprocess.to_tensor(Image.fromarray(image)).double()[None]  # (1, C, H, W), independent of Salience


def _per_channel(e: salience.Explanation, row: int = 0) -> np.ndarray:
    """The explanation's per-channel map (T, P, C) as the (C, H, W) image of target ``row``."""
    per_channel = e.extras["_per_channel"][row]
    side = int(np.sqrt(per_channel.shape[0]))
    return per_channel.reshape(side, side, -1).transpose(2, 0, 1)


def _captum(method: str, net: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that it sets backward hooks
        return getattr(captum_attr, CAPTUM[method])(net).attribute(x.clone(), target=target)[0].detach().numpy()


def _plain_gradient(net: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(net(x)[0, target], x)
    return gradient[0].numpy()


def _close(actual: np.ndarray, expected: np.ndarray, relative: float = 1e-12) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=relative * np.abs(expected).max())


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return photo()


# ------------------------------------------------------------------ the rules by hand
def _hand_net() -> nn.Module:
    """f = w3 . relu(W2 relu(W1 x)) with x = (1, 2) as a (1, 1, 2) "image": the forward pass gives
    h = W1 x = (1, 2, -1), r = (1, 2, 0), u = W2 r = (-1, 1), s = (0, 1), f = 3 (class 0)."""
    first, second, last = nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        second.weight.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]))
        last.weight.copy_(torch.tensor([[-2.0, 3.0], [0.0, 0.0]]))
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), second, nn.ReLU(), last).double().eval()


# Backward from df/ds = (-2, 3), with masks [u > 0] = (0, 1) and [h > 0] = (1, 1, 0), W1^T d = (d1 + d3, d2 - d3):
#   plain:   du = (0, 3);                 dr = W2^T du = (-3, 3, 3); dh = dr [h > 0] = (-3, 3, 0)       -> (-3, 3)
#   guided:  du = relu(-2, 3) (0, 1) = (0, 3); dr = (-3, 3, 3);      dh = relu(dr) [h > 0] = (0, 3, 0) -> (0, 3)
#   deconv:  du = relu(-2, 3) = (0, 3);   dr = (-3, 3, 3);           dh = relu(dr) = (0, 3, 3)         -> (3, 0)
@pytest.mark.parametrize(("method", "expected"), [("saliency", [-3.0, 3.0]), ("guided_backprop", [0.0, 3.0]),
                                                  ("deconvnet", [3.0, 0.0])])
def test_rules_by_hand(method, expected):
    model = ImageClassifier(_hand_net(), input_shape=(1, 1, 2), labels=["a", "b"])
    params = {"abs": False}
    e = salience.explain(model, torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), method=method, target=0, output="logit", **params)
    assert e.output_value == 3.0
    np.testing.assert_array_equal(e.scores, expected)  # small integers: exact in float64


def test_the_gradient_rule_reproduces_autograd():
    """The machinery itself: with the ordinary derivative as the rule, every form gives autograd's gradient."""
    x = torch.randn(2, 3, GRID, GRID, dtype=torch.float64)
    for form in RELU_FORMS + RELU6_FORMS:
        net = ReluCNN(form)
        with relu_rules(gradient_rule) as mode:
            ruled = _plain_gradient(net, x[:1], 1)
        assert mode.applied == 2, form
        np.testing.assert_array_equal(ruled, _plain_gradient(net, x[:1], 1))


# ------------------------------------------------------------------ against Captum
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
@pytest.mark.parametrize("target", [0, 2])
def test_equals_captum_per_channel(image, method, target):
    net = ReluCNN("modules")
    model = _classifier(net)
    x = _input(model, image)
    e = salience.explain(model, image, method=method, target=target, output="logit")
    expected = _captum(method, net, x, target)
    _close(_per_channel(e), expected)
    _close(e.token_scores, expected.sum(0).reshape(-1))  # position score: summed over channels, signed
    _close(e.scores, expected.sum(0).reshape(-1))  # pixel features
    absolute = salience.explain(model, image, method=method, target=target, output="logit", abs=True)
    _close(absolute.token_scores, np.abs(expected).sum(0).reshape(-1))
    plain = _plain_gradient(net, x, target)
    assert np.abs(expected - plain).max() > 0.1 * np.abs(plain).max()  # the rule did change the gradient


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_relu6_equals_captum_once_captum_can_see_it(image, method):
    """Captum hooks nn.ReLU modules only: on nn.ReLU6 its result is the plain gradient. With the
    same units written as an nn.ReLU subclass (ReLU6's function), Captum applies the rule, and
    equals Salience on the original model."""
    net = ReluCNN("relu6")
    model = _classifier(net)
    x = _input(model, image)
    with torch.no_grad():
        assert float(net.conv1(x).max()) > 6.0  # some units saturate: ReLU6 differs from ReLU here
    e = salience.explain(model, image, method=method, target=1, output="logit")
    _close(_captum(method, net, x, 1), _plain_gradient(net, x, 1))  # Captum leaves ReLU6 alone
    net.unit1, net.unit2 = CaptumVisibleReLU6(), CaptumVisibleReLU6()
    _close(_per_channel(e), _captum(method, net, x, 1))
    relu = salience.explain(_classifier(ReluCNN("modules")), image, method=method, target=1, output="logit")
    if method == "guided_backprop":
        assert np.abs(relu.scores - e.scores).max() > 1e-3 * np.abs(e.scores).max()  # the upper bound matters
    else:
        np.testing.assert_array_equal(relu.scores, e.scores)  # deconvnet ignores the forward pass, bounds included


def test_efficientnet_lite0_relu6_modules_used_twice():
    """EfficientNet-Lite0: 17 nn.ReLU6 modules, most called twice per forward (33 calls). Captum's
    GuidedBackprop is its plain gradient; with the modules swapped for Captum-visible ReLU6 it
    equals Salience's guided backprop run on the unchanged model."""
    model = salience.load_model("zoo:efficientnet-lite0")
    net, target = model.model, 285  # Egyptian cat, the prediction
    image = photo(64, 64)
    x = model.encode(image).pixels[None]
    with relu_rules(guided_rule) as mode:
        model.model(x.clone().requires_grad_(True))
    assert mode.applied == 33
    e = salience.explain(model, image, method="guided_backprop", target=target, output="logit")
    _close(_captum("guided_backprop", net, x, target), _plain_gradient(net, x, target), 1e-6)
    relu6 = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
             if isinstance(child, nn.ReLU6)]
    try:
        for parent, name, _ in relu6:
            setattr(parent, name, CaptumVisibleReLU6())
        expected = _captum("guided_backprop", net, x, target)
    finally:
        for parent, name, child in relu6:
            setattr(parent, name, child)
    _close(_per_channel(e), expected, 1e-6)


def test_text_classifier_with_relu_units_equals_captum(toy):
    """Methods are blind to the model kind: the toy BERT with ReLU feed-forward activations,
    attributed at the word-embedding output as every text method is."""
    for layer in toy.model.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = nn.ReLU()
    text = "the film was good , but the plot was dull"
    # abs=True: a gradient at a LayerNorm input sums to 0 over the embedding dimensions (LayerNorm
    # ignores a constant added to every dimension), so the signed sum is round-off here
    e = salience.explain(toy, text, method="guided_backprop", target=1, output="logit", level="token", abs=True)
    encoded = toy.encode(text)
    ids, types = encoded.input_ids[None], encoded.token_type_ids[None]
    embeds = toy.model.bert.embeddings.word_embeddings(ids).detach()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = toy.model  # hooked by Captum through this module's children

        def forward(self, embeds: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            return self.bert(inputs_embeds=embeds, token_type_ids=types, attention_mask=mask).logits

    expected = _captum("guided_backprop", Logits(), embeds, 1)  # (L, D)
    _close(e.extras["_per_channel"][0], expected)
    _close(e.token_scores, np.abs(expected).sum(-1))


# ------------------------------------------------------------------ ways of writing a ReLU
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
@pytest.mark.parametrize("form", RELU_FORMS[1:] + RELU6_FORMS[1:])
def test_every_way_of_writing_the_unit_gives_the_same_answer(image, method, form):
    """In-place modules, one module called twice, F.relu / F.relu6 / F.hardtanh(0, 6) and
    Tensor.relu inside forward() give what separate nn.ReLU (nn.ReLU6) modules give."""
    reference_form = "modules" if form in RELU_FORMS else "relu6"
    reference = salience.explain(_classifier(ReluCNN(reference_form)), image, method=method, target="all", output="logit")
    net = ReluCNN(form)
    e = salience.explain(_classifier(net), image, method=method, target="all", output="logit")
    np.testing.assert_array_equal(e.extras["_per_channel"], reference.extras["_per_channel"])
    np.testing.assert_array_equal(e.scores, reference.scores)
    assert [getattr(m, "inplace", False) for m in (net.unit1, net.unit2)] == [form.endswith("inplace")] * 2  # as the user set them


def test_models_without_relu_units_are_refused(image):
    with pytest.raises(ParameterError, match=r"guided_backprop needs ReLU-family units .* tiny-cnn has none"):
        salience.explain(tiny_classifier(), image, method="guided_backprop")  # Softplus and Tanh
    hardtanh = nn.Sequential(nn.Flatten(), nn.Linear(3 * GRID * GRID, 8), nn.Hardtanh(), nn.Linear(8, 3)).double().eval()
    with pytest.raises(ParameterError, match="deconvnet needs ReLU-family units"):  # Hardtanh(-1, 1) is not a clipped ReLU
        salience.explain(_classifier(hardtanh), image, method="deconvnet")


def test_text_classifier_without_relu_units_is_refused(toy):
    with pytest.raises(ParameterError, match=r"needs ReLU-family units .*method='saliency', abs=False"):
        salience.explain(toy, "the film was good", method="gbp")  # the toy BERT uses GELU


# ------------------------------------------------------------------ state, batching, targets
def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules())


def _state(net: nn.Module) -> tuple:
    return (_hooks(net), [p.requires_grad for p in net.parameters()], [m.training for m in net.modules()],
            [getattr(m, "inplace", None) for m in net.modules()], [p.grad is None for p in net.parameters()],
            torch._C._len_torch_function_stack())


@pytest.mark.parametrize("method", ["guided_backprop", "guided_gradcam"])
@pytest.mark.parametrize("form", ["inplace", "shared", "relu6_inplace"])
def test_nothing_survives_an_exception_inside_the_model(image, method, form):
    net = ReluCNN(form)
    model = _classifier(net)
    x = _input(model, image)
    net.conv2.weight.requires_grad_(False)  # a user's own choice
    plain, before = _plain_gradient(net, x, 0), _state(net)
    params = {"layer": "conv2"} if method == "guided_gradcam" else {}
    guided = salience.explain(model, image, method=method, target=0, **params)
    net.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        salience.explain(model, image, method=method, target=0, **params)
    net.fail = False
    assert _state(net) == before
    np.testing.assert_array_equal(_plain_gradient(net, x, 0), plain)  # no rule left active
    np.testing.assert_array_equal(salience.explain(model, image, method=method, target=0, **params).scores, guided.scores)
    with pytest.raises(ParameterError):
        salience.explain(tiny_classifier(), image, method=method)  # the refusal path (after Grad-CAM's pass, for guided_gradcam)
    assert _state(net) == before and torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_batched_equals_unbatched_and_targets_share_a_call(image, method):
    model = _classifier(ReluCNN("shared"))
    one = salience.explain(model, image, method=method, target="all", batch_size=1)
    many = salience.explain(model, image, method=method, target="all", batch_size=64)
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-9, atol=1e-14)  # float64; BLAS order only
    backward_rows = 6 if method == "guided_gradcam" else 3  # one per target (Grad-CAM's and the guided pass)
    assert one.cost.model_calls > many.cost.model_calls and one.cost.backward_passes == many.cost.backward_passes == backward_rows
    for row in range(3):
        alone = salience.explain(model, image, method=method, target=row)
        np.testing.assert_allclose(many.scores[row], alone.scores, rtol=1e-9, atol=1e-14)
    assert many.heatmap(0).shape == image.shape[:2]


# ------------------------------------------------------------------ Guided Grad-CAM
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
@pytest.mark.parametrize("form", ["modules", "inplace", "relu6"])
def test_guided_gradcam_equals_captum(image, form, upsample):
    """Captum's GuidedGradCam: its GuidedBackprop times LayerGradCam(relu_attributions=True)
    interpolated to the input (``interpolate_mode``). The layer's output is modified in place by
    the next unit in the "inplace" form. For ReLU6, Captum sees the units once they are nn.ReLU."""
    net = ReluCNN(form)
    model = _classifier(net)
    x = _input(model, image)
    e = salience.explain(model, image, method="guided_gradcam", target=2, output="logit", layer="conv2", upsample=upsample)
    if form == "relu6":
        net.unit1, net.unit2 = CaptumVisibleReLU6(), CaptumVisibleReLU6()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = captum_attr.GuidedGradCam(net, net.conv2).attribute(x.clone(), target=2, interpolate_mode=upsample)[0]
    expected = expected.detach().numpy()
    _close(_per_channel(e), expected)
    _close(e.token_scores, expected.sum(0).reshape(-1))
    assert e.params["layer"] == "conv2" and np.asarray(e.extras["cam"]).shape == (1, GRID // 2, GRID // 2)
    assert e.cost.backward_passes == 2 and e.cost.forward_passes == 3  # Grad-CAM's, guided backprop's, the prediction


def test_guided_gradcam_refuses_models_without_relu_units_or_layers(image, toy):
    with pytest.raises(ParameterError, match="guided_gradcam needs ReLU-family units"):
        salience.explain(tiny_classifier(), image, method="guided_gradcam")
    with pytest.raises(ParameterError, match="needs layer activations"):
        salience.explain(toy, "the film was good", method="guided_gradcam")


def test_registered_names_and_parameters():
    assert get_method("gbp").name == get_method("guided-backpropagation").name == "guided_backprop"
    assert get_method("deconvolution").name == "deconvnet"
    assert get_method("guided_backprop").parameters() == {"abs": (False, "bool")}
    assert get_method("guided-grad-cam").name == "guided_gradcam" and get_method("guided_gradcam").kind == "cam"
