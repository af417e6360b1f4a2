"""DeepLIFT (Rescale) and DeepLIFT-SHAP (salience.methods.deeplift, rule in
salience.methods.deeplift_rules).

Checked: per channel against Captum's DeepLift and DeepLiftShap on tiny float64 MLPs (every
activation Captum supports) and CNNs (ReLU + max pooling, and tests/tiny_cnn.py's Softplus / Tanh
/ batch norm CNN); summation-to-delta for every handled unit, for a ReLU right before a max pool
(where Captum's module hooks see the raw gradient of the neighbouring unit and do not conserve), a
module used twice and in-place units; the closed form (x - r) w on a linear model, equal to IG and
to gradient x input there; refusals (softmax read-outs, layer norm, products of input-dependent
tensors, data-dependent forward passes) with nothing left behind; several images in shared calls,
chunking and several targets equal to one run each; EfficientNet-Lite0 once.

Tolerances: Salience and Captum run the same float64 operations and differ in summation order of
round-off only: 1e-10 absolute on values of order 1 (observed below 1e-16). Summation-to-delta is
an identity of the rule, float64 round-off: 1e-10. Shared calls and chunking change BLAS order
only: 1e-12. EfficientNet-Lite0 runs in float32: |delta| below 1e-4 of |F(x) - F(r)| (observed
about 1e-7).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from oracles import require
from salience.errors import ParameterError
from salience.models.image import ImageClassifier
from tiny_cnn import build_tiny_cnn, photo

captum_attr = require("captum.attr")

SHAPE = (3, 6, 6)
LABELS = ["a", "b", "c"]
CAPTUM_UNITS = {"relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                "softplus": nn.Softplus}
OTHER_UNITS = {"relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish, "hardswish": nn.Hardswish,
               "hardsigmoid": nn.Hardsigmoid, "selu": nn.SELU, "celu": nn.CELU, "logsigmoid": nn.LogSigmoid,
               "softsign": nn.Softsign, "hardtanh": nn.Hardtanh, "relu_inplace": lambda: nn.ReLU(inplace=True)}


def _seeded(net: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in net.parameters():
        nn.init.normal_(p, std=0.6)
    return net.double().eval()


def mlp(unit: type[nn.Module] | None = nn.ReLU, seed: int = 0) -> nn.Module:
    """Flatten - Linear(108, 10) - unit - Linear(10, 8) - unit - Linear(8, 3)."""
    units = [unit(), unit()] if unit is not None else [nn.Identity(), nn.Identity()]
    return _seeded(nn.Sequential(nn.Flatten(), nn.Linear(108, 10), units[0], nn.Linear(10, 8), units[1], nn.Linear(8, 3)), seed)


def relu_pool_cnn(seed: int = 0, adjacent: bool = False) -> nn.Module:
    """Conv - ReLU - [Conv 1x1] - MaxPool(2) - Flatten - Linear - ReLU - Linear. ``adjacent``: no 1x1
    conv, the ReLU feeds the max pool directly."""
    middle = [] if adjacent else [nn.Conv2d(4, 4, 1)]
    return _seeded(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), *middle, nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(36, 6), nn.ReLU(), nn.Linear(6, 3)), seed)


def classifier(net: nn.Module) -> ImageClassifier:
    return ImageClassifier(net, None, LABELS, name="net", input_shape=SHAPE)


def tensors(n: int, seed: int = 1, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(n)]


def channels_last(attribution: torch.Tensor) -> np.ndarray:
    """Captum's (1, C, H, W) as Salience's per-channel rows (P, C)."""
    return attribution.detach()[0].permute(1, 2, 0).reshape(-1, attribution.shape[1]).numpy()


def captum(net: nn.Module, x: torch.Tensor, baseline: torch.Tensor, target: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return channels_last(captum_attr.DeepLift(net).attribute(x[None], baselines=baseline[None], target=target))


def deeplift(net: nn.Module, x: torch.Tensor, baseline: object, **options: object) -> salience.Explanation:
    return salience.explain(classifier(net), x, method="deeplift", baseline=baseline, level="pixel", **options)


# ------------------------------------------------------------------ Captum
@pytest.mark.parametrize("unit", CAPTUM_UNITS)
def test_mlp_equals_captum(unit):
    net = mlp(CAPTUM_UNITS[unit])
    x, baseline = tensors(2)
    e = deeplift(net, x, baseline, target="all")
    for t in range(3):
        np.testing.assert_allclose(e.extras["_per_channel"][t], captum(net, x, baseline, t), rtol=0, atol=1e-10)
    np.testing.assert_allclose(e.delta, 0, atol=1e-10)


def test_a_unit_whose_input_equals_the_reference_takes_its_derivative():
    """Where |x - x_ref| < eps at a unit (here exactly 0: two inputs that differ from the reference
    cancel in hidden unit 0), the multiplier is the unit's derivative, as Captum's; any other value
    would still sum to delta but move score between those two inputs."""
    net = mlp(nn.Softplus)  # smooth: the derivative is neither 0 nor 1
    with torch.no_grad():
        net[1].weight[0] = 0.0
        net[1].weight[0, :2] = torch.tensor([1.5, -1.5], dtype=torch.float64)
    x, baseline = tensors(2, seed=21)
    baseline.reshape(-1)[:2] = 0.0
    x.reshape(-1)[:2] = 0.7
    for target in (1, "all"):  # one target (DeepLIFT's own prediction pass) and the shared target rows
        e = deeplift(net, x, baseline, target=target)
        for row, t in enumerate([1] if target == 1 else range(3)):
            channels = e.extras["_per_channel"][row]  # (P, C): flat inputs 0 and 1 are channel 0 of positions 0 and 1
            np.testing.assert_allclose(channels, captum(net, x, baseline, t), rtol=0, atol=1e-10)
            assert abs(channels[0, 0]) > 1e-3  # hidden unit 0's derivative reaches the cancelling inputs


@pytest.mark.parametrize("name", ["relu_pool", "tiny_cnn"])
def test_cnn_equals_captum(name):
    net = relu_pool_cnn() if name == "relu_pool" else build_tiny_cnn()
    grid = (6, 6) if name == "relu_pool" else (16, 16)
    model = ImageClassifier(net, None, LABELS, input_shape=(3, *grid))
    generator = torch.Generator().manual_seed(3)
    x, baseline = (torch.randn((3, *grid), generator=generator, dtype=torch.float64) for _ in range(2))
    e = salience.explain(model, x, method="deeplift", baseline=baseline, target=[0, 2], level="pixel")
    for row, t in enumerate([0, 2]):
        np.testing.assert_allclose(e.extras["_per_channel"][row], captum(net, x, baseline, t), rtol=0, atol=1e-10)
    np.testing.assert_allclose(e.scores, e.extras["_per_channel"].sum(-1), rtol=0, atol=1e-14)  # channels summed
    assert e.params["baseline"].startswith("tensor 3x")


def test_deeplift_shap_equals_captum_on_the_same_references():
    net = relu_pool_cnn(seed=2)
    x, *references = tensors(4, seed=5)
    e = salience.explain(classifier(net), x, method="deeplift_shap", baselines=references, target=1, level="pixel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = captum_attr.DeepLiftShap(net).attribute(x[None], baselines=torch.stack(references), target=1)
    np.testing.assert_allclose(e.extras["_per_channel"][0], channels_last(expected), rtol=0, atol=1e-10)
    logits = net(torch.stack([x, *references])).detach()[:, 1]
    assert e.delta == pytest.approx(0, abs=1e-10)
    assert e.scores.sum() == pytest.approx(float(logits[0] - logits[1:].mean()), abs=1e-10)
    assert e.params["n_references"] == 3 and len(e.params["baselines"]) == 3


# ------------------------------------------------------------------ summation-to-delta
@pytest.mark.parametrize("unit", OTHER_UNITS)
def test_summation_to_delta_for_every_unit(unit):
    net = mlp(OTHER_UNITS[unit])  # type: ignore[arg-type]
    x, baseline = tensors(2, scale=3.0)  # 3x: ReLU6 and Hardtanh saturate on some units
    e = deeplift(net, x, baseline, target="all")
    logits = net(torch.stack([x, baseline])).detach()
    np.testing.assert_allclose(e.delta, 0, atol=1e-10)
    np.testing.assert_allclose(e.scores.sum(-1), (logits[0] - logits[1]).numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(e.output_value, logits[0].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(e.baseline_value, logits[1].numpy(), rtol=0, atol=1e-12)
    assert e.extras["summation_delta"] == pytest.approx(list(e.delta), abs=0)


class TwiceAndFunctional(nn.Module):
    """One ReLU module called twice, an in-place F.relu, Tensor.sigmoid and a ReLU feeding a max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu, self.linear = nn.ReLU(), nn.Linear(36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(F.interpolate(h, scale_factor=2.0)), inplace=True)
        h = self.relu(F.avg_pool2d(h, 2)).sigmoid()
        return self.linear(h.flatten(1))


@pytest.mark.parametrize("net", [relu_pool_cnn(adjacent=True), _seeded(TwiceAndFunctional())], ids=["relu_maxpool", "twice"])
def test_summation_to_delta_where_module_hooks_fail(net):
    """A ReLU right before a max pool (Captum's result misses its delta: its hooks read a
    neighbour's unmodified gradient), one module used twice (Captum refuses), functional forms."""
    x, baseline = tensors(2, seed=7)
    e = deeplift(net, x, baseline, target="all")
    logits = net(torch.stack([x, baseline])).detach()
    np.testing.assert_allclose(e.delta, 0, atol=1e-10)
    np.testing.assert_allclose(e.scores.sum(-1), (logits[0] - logits[1]).numpy(), rtol=0, atol=1e-10)


def test_linear_model_closed_form_equals_ig_and_input_x_gradient():
    net = mlp(None)
    model = classifier(net)
    x, baseline = tensors(2)
    weight = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x)  # (3, C, H, W): constant
    e = salience.explain(model, x, method="deeplift", baseline=baseline, target="all", level="pixel")
    closed = ((x - baseline)[None] * weight).permute(0, 2, 3, 1).reshape(3, -1, 3).numpy()
    np.testing.assert_allclose(e.extras["_per_channel"], closed, rtol=0, atol=1e-12)
    ig = salience.explain(model, x, method="integrated_gradients", baseline=baseline, target="all", level="pixel", steps=4,
                        output="logit")
    np.testing.assert_allclose(e.scores, ig.scores, rtol=0, atol=1e-12)
    zero = salience.explain(model, x, method="deeplift", baseline=torch.zeros(SHAPE, dtype=torch.float64), target=1,
                            level="pixel")
    ixg = salience.explain(model, x, method="input_x_gradient", target=1, level="pixel", output="logit")
    np.testing.assert_allclose(zero.scores, ixg.scores, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ refusals and state
class Product(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)[:, :3]
        return h * torch.sigmoid(h)  # SiLU written out: a product of two input-dependent tensors


class Branching(nn.Module):
    """A data-dependent forward: an extra ReLU when the input's mean is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x.flatten(1)[:, :3])
        return torch.relu(h - 0.1) if bool(x.mean() > 0) else h


@pytest.mark.parametrize(("net", "match"), [
    (nn.Sequential(nn.Flatten(), nn.Linear(108, 4), nn.LayerNorm(4), nn.Linear(4, 3)), "no rule for torch.nn.functional.layer_norm"),
    (nn.Sequential(nn.Flatten(), nn.Linear(108, 3), nn.Softmax(-1)), "no rule for torch.nn.functional.softmax"),
    (Product(), r"no rule for Tensor.mul on the gradient path \(a product of two input-dependent tensors\)"),
], ids=["layer_norm", "softmax", "product"])
def test_unhandled_functions_are_refused_by_name(net, match):
    net = _seeded(net) if list(net.parameters()) else net.double().eval()
    x, baseline = tensors(2)
    with pytest.raises(ParameterError, match=match):
        deeplift(net, x, baseline)
    assert torch._C._len_torch_function_stack() == 0


def test_other_refusals():
    x, baseline = tensors(2)
    x, baseline = x.abs() + 1, -baseline.abs() - 1  # the input takes the extra ReLU, the reference does not
    with pytest.raises(ParameterError, match="must run the same nonlinear units"):
        deeplift(Branching().double(), x, baseline)
    with pytest.raises(ParameterError, match="deeplift explains logits.*output='log_odds'.*use output='logit'"):
        deeplift(mlp(), x, baseline, output="log_odds")
    with pytest.raises(ParameterError, match="n_baselines must be at least 1"):
        salience.explain(classifier(mlp()), x, method="deeplift_shap", n_baselines=0)
    assert torch._C._len_torch_function_stack() == 0


def test_text_transformer_is_refused(toy):
    with pytest.raises(ParameterError, match=r"deeplift has no rule for .*(layer_norm|softmax|gelu)"):
        salience.explain(toy, "the film was good", method="deeplift", output="logit")


def _state(net: nn.Module) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules())
    return (hooks, [p.requires_grad for p in net.parameters()], [m.training for m in net.modules()],
            [p.grad is None for p in net.parameters()], torch._C._len_torch_function_stack())


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.fail = relu_pool_cnn(), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.fail and x.requires_grad:  # the input pass, after the reference pass
            raise RuntimeError("boom")
        return out


def test_nothing_survives_a_run_or_an_exception():
    net = Failing().double().eval()
    fresh = copy.deepcopy(net)
    x, baseline = tensors(2)
    before = _state(net)
    first = deeplift(net, x, baseline)
    net.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        deeplift(net, x, baseline)
    net.fail = False
    assert _state(net) == before
    probe = torch.stack(tensors(3, seed=9)).requires_grad_(True)
    for a, b in zip(torch.autograd.grad(net(probe)[:, 1].sum(), probe), torch.autograd.grad(fresh(probe)[:, 1].sum(), probe),
                    strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # plain gradients again: no rule left active
    np.testing.assert_array_equal(deeplift(net, x, baseline).scores, first.scores)


# ------------------------------------------------------------------ batching, targets, shared calls
def test_batched_equals_unbatched_and_targets_equal_separate_runs():
    net = _seeded(TwiceAndFunctional())
    model = classifier(net)
    x, baseline = tensors(2, seed=11)
    one = salience.explain(model, x, method="deeplift", baseline=baseline, target="all", level="pixel", batch_size=1)
    many = salience.explain(model, x, method="deeplift", baseline=baseline, target="all", level="pixel", batch_size=64)
    np.testing.assert_allclose(one.scores, many.scores, rtol=0, atol=1e-12)
    assert one.cost.model_calls > many.cost.model_calls and one.cost.backward_passes == many.cost.backward_passes == 3
    for t in range(3):
        alone = salience.explain(model, x, method="deeplift", baseline=baseline, target=t, level="pixel")
        np.testing.assert_allclose(alone.scores, many.scores[t], rtol=0, atol=1e-12)
        assert alone.delta == pytest.approx(many.delta[t], abs=1e-12)
        assert alone.baseline_value == pytest.approx(many.baseline_value[t], abs=1e-12)
        # one target: the prediction pass is DeepLIFT's input pass (the reference's forward, then one forward + backward)
        assert (alone.cost.forward_passes, alone.cost.backward_passes) == (2, 1)


@pytest.mark.parametrize("method", ["deeplift", "deeplift_shap"])
def test_several_images_in_shared_calls_equal_one_at_a_time(method):
    net = relu_pool_cnn(seed=4)
    model = classifier(net)
    images = tensors(5, seed=13)
    options = {"baseline": "mean"} if method == "deeplift" else {"baselines": ["mean", "noise", "blur"]}
    together = salience.explain(model, images, method=method, level="pixel", batch_size=4, **options)
    for image, e in zip(images, together, strict=True):
        alone = salience.explain(model, image, method=method, level="pixel", **options)
        np.testing.assert_allclose(e.scores, alone.scores, rtol=0, atol=1e-12)
        assert e.delta == pytest.approx(alone.delta, abs=1e-12) and abs(e.delta) < 1e-10


def test_deeplift_shap_draws_are_seeded_and_recorded():
    model = classifier(relu_pool_cnn())
    (x,) = tensors(1)
    default = salience.explain(model, x, method="deeplift_shap", level="pixel")
    assert default.params["baselines"] == ["mean", "blur", "noise"]  # the adapter's named baselines (no black without preprocessing)
    a = salience.explain(model, x, method="deeplift_shap", level="pixel", n_baselines=5, stdev=0.3, seed=3)
    b = salience.explain(model, x, method="deeplift_shap", level="pixel", n_baselines=5, stdev=0.3, seed=3)
    c = salience.explain(model, x, method="deeplift_shap", level="pixel", n_baselines=5, stdev=0.3, seed=4)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.params["baselines"] == b.params["baselines"] and len(a.params["baselines"]) == 5
    assert not np.allclose(a.scores, c.scores)
    assert abs(a.delta) < 1e-10 and abs(c.delta) < 1e-10
    drawn_noise = [name for name in a.params["baselines"] + c.params["baselines"] if name.startswith("noise")]
    assert all(":" in name for name in drawn_noise)  # each drawn noise image has its own recorded seed


# ------------------------------------------------------------------ EfficientNet-Lite0
def test_efficientnet_lite0_runs_and_sums_to_delta():
    """ReLU6 units (17 modules, 33 calls per forward), batch norm, residual additions; float32."""
    model = salience.load_model("zoo:efficientnet-lite0")
    e = salience.explain(model, photo(64, 64), method="deeplift")
    assert np.isfinite(e.scores).all() and e.params["baseline"] == "black"
    gap = float(e.output_value - e.baseline_value)
    assert abs(float(e.delta)) < 1e-4 * abs(gap) and abs(gap) > 0.1
    assert (e.cost.forward_passes, e.cost.backward_passes) == (2, 1)
