"""LRP: each rule against its textbook formula on one dense layer, conservation (whole network and
layer by layer) on a tiny float64 CNN with batch norm and a residual block, epsilon-LRP = gradient
x input without biases, the epsilon composite against Captum's LRP, nothing left modified, and
one-line refusals. Tolerances: float64 throughout; 1e-12 where the same arithmetic is written out
(only the order of the sums differs: rounding ~1e-16 relative on O(1) values)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.oracles import require
from torch import nn

import salience
from salience.errors import ParameterError
from salience.methods.lrp_composites import parse_composite
from salience.methods.lrp_mode import LRPMode
from salience.methods.lrp_rules import AlphaBeta, Epsilon, Flat, Gamma, Layer, WSquare, ZBox
from salience.models.image import ImageClassifier

S = 1e-6  # the rules' stabiliser in the formulas below, as in the code


def stab(d: float, e: float = S) -> float:
    return d + e * (1.0 if d >= 0 else -1.0)


@pytest.fixture
def dense() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)  # (out j, in i)
    b = torch.randn(4, generator=g, dtype=torch.float64) * 0.3
    x = torch.randn(1, 5, generator=g, dtype=torch.float64)
    r = torch.randn(1, 4, generator=g, dtype=torch.float64)  # relevance at the outputs
    return w, b, x, r


def check(found: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(found[0].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_epsilon_rule(dense):
    w, b, x, r = dense
    W, B, X, R = w.numpy(), b.numpy(), x[0].numpy(), r[0].numpy()
    eps = 0.1
    z = [sum(X[i] * W[j, i] for i in range(5)) + B[j] for j in range(4)]
    expected = np.array([sum(X[i] * W[j, i] / stab(z[j], eps) * R[j] for j in range(4)) for i in range(5)])
    check(Epsilon(eps).relevance(Layer(F.linear, w, b), x, r), expected)


def test_gamma_rule_textbook_for_positive_inputs(dense):
    w, b, x, r = dense
    x = x.abs()
    W, B, X, R, g = w.numpy(), b.numpy(), x[0].numpy(), r[0].numpy(), 0.25
    expected = np.zeros(5)
    for j in range(4):
        z = X @ W[j] + B[j]
        up = W[j] + g * np.where(z > 0, np.maximum(W[j], 0), np.minimum(W[j], 0))
        bias = B[j] + g * (max(B[j], 0) if z > 0 else min(B[j], 0))
        expected += X * up / stab(X @ up + bias) * R[j]
    check(Gamma(g).relevance(Layer(F.linear, w, b), x, r), expected)


@pytest.mark.parametrize(("alpha", "beta"), [(2.0, 1.0), (1.0, 0.0)])
def test_alpha_beta_rule(dense, alpha, beta):
    w, b, x, r = dense
    W, B, X, R = w.numpy(), b.numpy(), x[0].numpy(), r[0].numpy()
    expected = np.zeros(5)
    for j in range(4):
        p, n = np.maximum(X * W[j], 0), np.minimum(X * W[j], 0)
        expected += (alpha * p / stab(p.sum() + max(B[j], 0)) - beta * n / stab(n.sum() + min(B[j], 0))) * R[j]
    check(AlphaBeta(alpha, beta).relevance(Layer(F.linear, w, b), x, r), expected)


def test_flat_and_w_square_rules(dense):
    w, b, x, r = dense
    W, R = w.numpy(), r[0].numpy()
    flat = np.array([sum(R[j] / stab(5.0) for j in range(4)) for i in range(5)])
    check(Flat().relevance(Layer(F.linear, w, b), x, r), flat)
    square = np.array([sum(W[j, i] ** 2 / stab((W[j] ** 2).sum()) * R[j] for j in range(4)) for i in range(5)])
    check(WSquare().relevance(Layer(F.linear, w, b), x, r), square)


def test_zbox_rule(dense):
    w, b, x, r = dense
    low, high = torch.full((1,), -2.5, dtype=torch.float64), torch.full((1,), 2.5, dtype=torch.float64)
    W, X, R = w.numpy(), x[0].numpy(), r[0].numpy()
    expected = np.zeros(5)
    for j in range(4):
        t = X * W[j] + 2.5 * np.maximum(W[j], 0) - 2.5 * np.minimum(W[j], 0)  # x w - l w+ - h w-
        expected += t / stab(t.sum()) * R[j]
    check(ZBox(low, high).relevance(Layer(F.linear, w, b), x, r), expected)


def test_one_layer_network_output_relevance_is_the_logit(dense):
    """Through explain(): z+ on one linear layer (no bias) is the formula with R_out = the logit."""
    w, _, x, _ = dense
    net = nn.Sequential(nn.Flatten(), nn.Linear(5, 4, bias=False)).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(w)
    model = ImageClassifier(net, labels=list("abcd"), input_shape=(5, 1, 1))
    e = salience.explain(model, x[0].reshape(5, 1, 1), method="lrp", composite={"linear": "zplus"}, target=2)
    W, X = w.numpy(), x[0].numpy()
    p = np.maximum(X * W[2], 0)
    logit = X @ W[2]
    per_channel = np.asarray(e.extras["_per_channel"])[0, 0]  # target 0, the one position, 5 channels
    np.testing.assert_allclose(per_channel, p / stab(p.sum()) * logit, rtol=1e-12, atol=1e-12)
    assert e.extras["conservation"][0]["output"] == pytest.approx(logit, abs=1e-12)


def test_an_input_equal_to_zero_passes_nothing_back():
    """x = [0.5, 1] -> identity layer -> ReLU -> minus 0.5 -> sum layer: the second layer's first
    input is 0 though the ReLU's output behind it is 0.5; it has no relevance and passes none back
    (c set to 0 there), so the input's relevance is [0, 1 / (1 + e)] with the epsilon rule's
    z / stab(z) factors written out (1e-12)."""
    first, second = nn.Linear(2, 2, bias=False).double(), nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        first.weight.copy_(torch.eye(2, dtype=torch.float64))
        second.weight.fill_(1.0)
    x = torch.tensor([[0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    with LRPMode(parse_composite("epsilon"), eps=S):
        out = second(torch.relu(first(x)) - 0.5)
        (c,) = torch.autograd.grad(out.sum(), x)
    relevance = (x * c).detach().numpy()[0]
    expected_second = 0.5 * 0.5 / (0.5 + S) / 0.5  # R_out / stab(z) times the input 0.5 (the only one not 0)
    np.testing.assert_allclose(relevance, [0.0, expected_second * 1.0 / (1.0 + S)], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- a tiny CNN with batch norm and a residual block
class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x))) + x


def tiny_residual_cnn(shift: bool = False, seed: int = 0) -> nn.Module:
    """Conv - BN - ReLU - residual block - MaxPool - AdaptiveAvgPool - Linear, float64, no biases;
    the batch norms' shift beta - mean * scale is 0 unless ``shift`` (then the merged layers have biases)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), Block(4), nn.MaxPool2d(2),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3, bias=False)).double().eval()
    with torch.no_grad():
        for bn in (net[1], net[3].bn):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bn.bias.copy_(bn.running_mean * scale + (torch.randn(4, dtype=torch.float64) * 0.2 if shift else 0.0))
    return net


def classifier(net: nn.Module) -> ImageClassifier:
    return ImageClassifier(net, labels=["a", "b", "c"], input_shape=(3, 8, 8))


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat"])
def test_conservation_whole_and_layer_by_layer(composite):
    """Without biases and with tiny stabilisers every rule here conserves: each layer's input
    relevance sums to its output relevance, and the input's to the logit (relative 1e-9: the
    stabiliser 1e-13 over pre-activations of order 0.1)."""
    e = salience.explain(classifier(tiny_residual_cnn()), image(), method="lrp", composite=composite, eps=1e-13,
                         stabiliser=1e-13, target="all", trace=True)
    for t, row in enumerate(e.extras["conservation"]):
        assert row["relevance_sum"] == pytest.approx(float(np.sum(e.scores[t])), abs=1e-12)
        assert abs(row["error"]) <= 1e-9 * max(1.0, abs(row["output"])), row
    layers = e.extras["_layers"]
    assert [t["layer"] for t in layers][-1] == "0+bn"  # the input layer (merged with its batch norm) comes last
    for t in layers:
        np.testing.assert_allclose(t["relevance_in"], t["relevance_out"], rtol=1e-9, atol=1e-12)
    assert e.params["batch_norm_merged"] == 2 and e.params["composite"] == composite


def test_conservation_breaks_by_the_bias_relevance_only():
    """With batch-norm shifts (biases after merging) epsilon does not conserve; the scores still sum
    to the reported relevance sum, and the error is what the biases absorbed (not asserted small)."""
    e = salience.explain(classifier(tiny_residual_cnn(shift=True)), image(), method="lrp", composite="epsilon", target=0)
    row = e.extras["conservation"][0]
    assert np.sum(e.scores) == pytest.approx(row["relevance_sum"], abs=1e-12)
    assert row["error"] == pytest.approx(row["relevance_sum"] - row["output"], abs=1e-15)
    assert abs(row["error"]) > 1e-6


def test_epsilon_without_biases_equals_gradient_times_input():
    """eps = 0 and stabiliser 0 (a zero denominator is replaced by 1; its relevance is 0): LRP-0 on
    a ReLU network without biases or batch-norm shifts, with max and average pooling and a residual
    sum, is gradient x input (1e-12)."""
    model = classifier(tiny_residual_cnn())
    lrp = salience.explain(model, image(), method="lrp", composite="epsilon", eps=0.0, stabiliser=0.0, target="all")
    ixg = salience.explain(model, image(), method="input_x_gradient", output="logit", target="all")
    np.testing.assert_allclose(np.asarray(lrp.scores), np.asarray(ixg.scores), rtol=1e-12, atol=1e-12)


class Flattening(nn.Module):
    """Conv - ReLU - MaxPool - Conv - ReLU, flattened in forward (Captum has no rule for nn.Flatten), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU())
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_epsilon_composite_equals_captum_lrp():
    """Captum's LRP (EpsilonRule 1e-9 on Linear, Conv2d and MaxPool2d; ReLU passes) on a model with
    biases: equal to rtol 1e-7, atol 1e-8 of the largest score (Captum also stabilises max pooling,
    which Salience passes winner-take-all: a relative change eps / |z|, 1e-6 where a pooled value is
    1e-3, on scores 1e-3 of the largest: 1e-11 absolute, as measured)."""
    captum_attr = require("captum.attr")
    torch.manual_seed(3)
    net = Flattening().double().eval()
    x = image(4)
    e = salience.explain(classifier(net), x, method="lrp", composite="epsilon", eps=1e-9, target="all")
    for t in range(3):
        theirs = captum_attr.LRP(net).attribute(x[None].clone().requires_grad_(True), target=t)[0]  # (C, H, W)
        ours = torch.as_tensor(e.extras["_per_channel"][t]).reshape(8, 8, 3).permute(2, 0, 1)
        theirs = theirs.detach()
        scale = float(theirs.abs().max())
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-7, atol=1e-8 * scale)


# ---------------------------------------------------------------- nothing left modified
def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict(keep_vars=True).items()}


def _assert_untouched(net: nn.Module, fresh: nn.Module, x: torch.Tensor) -> None:
    ours, theirs = _state(net), _state(fresh)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert [p.requires_grad for p in net.parameters()] == [p.requires_grad for p in fresh.parameters()]
    assert net.training == fresh.training
    with torch.no_grad():
        assert torch.equal(net(x[None]), fresh(x[None]))
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())


def test_model_restored_after_success_and_after_an_error():
    net = tiny_residual_cnn(shift=True)
    fresh = copy.deepcopy(net)
    model = classifier(net)
    salience.explain(model, image(), method="lrp", composite="epsilon_gamma_box", target="all")
    _assert_untouched(net, fresh, image())
    with pytest.raises(ParameterError, match="'7' \\(Linear, linear\\) has no rule"):
        salience.explain(model, image(), method="lrp", composite={"conv": "zplus"}, target=0)  # fails at the last layer
    _assert_untouched(net, fresh, image())


# ---------------------------------------------------------------- bad input and special structure
def test_layer_without_rule_names_it_and_the_composites_covering_it():
    with pytest.raises(ParameterError) as info:
        salience.explain(classifier(tiny_residual_cnn()), image(), method="lrp", composite={"Linear": "epsilon"}, target=0)
    message = str(info.value)
    assert "\n" not in message and "'0' (Conv2d, conv)" in message
    assert "composites that cover it: epsilon, epsilon_plus" in message


def test_user_composite_by_name_type_and_base_recorded_in_params():
    composite = {"base": "epsilon_plus", "3.conv": ("gamma", {"gamma": 0.5}), "Linear": {"rule": "epsilon", "eps": 0.01}}
    e = salience.explain(classifier(tiny_residual_cnn()), image(), method="lrp", composite=composite, target=0)
    assert e.params["rules"] == {"AdaptiveAvgPool2d": ["epsilon"], "Conv2d": ["gamma", "zbox"], "Linear": ["epsilon"]}
    assert e.params["composite"] == "custom(epsilon_plus)"
    assert e.params["composite_rules"]["3.conv"] == ["gamma", {"gamma": 0.5}]
    with pytest.raises(ParameterError, match="unknown rule 'gama'"):
        salience.explain(classifier(tiny_residual_cnn()), image(), method="lrp", composite={"conv": "gama"}, target=0)
    with pytest.raises(ParameterError, match="unknown composite"):
        salience.explain(classifier(tiny_residual_cnn()), image(), method="lrp", composite="epsilon_plusplus", target=0)


class _NamedLikeKinds(nn.Module):
    """A conv and a dense head, named ``conv`` and ``linear`` (like the composites' kind keys) or not."""

    def __init__(self, like_kinds: bool) -> None:
        super().__init__()
        first, last = ("conv", "linear") if like_kinds else ("first", "last")
        setattr(self, first, nn.Conv2d(3, 4, 3, padding=1))
        setattr(self, last, nn.Linear(4, 3))
        self.names = (first, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, last = (getattr(self, name) for name in self.names)
        return last(torch.relu(first(x)).mean((2, 3)))


def test_module_named_like_a_kind_takes_the_input_rule():
    """A top-level module named ``conv`` is not looked up by its name, where the composite's kind key
    "conv" would match before "input": the input layer keeps z^B under epsilon_plus, as the same
    network with other names (1e-12). Before, it took z+ silently."""
    torch.manual_seed(6)
    named, other = _NamedLikeKinds(True).double().eval(), _NamedLikeKinds(False).double().eval()
    other.first.load_state_dict(named.conv.state_dict())
    other.last.load_state_dict(named.linear.state_dict())
    a = salience.explain(classifier(named), image(), method="lrp", target=0)
    b = salience.explain(classifier(other), image(), method="lrp", target=0)
    assert a.params["rules"]["Conv2d"] == b.params["rules"]["Conv2d"] == ["zbox"]
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=1e-12, atol=1e-12)


class Twice(nn.Module):
    """One ReLU module used twice, in place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU6(inplace=inplace)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c2(self.act(self.c1(x))))
        return self.head(x.mean((2, 3)))


def test_in_place_activations_and_modules_used_twice():
    torch.manual_seed(5)
    net = Twice(inplace=True).double().eval()
    plain = Twice(inplace=False).double().eval()
    plain.load_state_dict(net.state_dict())
    x = image() * 8  # ReLU6 saturates somewhere: relevance passes through its clipped values
    a = salience.explain(classifier(net), x, method="lrp", composite="epsilon_alpha2_beta1", target="all")
    b = salience.explain(classifier(plain), x, method="lrp", composite="epsilon_alpha2_beta1", target="all")
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1"])
@pytest.mark.parametrize("inplace", [False, True])
def test_prediction_pass_in_lrp_mode_equals_a_pass_of_its_own(composite, inplace):
    """One class explained: the prediction pass itself runs in LRP mode (1 forward + 1 backward in
    all), and gives the same scores, conservation and layer trace as LRP's own pass after a plain
    prediction (target="all" takes that path), to 1e-12 (the same arithmetic). An in-place
    activation after a layer with a rule makes it redo the pass with copies, as LRP's own pass
    does; after LRP-0 layers (composite epsilon, eps 0: plain calls) autograd handles it."""
    torch.manual_seed(5)
    model = classifier(Twice(inplace=inplace).double().eval() if inplace else tiny_residual_cnn(shift=True))
    x = image() * 8
    every = salience.explain(model, x, method="lrp", composite=composite, target="all", trace=True)
    for target in [None, 2]:  # None: the predicted class
        one = salience.explain(model, x, method="lrp", composite=composite, trace=True,
                               **({} if target is None else {"target": target}))
        k = int(one.targets[0].index)
        assert k == (every.prediction.index if target is None else target)
        assert one.prediction.index == every.prediction.index
        np.testing.assert_allclose(one.prediction.probabilities, every.prediction.probabilities, rtol=1e-12)
        # the in-place model's first try fails in its backward and is redone: one forward more
        assert (one.cost.forward_passes, one.cost.backward_passes) == (2 if inplace and composite != "epsilon" else 1, 1)
        np.testing.assert_allclose(np.asarray(one.scores), np.asarray(every.scores)[k], rtol=1e-12, atol=1e-12)
        for key in ("output", "relevance_sum", "error"):
            assert one.extras["conservation"][0][key] == pytest.approx(every.extras["conservation"][k][key], abs=1e-12)
        ours, theirs = one.extras["_layers"], every.extras["_layers"]
        assert [t["layer"] for t in ours] == [t["layer"] for t in theirs]
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a["relevance_in"], np.asarray(b["relevance_in"])[k:k + 1], rtol=1e-12, atol=1e-12)


def test_several_images_each_in_one_pass():
    """Several images, one class each: each image's prediction pass is its LRP pass (1 forward + 1
    backward per image, nothing run again together) and gives what that image alone gives (1e-12)."""
    model = classifier(tiny_residual_cnn(shift=True))
    images = [image(1), image(2), image(3)]
    together = salience.explain(model, images, method="lrp")
    for x, e in zip(images, together, strict=True):
        alone = salience.explain(model, x, method="lrp")
        np.testing.assert_allclose(np.asarray(e.scores), np.asarray(alone.scores), rtol=1e-12, atol=1e-12)
        assert (e.cost.forward_passes, e.cost.backward_passes) == (1, 1)


def test_several_images_with_their_own_bounds_as_alone():
    """Several images with a one-element target list (not one class: LRP's shared pass) whose z^B
    bounds come from the images themselves (no black and white levels: each image's own minimum
    and maximum): each gets what it gets alone (1e-12), not bounds taken over the group."""
    model = classifier(tiny_residual_cnn(shift=True))
    images = [image(1), image(2) * 3.0]  # different per-channel ranges
    together = salience.explain(model, images, method="lrp", target=[1])
    for x, e in zip(images, together, strict=True):
        alone = salience.explain(model, x, method="lrp", target=[1])
        np.testing.assert_allclose(np.asarray(e.scores), np.asarray(alone.scores), rtol=1e-12, atol=1e-12)
        assert e.params["bounds"] == alone.params["bounds"]


def test_refusals():
    model = classifier(tiny_residual_cnn())
    scripted = ImageClassifier(torch.jit.script(tiny_residual_cnn()), labels=["a", "b", "c"], input_shape=(3, 8, 8))
    with pytest.raises(ParameterError, match="TorchScript"):
        salience.explain(scripted, image(), method="lrp", target=0)
    with pytest.raises(ParameterError, match="logits"):
        salience.explain(model, image(), method="lrp", output="probability", target=0)
    softmaxed = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Softmax(-1)).double().eval(), labels=list("abc"),
                                input_shape=(3, 2, 2))
    with pytest.raises(ParameterError, match="no rule for .*softmax"):
        salience.explain(softmaxed, image()[:, :2, :2], method="lrp", composite="epsilon", target=0)
    with pytest.raises(ParameterError, match="outside z\\^B's bounds"):
        salience.explain(model, image(), method="lrp", low=0.0, high=1.0, target=0)


def test_efficientnet_lite0_one_photo():
    """EfficientNet-Lite0 (float32) on one photo with epsilon_plus: finite, every batch norm merged,
    z^B at the stem; conservation is reported, not asserted: the merged batch norms' shifts are
    biases (z+ puts their positive part in its denominators), so most of the logit stays with them
    (measured: 0.0026 of 10.53 reaches the pixels). The bias-free z^B stem conserves (float32: 1e-4)."""
    data = pytest.importorskip("skimage.data")
    model = salience.load_model("zoo:efficientnet-lite0")
    e = salience.explain(model, data.chelsea(), method="lrp", composite="epsilon_plus", trace=True)
    scores = np.asarray(e.scores)
    assert np.isfinite(scores).all()
    row = e.extras["conservation"][0]
    assert row["relevance_sum"] == pytest.approx(float(scores.sum()), rel=1e-4)
    assert row["error"] == pytest.approx(row["relevance_sum"] - row["output"], abs=1e-9)
    assert e.params["batch_norm_merged"] == 49
    assert e.params["rules"]["Conv2dStaticSamePadding"] == ["zbox", "zplus"]
    stem = e.extras["_layers"][-1]
    assert stem["layer"] == "_conv_stem+bn" and stem["rule"] == "zbox"
    np.testing.assert_allclose(stem["relevance_in"], stem["relevance_out"], rtol=1e-4)
