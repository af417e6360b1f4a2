"""Layers and activations that models write out in torch functions, which LRP and AttnLRP must treat
as the layer they are, never silently as something else:

- a dense layer as a product with its weight (GPT-2's ``Conv1D``: ``addmm(b, x, W)``; ``x @ W``; ``W @ x``)
  takes the composite's rule for linear layers, as ``nn.Linear`` with the weight transposed;
- an activation module of ``transformers.activations`` written out in torch functions
  (``NewGELUActivation``: ``pow``, ``tanh``) is one elementwise unit with the identity rule, as the
  same function from ``torch.nn.functional``;
- a dtype cast by ``type_as`` is linear;
- AttnLRP's uniform rule on ``baddbmm`` (Bloom's ALiBi scores) equals it on the product and the
  sum written as two calls;
- LRP's refusal of a layer norm or a softmax points to AttnLRP, which has rules for them.

Tolerances: float64; 1e-12 where the two networks compute the same values by different calls
(rounding ~1e-16 relative on O(1) values, amplified by a few layers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import NewGELUActivation
from transformers.pytorch_utils import Conv1D

import salience
from salience.errors import ParameterError
from salience.methods.lrp_composites import parse_composite
from salience.methods.lrp_mode import LRPMode
from salience.methods.rules import is_activation_unit
from salience.models.image import ImageClassifier

IN, HIDDEN, OUT = 6, 5, 3


class Dense(nn.Module):
    """x @ W written out, W a parameter of shape (in, out)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class DenseLeft(nn.Module):
    """(W @ x^T)^T written out, W a parameter of shape (out, in): the weight on the left."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight @ x.T).T


def networks(seed: int = 0) -> dict[str, nn.Module]:
    """The same MLP (flatten, dense, GELU (tanh form), dense) with its first layer as nn.Linear, as
    GPT-2's Conv1D and, without its bias, as nn.Linear and as ``x @ W``; its activation as F.gelu or
    transformers' NewGELUActivation."""
    torch.manual_seed(seed)
    first, second = nn.Linear(IN, HIDDEN).double(), nn.Linear(HIDDEN, OUT).double()
    conv1d = Conv1D(HIDDEN, IN).double()
    with torch.no_grad():
        conv1d.weight.copy_(first.weight.T)
        conv1d.bias.copy_(first.bias)
    unbiased = nn.Linear(IN, HIDDEN, bias=False).double()
    with torch.no_grad():
        unbiased.weight.copy_(first.weight)
    dense = Dense(first.weight.T.detach())
    gelu = nn.GELU(approximate="tanh")
    found = {
        "linear": nn.Sequential(nn.Flatten(), first, gelu, second),
        "unbiased": nn.Sequential(nn.Flatten(), unbiased, gelu, second),
        "conv1d": nn.Sequential(nn.Flatten(), conv1d, gelu, second),
        "matmul": nn.Sequential(nn.Flatten(), dense, gelu, second),
        "matmul_left": nn.Sequential(nn.Flatten(), DenseLeft(first.weight.detach()), gelu, second),
        "new_gelu": nn.Sequential(nn.Flatten(), first, NewGELUActivation(), second),
    }
    return {name: net.double().eval() for name, net in found.items()}


def explain(net: nn.Module, method: str = "lrp", **params) -> salience.Explanation:
    x = torch.linspace(-2.0, 2.0, IN, dtype=torch.float64).reshape(IN, 1, 1)
    model = ImageClassifier(net, labels=list("abc"), input_shape=(IN, 1, 1))
    return salience.explain(model, x, method=method, target="all", **params)


@pytest.mark.parametrize("written", ["conv1d", "matmul", "matmul_left"])
@pytest.mark.parametrize("params", [{"composite": "epsilon", "eps": 0.3}, {"composite": {"linear": "gamma"}},
                                    {"composite": {"linear": "zplus"}}])
def test_a_dense_layer_written_as_a_product_takes_the_linear_rule(written, params):
    nets = networks()
    expected = explain(nets["linear" if written == "conv1d" else "unbiased"], **params)
    found = explain(nets[written], **params)
    np.testing.assert_allclose(np.asarray(found.scores), np.asarray(expected.scores), rtol=1e-12, atol=1e-12)
    assert found.output_value == pytest.approx(expected.output_value, abs=1e-12)
    layer = {"conv1d": "Conv1D", "matmul": "Dense", "matmul_left": "DenseLeft"}[written]
    assert found.params["rules"][layer] == expected.params["rules"]["Linear"]


def test_the_written_out_layer_rule_differs_from_the_gradient():
    """The comparison above has power: with eps = 0.3 the epsilon rule is not LRP-0 on this network."""
    nets = networks()
    lrp0 = explain(nets["linear"], composite="epsilon", eps=0.0)
    eps = explain(nets["conv1d"], composite="epsilon", eps=0.3)
    assert np.max(np.abs(np.asarray(lrp0.scores) - np.asarray(eps.scores))) > 1e-3


@pytest.mark.parametrize("method", ["lrp", "attnlrp"])
def test_a_transformers_activation_module_is_one_elementwise_unit(method):
    """NewGELUActivation computes tanh-GELU with torch.pow and torch.tanh; as one unit it takes the
    identity rule, as F.gelu(approximate="tanh") does (its values agree to rounding)."""
    nets = networks()
    params = {"composite": "epsilon", "eps": 0.1}
    expected = explain(nets["linear"], method, **params)
    found = explain(nets["new_gelu"], method, **params)
    np.testing.assert_allclose(np.asarray(found.scores), np.asarray(expected.scores), rtol=1e-12, atol=1e-12)


def test_which_transformers_activations_run_as_units():
    """Written out in torch functions: a unit; a thin wrapper of one activation the rules know: not."""
    from transformers.activations import GELUActivation, MishActivation, QuickGELUActivation, SiLUActivation

    assert is_activation_unit(NewGELUActivation()) and is_activation_unit(QuickGELUActivation())
    assert is_activation_unit(GELUActivation(use_gelu_python=True))  # erf written out
    assert not is_activation_unit(GELUActivation()) and not is_activation_unit(SiLUActivation())
    assert not is_activation_unit(MishActivation()) and not is_activation_unit(nn.GELU())


def test_an_activation_unit_that_is_not_elementwise_is_refused():
    """A module presenting itself as one of transformers' activations but changing its input's shape:
    the identity rule cannot apply; a one-line error names it."""
    bogus = type("Pairs", (nn.Module,), {"forward": lambda self, x: x.reshape(x.shape[0], -1, 2).sum(-1),
                                         "__module__": "transformers.activations"})
    net = nn.Sequential(nn.Flatten(), nn.Linear(IN, 4), bogus(), nn.Linear(2, OUT)).double().eval()
    with pytest.raises(ParameterError, match=r"activation module Pairs \(2\).*elementwise"):
        explain(net, composite="epsilon")


class Cast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().type_as(x)


@pytest.mark.parametrize("method", ["lrp", "deeplift"])
def test_type_as_is_linear(method):
    """A cast round trip (Gemma's norms end with ``type_as``) leaves the scores as without it, to float32
    rounding of the hidden values (5e-7 relative)."""
    nets = networks()
    plain = nets["linear"]
    cast = nn.Sequential(*plain[:2], Cast(), *plain[2:]).eval()
    params = {"composite": "epsilon", "eps": 0.1} if method == "lrp" else {}
    expected = np.asarray(explain(plain, method, **params).scores)
    np.testing.assert_allclose(np.asarray(explain(cast, method, **params).scores), expected, rtol=0,
                               atol=5e-7 * np.abs(expected).max())


class Scores(nn.Module):
    """Attention scores q k^T / sqrt(d) with an added bias (ALiBi-like), by baddbmm or by two calls."""

    def __init__(self, fused: bool, on_path_bias: bool = False) -> None:
        super().__init__()
        self.fused, self.on_path_bias = fused, on_path_bias
        torch.manual_seed(3)
        self.q, self.k = nn.Linear(2, 4).double(), nn.Linear(2, 4).double()
        self.head = nn.Linear(9, OUT).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 3, 2)
        q, k = self.q(h), self.k(h)
        bias = h.sum(-1, keepdim=True).expand(-1, 3, 3) if self.on_path_bias else \
            torch.arange(9, dtype=h.dtype).reshape(1, 3, 3).expand(h.shape[0], 3, 3) * 0.1
        factor = 1 / math.sqrt(4)
        if self.fused:
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=factor)
        else:
            scores = bias + torch.bmm(q, k.transpose(1, 2)) * factor
        return self.head(scores.reshape(x.shape[0], 9))


def test_attnlrp_baddbmm_equals_the_product_and_the_sum_as_two_calls():
    """Without a stabiliser the uniform rule gives each factor half of the product's relevance, which
    the added bias does not take part in either way (traced: the rule's own backward runs)."""
    found = explain(Scores(fused=True).eval(), "attnlrp", trace=True)
    expected = explain(Scores(fused=False).eval(), "attnlrp", trace=True)
    np.testing.assert_allclose(np.asarray(found.scores), np.asarray(expected.scores), rtol=1e-12, atol=1e-12)
    assert found.params["rule_calls"]["uniform"] == expected.params["rule_calls"]["uniform"] > 0


def test_attnlrp_refuses_baddbmm_adding_an_input_dependent_tensor():
    with pytest.raises(ParameterError, match="baddbmm adds an input-dependent tensor to a product"):
        explain(Scores(fused=True, on_path_bias=True).eval(), "attnlrp")


def test_the_written_out_layer_keeps_the_models_forward_values():
    """Under the mode, GPT-2's Conv1D computes its own addmm (the rule changes only the backward)."""
    net = networks()["conv1d"]
    x = torch.linspace(-2.0, 2.0, IN, dtype=torch.float64).reshape(1, IN, 1, 1)
    with torch.no_grad():
        expected = net(x)
    leaf = x.clone().requires_grad_(True)
    with LRPMode(parse_composite("epsilon"), eps=0.3):
        found = net(leaf)
    assert torch.equal(found.detach(), expected)


def test_conv1d_forward_equals_linear_with_the_weight_transposed():
    """The premise of the written-out layer rule: Conv1D(x) = F.linear(x, W^T, b)."""
    layer = Conv1D(4, 3).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    np.testing.assert_allclose(layer(x).detach().numpy(), F.linear(x, layer.weight.T, layer.bias).detach().numpy(),
                               rtol=1e-14, atol=1e-14)


class Normed(nn.Module):
    def __init__(self, func) -> None:
        super().__init__()
        self.func, self.first, self.head = func, nn.Linear(IN, 4), nn.Linear(4, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.func(self.first(x.flatten(1))))


@pytest.mark.parametrize(("func", "hinted"), [(lambda h: F.layer_norm(h, (4,)), True), (lambda h: h.softmax(-1), True),
                                              (lambda h: h.sort(-1).values, False)])
def test_lrp_refusal_points_to_attnlrp_where_it_has_the_rule(func, hinted):
    with pytest.raises(ParameterError) as refused:
        explain(Normed(func).double().eval(), composite="epsilon")
    assert "has no rule for" in str(refused.value)
    assert ("method='attnlrp' has a rule for it" in str(refused.value)) is hinted


class Excitation(nn.Module):
    """Squeeze-excitation (x times a gate computed from x), by ``*`` or by ``*=``."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace, self.first, self.gate, self.head = inplace, nn.Linear(IN, 4), nn.Linear(4, 4), nn.Linear(4, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x.flatten(1)))
        g = torch.sigmoid(self.gate(h))
        if self.inplace:
            h = h.clone()
            h *= g
        else:
            h = h * g
        return self.head(h)


@pytest.mark.parametrize(("method", "inplace", "message"), [
    ("lrp", False, "lrp has no rule for Tensor.mul on the relevance path"),
    ("attnlrp", True, "attnlrp cannot apply the uniform rule to an in-place product")])
def test_a_refusal_inside_a_tensor_operator_is_not_swallowed(method, inplace, message):
    """torch turns a TypeError (ParameterError is one) raised inside ``x * y`` into NotImplemented: the
    user would read "unsupported operand type(s)", or, for ``x *= y``, nothing at all (Python falls
    back to ``x = x * y``). The mode raises the rule's own error on leaving."""
    with pytest.raises(ParameterError, match=message):
        explain(Excitation(inplace).double().eval(), method, composite="epsilon")
