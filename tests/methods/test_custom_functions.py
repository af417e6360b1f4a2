"""Custom ``torch.autograd.Function`` activations in the propagation methods (LRP, DeepLIFT).

A propagation mode sees the torch calls inside a custom Function's forward without gradients, and the
Function's backward is its own: left alone, it would carry the relevance (or DeepLIFT's multipliers)
by its gradient, a silently wrong map (a binarized network's sign with a straight-through estimator
gave LRP 0.04 of the logit 9.8 and DeepLIFT a summation error of 0.76). Checked:

- an undeclared custom Function on the path is refused by LRP, AttnLRP and DeepLIFT, naming it and the
  declaration (``salience_elementwise = True`` on the module class), with nothing left behind;
- a declared module that changes its input's shape or its input is refused by LRP and DeepLIFT;
- a declared module runs as one elementwise unit: DeepLIFT equals Captum's DeepLift on the same
  network with ``nn.Softplus`` (whose Rescale rule Captum applies), also where two inputs cancel at
  the unit (|x - x_ref| = 0: the derivative, from the module's own backward); LRP equals LRP on that
  network (the identity rule of an activation); transformers' written-out NewGELUActivation under
  DeepLIFT equals ``nn.GELU(approximate="tanh")``;
- a no_grad block in a forward that leaves no custom Function in the graph is not refused;
- the zoo's binarized network (``zoo:fmnist-bnn``, sign with a straight-through estimator):
  DeepLIFT sums to its delta, LRP keeps most of the logit.

Tolerances: float64 networks; 1e-10 against Captum (same operations, other summation order; observed
~1e-16); 1e-12 between two networks computing the same function by different calls.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.modules.module as module_hooks
from torch import nn
from transformers.activations import NewGELUActivation

import salience
from oracles import require
from salience.datasets.fashion_mnist import load_fashion_mnist
from salience.errors import ParameterError
from salience.methods.rules import custom_functions
from salience.models.image import ImageClassifier

captum_attr = require("captum.attr")

SHAPE = (3, 4, 4)
LABELS = ["a", "b", "c"]


class _Softplus(torch.autograd.Function):
    """softplus with a hand-written backward (as memory-saving activations are written)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return torch.log1p(torch.exp(x))

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * torch.sigmoid(x)


class Undeclared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Softplus.apply(x)  # type: ignore[no-any-return]


class Declared(Undeclared):
    salience_elementwise = True


def mlp(activation: type[nn.Module] | nn.Module, seed: int = 0, cancel: bool = False) -> nn.Module:
    """Flatten - Linear(48, 6) - activation - Linear(6, 3), float64. ``cancel``: hidden unit 0 reads
    inputs 0 and 1 only, with opposite weights."""
    torch.manual_seed(seed)
    act = activation() if isinstance(activation, type) else activation
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 6), act, nn.Linear(6, 3)).double().eval()
    for p in net.parameters():
        nn.init.normal_(p, std=0.6)
    if cancel:
        with torch.no_grad():
            net[1].weight[0] = 0.0
            net[1].weight[0, :2] = torch.tensor([1.5, -1.5], dtype=torch.float64)
    return net


def classifier(net: nn.Module) -> ImageClassifier:
    return ImageClassifier(net, None, LABELS, name="net", input_shape=SHAPE)


def inputs(seed: int = 1, cancel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, baseline = (torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(2))
    if cancel:  # inputs 0 and 1 differ from the baseline by the same amount: hidden unit 0 sees x - x_ref = 0
        x.reshape(-1)[:2], baseline.reshape(-1)[:2] = 0.7, 0.0
    return x, baseline


def captum(net: nn.Module, x: torch.Tensor, baseline: torch.Tensor, target: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = captum_attr.DeepLift(net).attribute(x[None], baselines=baseline[None], target=target)
    return found.detach()[0].permute(1, 2, 0).reshape(-1, SHAPE[0]).numpy()  # Salience's (P, C) rows


# ------------------------------------------------------------------ refused unless declared
@pytest.mark.parametrize("method", ["lrp", "deeplift"])
def test_an_undeclared_custom_function_is_refused_by_name(method):
    net = mlp(Undeclared)
    fresh = copy.deepcopy(net)
    x, baseline = inputs()
    options = {"composite": "epsilon"} if method == "lrp" else {"baseline": baseline}
    with pytest.raises(ParameterError, match=r"custom torch.autograd.Function _Softplus .*salience_elementwise = True"):
        salience.explain(classifier(net), x, method=method, level="pixel", **options)
    probe = torch.stack(inputs(seed=5)).requires_grad_(True)
    (after,), (before,) = (torch.autograd.grad(n(probe)[:, 0].sum(), probe) for n in (net, fresh))
    np.testing.assert_array_equal(after.numpy(), before.numpy())  # plain gradients again: nothing left behind
    assert torch._C._len_torch_function_stack() == 0
    assert not module_hooks._global_forward_hooks and not module_hooks._global_forward_pre_hooks  # the modes' hooks removed


def test_attnlrp_refuses_an_undeclared_custom_function():
    x, _ = inputs()
    with pytest.raises(ParameterError, match="custom torch.autograd.Function _Softplus"):
        salience.explain(classifier(mlp(Undeclared)), x, method="attnlrp", level="pixel")


def test_custom_functions_lists_foreign_functions_only():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert custom_functions((_Softplus.apply(x) * 2).sum()) == ["_Softplus"]
    assert custom_functions({"y": torch.tanh(x)}) == []


def test_a_no_grad_block_without_a_custom_function_is_not_refused():
    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                scale = x.abs().amax() + 1.0  # computed from the input, held constant
            return torch.relu(x) / scale

    x, baseline = inputs()
    model = classifier(mlp(Scaled))
    assert np.isfinite(salience.explain(model, x, method="lrp", composite="epsilon", level="pixel").scores).all()
    assert np.isfinite(salience.explain(model, x, method="deeplift", baseline=baseline, level="pixel").scores).all()


# ------------------------------------------------------------------ declared: one elementwise unit
class Shrinking(nn.Module):
    """Declared elementwise, but drops the last feature."""

    salience_elementwise = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x[..., :-1])


class InPlace(nn.Module):
    """Declared elementwise, but scales its input in place first."""

    salience_elementwise = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.mul_(2.0))


@pytest.mark.parametrize("method", ["lrp", "deeplift"])
@pytest.mark.parametrize("activation", [Shrinking, InPlace])
def test_a_declared_module_that_is_not_elementwise_is_refused(method, activation):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 6), activation(), nn.Linear(5 if activation is Shrinking else 6, 3))
    x, baseline = inputs()
    options = {"composite": "epsilon"} if method == "lrp" else {"baseline": baseline}
    with pytest.raises(ParameterError, match=f"activation module {activation.__name__}.*did not return a tensor of its "
                                             "input's shape with its input unchanged"):
        salience.explain(classifier(net.double().eval()), x, method=method, level="pixel", **options)


@pytest.mark.parametrize("cancel", [False, True])
def test_deeplift_on_a_declared_unit_equals_captum_on_the_same_function(cancel):
    ours, reference = mlp(Declared, cancel=cancel), mlp(nn.Softplus, cancel=cancel)
    x, baseline = inputs(cancel=cancel)
    every = salience.explain(classifier(ours), x, method="deeplift", baseline=baseline, target="all", level="pixel")
    one = salience.explain(classifier(ours), x, method="deeplift", baseline=baseline, target=2, level="pixel")
    for t in range(3):
        np.testing.assert_allclose(every.extras["_per_channel"][t], captum(reference, x, baseline, t), rtol=0, atol=1e-10)
    np.testing.assert_allclose(one.extras["_per_channel"][0], captum(reference, x, baseline, 2), rtol=0, atol=1e-10)
    np.testing.assert_allclose(every.delta, 0, atol=1e-10)
    if cancel:  # hidden unit 0's derivative reaches the two cancelling inputs (position 0 and 1, channel 0)
        assert abs(one.extras["_per_channel"][0][0, 0]) > 1e-3


def test_lrp_on_a_declared_unit_equals_lrp_on_the_same_function():
    x, _ = inputs()
    ours, reference = (salience.explain(classifier(mlp(act)), x, method="lrp", composite="epsilon", level="pixel")
                       for act in (Declared, nn.Softplus))
    np.testing.assert_allclose(ours.scores, reference.scores, rtol=0, atol=1e-12)


def test_deeplift_on_transformers_written_out_gelu_equals_the_torch_function():
    x, baseline = inputs(seed=3)
    ours, reference = (salience.explain(classifier(mlp(act, seed=2)), x, method="deeplift", baseline=baseline,
                                        target="all", level="pixel")
                       for act in (NewGELUActivation, nn.GELU(approximate="tanh")))
    np.testing.assert_allclose(ours.scores, reference.scores, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.delta, 0, atol=1e-10)


# ------------------------------------------------------------------ the zoo's binarized network
def test_binarized_zoo_network_deeplift_sums_to_delta_and_lrp_keeps_the_logit():
    bnn = salience.load_model("zoo:fmnist-bnn")
    image = np.asarray(load_fashion_mnist("test")[0][0])
    deeplift = salience.explain(bnn, image, method="deeplift")
    gap = float(deeplift.output_value - deeplift.baseline_value)
    assert abs(gap) > 0.1 and abs(float(deeplift.delta)) < 1e-4 * abs(gap)  # (the STE's gradient left 0.76 of 9.8)
    (row,) = salience.explain(bnn, image, method="lrp").extras["conservation"]
    assert 0.5 < row["relevance_sum"] / row["output"] < 1.5  # (the STE's gradient carried 0.04 of 9.8)
