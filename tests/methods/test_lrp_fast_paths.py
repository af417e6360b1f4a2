"""The shortcuts LRP and AttnLRP take for speed, each against the general computation it replaces:
vector-Jacobian products of dense and convolution layers written out (against autograd through a
forward pass), the rules' coefficients c (R_in = x * c) against their relevance, the arithmetic
stabiliser against z + e sign(z), AttnLRP's written-out softmax / product / norm backward passes
against autograd through the same calls, and the run without copied outputs (falling back to
copies when the model changes an output in place). Float64; tolerances 1e-12 (the same arithmetic
in another order: rounding ~1e-16 relative on O(1) values)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience.methods import attnlrp_rules
from salience.methods.lrp_mode import IN_PLACE_ERROR, LRPMode, run_with_copies_if_needed
from salience.methods.lrp_rules import AlphaBeta, Epsilon, Gamma, Layer, _back, stabilise
from salience.models.image import ImageClassifier

TOL = dict(rtol=1e-12, atol=1e-12)


def _autograd_vjp(layer: Layer, like: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    leaf = torch.zeros_like(like).requires_grad_(True)
    (grad,) = torch.autograd.grad(layer(leaf, weight, None), leaf, s)
    return grad


CONVS = [  # (func, input shape, weight shape, positional rest, keyword options)
    (F.conv2d, (2, 4, 9, 8), (6, 4, 3, 3), (), {}),
    (F.conv2d, (1, 4, 9, 8), (6, 4, 3, 2), (2, 1), {}),  # stride 2, padding 1: the last input row unused
    (F.conv2d, (1, 4, 10, 10), (4, 1, 3, 3), (), {"stride": 2, "padding": (1, 0), "groups": 4}),  # depthwise
    (F.conv2d, (1, 4, 10, 10), (8, 2, 3, 3), (1, "valid", 2, 2), {}),  # dilation 2, groups 2
    (F.conv1d, (2, 3, 11), (5, 3, 4), (3,), {}),
    (F.conv3d, (1, 2, 5, 6, 4), (3, 2, 2, 3, 2), (), {"padding": 1}),
    (F.conv2d, (1, 4, 9, 8), (6, 4, 3, 3), (), {"padding": "same"}),  # not written out: autograd
]


@pytest.mark.parametrize("case", range(len(CONVS)))
def test_convolution_vjp_written_out(case):
    func, x_shape, w_shape, rest, options = CONVS[case]
    g = torch.Generator().manual_seed(case)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64)
    layer = Layer(func, w, None, rest, options, kind="conv")
    s = torch.randn(layer(x, w, None).shape, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(_back(layer, x, w, s).numpy(), _autograd_vjp(layer, x, w, s).numpy(), **TOL)


def test_dense_vjp_written_out():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    layer = Layer(F.linear, w, None)
    s = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(_back(layer, x, w, s).numpy(), _autograd_vjp(layer, x, w, s).numpy(), **TOL)


@pytest.mark.parametrize("negatives", [True, False])
@pytest.mark.parametrize("rule", [Epsilon(1e-3), Gamma(0.25), AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0)])
def test_coefficients_times_input_are_the_relevance(rule, negatives):
    """c with R_in = x * c, given the forward's z or not, equals the rule's relevance; without
    negative inputs the x- terms are skipped."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    x = x if negatives else x.clamp(min=0)
    w, b = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    layer = Layer(F.conv2d, w, b, (1, 1), kind="conv")
    z = layer(x, w, b)
    r = torch.randn(z.shape, generator=g, dtype=torch.float64)
    relevance = rule.relevance(layer, x, r)
    np.testing.assert_allclose((x * rule.coefficients(layer, x, r)).numpy(), relevance.numpy(), **TOL)
    np.testing.assert_allclose((x * rule.coefficients(layer, x, r, z)).numpy(), relevance.numpy(), **TOL)


def test_stabiliser():
    z = torch.tensor([-2.0, -1e-9, 0.0, 1e-9, 3.0], dtype=torch.float64)
    expected = z + 1e-6 * torch.where(z >= 0, 1.0, -1.0).to(z)
    np.testing.assert_array_equal(stabilise(z, 1e-6).numpy(), expected.numpy())
    np.testing.assert_array_equal(stabilise(z, 0.0).numpy(), torch.where(z == 0, 1.0, z).numpy())  # 0 -> 1


class _Mode:
    """Enough of LRPMode for a rule's backward outside a model."""

    stabiliser, forwards, copy_outputs, tracing = 1e-6, 0, True, True  # traced: the rules record (see record)

    def __init__(self) -> None:
        self.trace: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def paused(self):  # noqa: ANN201
        import contextlib

        return contextlib.nullcontext()

    def location(self) -> str:
        return "layer"

    def in_normalisation(self) -> bool:
        return False

    def record(self, layer: str, rule: str, relevance_out: tuple[torch.Tensor, torch.Tensor],
               relevance_in: list[tuple[torch.Tensor, torch.Tensor]], forward: int) -> None:
        self.trace.append((rule, (relevance_out[0] * relevance_out[1]).sum(), sum((a * c).sum() for a, c in relevance_in)))


def _both_ways(build, inputs: list[torch.Tensor], seed: torch.Tensor, monkeypatch) -> None:  # noqa: ANN001
    """The gradient of ``build(mode, *leaves)`` for ``seed``, with the rule's written-out VJP and
    with it removed (autograd through the rule's call): equal."""
    found = []
    original = attnlrp_rules._Surrogate.forward
    given: list[bool] = []

    def seen(ctx, site, call, vjp, weight, value, *xs):  # noqa: ANN001, ANN202
        given.append(vjp is not None)
        return original(ctx, site, call, vjp, weight, value, *xs)

    def without_vjp(ctx, site, call, vjp, weight, value, *xs):  # noqa: ANN001, ANN202
        return original(ctx, site, call, None, weight, value, *xs)

    for written_out in (True, False):
        monkeypatch.setattr(attnlrp_rules._Surrogate, "forward", staticmethod(seen if written_out else without_vjp))
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = build(_Mode(), *leaves)
        found.append([g.numpy() for g in torch.autograd.grad(out, leaves, seed)])
    assert given == [True]  # the rule's call had its VJP written out
    for a, b in zip(*found, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_softmax_rule_vjp(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    _both_ways(lambda mode, t: attnlrp_rules.softmax_rule(mode, t, -1), [x], torch.randn(2, 3, 5, generator=g,
                                                                                                 dtype=torch.float64), monkeypatch)


@pytest.mark.parametrize("func", [torch.matmul, torch.mul])
def test_uniform_rule_vjp(func, monkeypatch):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 1, 4, 3, generator=g, dtype=torch.float64)  # broadcast over dimension 1
    b = torch.randn(3, 3, 3, generator=g, dtype=torch.float64) if func is torch.matmul else \
        torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
    seed = torch.randn(func(a, b).shape, generator=g, dtype=torch.float64)
    _both_ways(lambda mode, p, q: attnlrp_rules.uniform_rule(mode, func, (p, q), {}), [a, b], seed, monkeypatch)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_rule_vjp(norm, monkeypatch):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(6, generator=g, dtype=torch.float64)
    if norm == "layer":
        func, args = F.layer_norm, ((6,),)
        kwargs = {"weight": weight, "bias": torch.randn(6, generator=g, dtype=torch.float64), "eps": 1e-5}
    else:
        func, args, kwargs = F.rms_norm, ((6,),), {"weight": weight, "eps": 1e-6}
    seed = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    _both_ways(lambda mode, t: attnlrp_rules._layer_norm(mode, func, (t, *args), kwargs), [x], seed, monkeypatch)


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_in_place_change_of_an_output_falls_back_to_copies():
    """The conv's output is changed in place by ReLU(inplace=True): without copies the backward
    fails, and the method reruns with copies, giving the map of the same network without in-place."""
    torch.manual_seed(0)
    net = _InPlace().double().eval()
    calls: list[bool] = []

    def run(copy_outputs: bool) -> torch.Tensor:
        calls.append(copy_outputs)
        from salience.methods.lrp_composites import parse_composite
        from salience.methods.lrp_mode import LRPMode

        x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        with LRPMode(parse_composite("epsilon"), eps=1e-6, copy_outputs=copy_outputs):  # a rule: LRP-0 would run plainly
            (grad,) = torch.autograd.grad(net(x)[0, 1], x)
        return grad

    run_with_copies_if_needed(run)
    assert calls == [False, True]
    with pytest.raises(RuntimeError, match=IN_PLACE_ERROR):
        run(False)
    plain = _InPlace().double().eval()
    plain.load_state_dict(net.state_dict())
    plain.relu = nn.ReLU()
    image = torch.rand(3, 8, 8, dtype=torch.float64)

    def explain(model: nn.Module) -> np.ndarray:
        clf = ImageClassifier(model, labels=list("abc"), input_shape=(3, 8, 8))
        return np.asarray(salience.explain(clf, image, method="lrp", composite="epsilon", target=1).scores)

    np.testing.assert_allclose(explain(net), explain(plain), **TOL)


class _ReluThenConv(nn.Module):
    """Conv - ReLU - two convs on its output padded with zeros: one as it is (known non-negative),
    one minus a constant, subtracted in place or not (negative values: to be checked)."""

    def __init__(self, shift_in_place: bool) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 3), nn.Conv2d(4, 3, 3)
        self.shift_in_place = shift_in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        known = self.c2(F.pad(y, (1, 1, 1, 1)))
        shifted = F.pad(y, (1, 1, 1, 1))
        if self.shift_in_place:
            shifted -= 0.5
        else:
            shifted = shifted - 0.5
        return self.c3(shifted).mean((2, 3)) + known.mean((2, 3))


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box"])
def test_relu_outputs_known_nonnegative_and_forgotten_once_changed_in_place(composite, monkeypatch):
    """z+, alpha-beta and gamma skip the sign check of an input the forward pass saw come out of a
    ReLU (or its zero padding); one changed in place since (a constant subtracted: negative values)
    is checked again, so the in-place model equals the same model written without it (1e-12)."""
    checked: list[bool] = []
    real = torch.Tensor.min

    def counting(self: torch.Tensor, *args, **kwargs):
        checked.append(True)
        return real(self, *args, **kwargs)

    torch.manual_seed(3)
    in_place, plain = _ReluThenConv(True).double().eval(), _ReluThenConv(False).double().eval()
    plain.load_state_dict(in_place.state_dict())
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    options = dict(method="lrp", composite={"input": "epsilon", "conv": composite.removeprefix("epsilon_")
                                            .replace("plus", "zplus").replace("gamma_box", "gamma")}, target="all")
    monkeypatch.setattr(torch.Tensor, "min", counting)
    a = salience.explain(ImageClassifier(in_place, labels=list("abc"), input_shape=(3, 8, 8)), x, **options)
    checks_in_place = len(checked)
    b = salience.explain(ImageClassifier(plain, labels=list("abc"), input_shape=(3, 8, 8)), x, **options)
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), **TOL)
    assert checks_in_place == len(checked) - checks_in_place  # c3's shifted input checked in both
    # without what the forward pass saw, c2's padded ReLU output is checked too
    monkeypatch.setattr(LRPMode, "_known_nonnegative", lambda self, x: False)
    before = len(checked)
    c = salience.explain(ImageClassifier(plain, labels=list("abc"), input_shape=(3, 8, 8)), x, **options)
    assert len(checked) - before > checks_in_place
    np.testing.assert_allclose(np.asarray(c.scores), np.asarray(b.scores), **TOL)


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus"])
def test_relu_outputs_need_no_zero_input_mask(composite, monkeypatch):
    """A layer whose input is a ReLU's output (exact zeros) leaves its coefficients unmasked where the
    input is 0, the ReLU's backward zeroing them there: scores and layer trace equal those of the
    same run with every input masked (``_known_nonnegative`` off) (1e-12)."""
    torch.manual_seed(5)
    model = ImageClassifier(_ReluThenConv(False).double().eval(), labels=list("abc"), input_shape=(3, 8, 8))
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run() -> tuple[np.ndarray, list[np.ndarray]]:
        e = salience.explain(model, x, method="lrp", composite=composite, target="all", trace=True)
        return np.asarray(e.scores), [np.asarray(t["relevance_in"]) for t in e.extras["_layers"]]

    unmasked = run()
    monkeypatch.setattr(LRPMode, "_known_nonnegative", lambda self, x: False)
    masked = run()
    np.testing.assert_allclose(unmasked[0], masked[0], **TOL)
    for ours, theirs in zip(unmasked[1], masked[1], strict=True):
        np.testing.assert_allclose(ours, theirs, **TOL)


def _fold_batch_norm(target: nn.Conv2d, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Set ``target``'s weight and bias to ``conv`` followed by ``bn`` (eval mode), folded by hand:
    W' = s W, b' = (b - mean) s + beta with s = gamma / sqrt(var + eps) (gamma 1, beta 0 without affine)."""
    weight = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        scale = weight / torch.sqrt(bn.running_var + bn.eps)
        target.weight.copy_(conv.weight * scale[:, None, None, None])
        target.bias.copy_((conv.bias - bn.running_mean) * scale + bias)


def test_batch_norm_and_pad_are_read_by_their_signatures():
    """The mode reads F.batch_norm's and F.pad's arguments by a fixed list of names and defaults (no
    signature binding per call): the list is the signature's, and a batch norm (random statistics,
    scale, shift and eps) called as a module, by position, by name, or given no scale, shift or eps
    (their defaults) is merged as the layer it makes: the epsilon rule (eps > 0, so it runs and
    reads the merged weights) gives the scores of the network with the batch norm folded into the
    convolution by hand (1e-10)."""
    import inspect

    from salience.methods.lrp_mode import _BATCH_NORM, _BATCH_NORM_DEFAULTS

    signature = inspect.signature(F.batch_norm)
    assert tuple(signature.parameters) == _BATCH_NORM
    assert {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty} == \
        _BATCH_NORM_DEFAULTS
    assert tuple(inspect.signature(F.pad).parameters) == ("input", "pad", "mode", "value")

    class Stem(nn.Module):
        def __init__(self, style: str) -> None:
            super().__init__()
            self.conv, self.head, self.style = nn.Conv2d(3, 4, 3), nn.Linear(4, 3), style
            self.bn = nn.BatchNorm2d(4, eps=1e-5 if style == "defaults" else 0.01, affine=style != "defaults")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z, bn = self.conv(F.pad(x, [1, 1, 1, 1])), self.bn
            if self.style == "position":
                z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
            elif self.style == "name":
                z = F.batch_norm(input=z, running_mean=bn.running_mean, running_var=bn.running_var, weight=bn.weight,
                                 bias=bn.bias, eps=bn.eps)
            elif self.style == "defaults":
                z = F.batch_norm(z, bn.running_mean, bn.running_var)
            elif self.style == "module":
                z = bn(z)
            return self.head(F.relu(z).mean((2, 3)))

    x = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def scores(net: nn.Module, merged: int) -> np.ndarray:
        e = salience.explain(ImageClassifier(net, labels=list("abc"), input_shape=(3, 6, 6)), x, method="lrp",
                             composite="epsilon", eps=0.01, target="all")
        assert e.params["batch_norm_merged"] == merged
        return np.asarray(e.scores)

    for style in ("module", "position", "name", "defaults"):
        torch.manual_seed(4)
        net = Stem(style).double().eval()
        folded = Stem("folded").double().eval()
        bn = net.bn
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            if bn.affine:
                bn.weight.uniform_(0.5, 2.0)
                bn.bias.uniform_(-0.5, 0.5)
            folded.head.load_state_dict(net.head.state_dict())
        _fold_batch_norm(folded.conv, net.conv, bn)
        np.testing.assert_allclose(scores(net, 1), scores(folded, 0), rtol=1e-10, atol=1e-14, err_msg=style)


def test_bound_arguments_reads_each_signature_once_and_takes_any_callable():
    """The rules name a call's arguments with one cached signature per function; defaults are added
    on request; an unhashable callable (not cacheable) and a builtin without a signature still work."""
    from salience.methods.rules import _signature, bound_arguments

    def pad_like(input, pad, mode="constant", value=None):  # noqa: A002, ANN001, ANN202 - F.pad's names
        return input

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, x, scale=2.0):  # noqa: ANN001, ANN204
            return x * scale

    _signature.cache_clear()
    x = torch.zeros(2)
    assert bound_arguments(pad_like, (x, (1, 1)), {}) == {"input": x, "pad": (1, 1)}
    assert bound_arguments(pad_like, (x, (1, 1)), {}, defaults=True) == {"input": x, "pad": (1, 1), "mode": "constant",
                                                                          "value": None}
    assert _signature.cache_info().misses == 1 and _signature.cache_info().hits == 1
    assert bound_arguments(Unhashable(), (x,), {}, defaults=True) == {"x": x, "scale": 2.0}
    assert bound_arguments(pad_like, (x,), {"bad": 1}) == {}  # arguments that do not bind: nothing named
    assert bound_arguments(torch.add, (x, x), {}) == {}  # a builtin without a readable signature


@pytest.mark.parametrize("masked", [False, True])
def test_traced_sums_without_a_host_check_equal_the_checked_ones(masked):
    """The trace's per-row dot products: checked on the host (the CPU's path) or with infinite values
    always zeroed (an accelerator's path, no synchronisation) give the same sums, a mask's -inf
    (where c is 0) counting as 0 (1e-12)."""
    from salience.methods.lrp_mode import _finite_row_dot

    a, c = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    if masked:
        a[:, 1, 2:], c[:, 1, 2:] = float("-inf"), 0.0
    expected = (torch.where(torch.isfinite(a), a, 0.0) * c).sum((1, 2))
    for check_first in (True, False):
        np.testing.assert_allclose(_finite_row_dot(a, c, check_first).numpy(), expected.numpy(), **TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("eps", [1e-6, 1e-13, 0.0])
def test_stabilised_ratio_equals_the_quotient_by_the_stabiliser(dtype, eps):
    """|z| / (|z| + eps) is z / stabilise(z, eps) exactly (the signs cancel in IEEE arithmetic), at
    +0 and -0 too (0); eps = 0 (and an eps below the dtype's range) falls back to the quotient."""
    from salience.methods.lrp_rules import stabilise, stabilised_ratio

    z = torch.cat([torch.randn(200, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 1e-5,
                   torch.tensor([0.0, -0.0, 1e-7, -1e-7, 3.0, -3.0], dtype=torch.float64)]).to(dtype)
    expected = z / stabilise(z, eps)
    found = stabilised_ratio(z, eps)
    assert torch.equal(found, expected)
    assert found[200:202].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- LRP-0 as the plain gradient
class _ShiftedResidual(nn.Module):
    """Conv - BN (with a shift: a bias after merging) - ReLU, a residual block, max and average
    pooling, a linear head with a bias; float64."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.block(y) + y)


def test_lrp0_runs_plainly_and_equals_the_epsilon_rule_at_its_limit():
    """eps = 0 (the default) runs the linear layers, batch norms and average pooling as plain calls
    (no rule, nothing traced); eps = 1e-300 runs them as epsilon rules, whose factor z / (|z| + eps)
    is 1 to the last bit wherever |z| > 1e-284: the same maps to 1e-12 (rounding of the same sums
    in another order)."""
    torch.manual_seed(3)
    net = _ShiftedResidual().double().eval()
    with torch.no_grad():
        for bn in (net.stem[1], net.block[1]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    model = ImageClassifier(net, labels=list("abc"), input_shape=(3, 8, 8))
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    plain = salience.explain(model, x, method="lrp", composite="epsilon", target="all", trace=True)
    rule = salience.explain(model, x, method="lrp", composite="epsilon", eps=1e-300, target="all", trace=True)
    np.testing.assert_allclose(np.asarray(plain.scores), np.asarray(rule.scores), **TOL)
    # the rule run traces 4 layers (two conv + batch norm merged, the average pooling, the head), each with a row per target
    assert plain.extras["_layers"] == [] and [t["layer"] for t in rule.extras["_layers"]] == ["head.3", "head.1", "block.0+bn", "stem.0+bn"]
    assert plain.params["batch_norm_merged"] == rule.params["batch_norm_merged"] == 2


@pytest.mark.parametrize("activation", [torch.sigmoid, torch.tanh, F.relu6])
def test_identity_rule_at_an_input_equal_to_zero_passes_nothing_back(activation):
    """y = f(x) with x exactly 0 at one place, where the ratio y / x the rule computes in the forward is
    inf (the sigmoid: f(0) = 0.5) or 0 / 0 (tanh, ReLU6): it is taken as 0 there, so nothing passes
    back and no NaN spreads; elsewhere the relevance passes unchanged, R_in = R_out = y c (1e-12)."""
    from salience.methods.lrp_composites import parse_composite

    x = torch.tensor([[0.0, 0.7, -1.3, 7.5]], dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([[2.0, 3.0, -1.5, 0.5]], dtype=torch.float64)
    with LRPMode(parse_composite("epsilon")):
        y = activation(x)
        (c,) = torch.autograd.grad(y, x, seed)
    expected = y.detach() * seed
    expected[0, 0] = 0.0
    np.testing.assert_allclose((x * c).detach().numpy(), expected.numpy(), **TOL)
    assert bool(torch.isfinite(c).all()) and float(c[0, 0]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("eps", [1e-6, 1e-13, 0.0])
def test_stabilise_nonnegative_equals_stabilise_at_and_above_zero(dtype, eps):
    """On values >= +0 (alpha-beta's positive denominators) z + eps in place equals stabilise(z, eps)
    bitwise (sign(+0) = +1), including eps = 0 and an eps below the dtype's range (the fallback)."""
    from salience.methods.lrp_rules import stabilise, stabilise_nonnegative

    z = torch.tensor([0.0, 1e-8, 3e-7, 0.5, 2.0, 7e3], dtype=torch.float64).to(dtype)
    assert torch.equal(stabilise_nonnegative(z.clone(), eps), stabilise(z, eps))


def test_trace_keeps_cpu_sums_as_python_floats():
    """The trace keeps a CPU tensor's per-row sums as Python floats (thousands of tiny tensors kept
    across a backward pass's large transient buffers fragment the C heap), and reads them back as
    the same float64 values; an accelerator's tensors stay tensors (no synchronisation)."""
    from salience.methods.lrp_mode import LayerTrace, sums_tensor

    out, into = torch.tensor([0.25, -1.5], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float32)
    t = LayerTrace("layer", "epsilon", out, into, torch.zeros(2))
    assert t.relevance_out == (0.25, -1.5) and t.relevance_in == (0.5, 2.0) and t.lost == (0.0, 0.0)
    assert torch.equal(sums_tensor(t.relevance_out), out) and sums_tensor(t.relevance_in).dtype == torch.float64
    meta = torch.empty(2, device="meta")
    assert LayerTrace("layer", "epsilon", meta, meta, meta).relevance_out is meta


class _ActivationAfterLayer(nn.Module):
    """Conv + batch norm, an activation, a dense head; ``apart``: a clone between the layer and the
    activation (the activation then runs by itself). ``after``, what happens to the pre-activation z
    after the activation read it: nothing; "reuse": doubled and added to the head's input (used
    twice); "reuse_in_place": the same, doubled in place; "in_place": doubled in place, not used again;
    "shifted": a constant added to z before the activation (in place; with ``apart``, out of place)."""

    def __init__(self, activation: nn.Module, apart: bool, after: str = "") -> None:
        super().__init__()
        # (not named "conv": a composite's key "conv" would match the name before "input", and z^B would not run)
        self.layer, self.bn, self.act, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), activation, nn.Linear(4 * 36, 3)
        self.apart, self.after = apart, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(self.layer(x))
        if self.after == "shifted":
            z = z + 0.3 if self.apart else z.add_(0.3)
            return self.head(self.act(z).flatten(1))
        y = self.act(z.clone() if self.apart else z)
        if self.after == "reuse":
            y = y + z * 2.0
        elif self.after:
            z.mul_(2.0)
            if self.after == "reuse_in_place":
                y = y + z
        return self.head(y.flatten(1))


ACTIVATIONS = [nn.ReLU6(), nn.ReLU(), nn.Hardtanh(-1.0, 2.0), nn.GELU(), nn.Tanh(), nn.LeakyReLU(0.1), nn.SiLU()]


@pytest.mark.parametrize("after", ["", "reuse", "reuse_in_place", "in_place", "shifted"])
@pytest.mark.parametrize("composite", [{"input": ("epsilon", {"eps": 1e-3}), "conv": ("epsilon", {"eps": 1e-3}),
                                        "linear": "epsilon"},
                                       "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
@pytest.mark.parametrize("activation", range(len(ACTIVATIONS)))
def test_activation_fused_with_the_layer_before_it(activation, composite, after, monkeypatch):
    """An activation with f(0) = 0 right after a rule layer (here conv + batch norm merged) runs in
    one rule node with it, its identity rule giving the layer R = y c: the scores and the layer trace
    equal those of the same network with a clone between the layer and the activation (the identity
    rule run by itself, c y / z), also when the pre-activation is used again, or changed in place
    after the activation read it; one changed in place before (a constant added) is not fused (1e-12:
    the same sums rounded in another order)."""
    from salience.methods import lrp_mode

    torch.manual_seed(activation)
    act = ACTIVATIONS[activation]
    fused, apart = (_ActivationAfterLayer(act, split, after).double().eval() for split in (False, True))
    with torch.no_grad():
        fused.bn.running_mean.uniform_(-0.5, 0.5)
        fused.bn.running_var.uniform_(0.5, 2.0)
    apart.load_state_dict(fused.state_dict())
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 - 1
    passes: list[int] = []
    real = lrp_mode._Pass.apply
    monkeypatch.setattr(lrp_mode._Pass, "apply", lambda *args: passes.append(1) or real(*args))

    def run(net: nn.Module) -> tuple[np.ndarray, list[np.ndarray], int]:
        before = len(passes)
        e = salience.explain(ImageClassifier(net, labels=list("abc"), input_shape=(3, 8, 8)), x, method="lrp",
                             composite=composite, low=-1.0, high=1.0, target="all", trace=True)
        return np.asarray(e.scores), [np.asarray(t["relevance_in"]) for t in e.extras["_layers"]], len(passes) - before

    ours, theirs = run(fused), run(apart)
    np.testing.assert_allclose(ours[0], theirs[0], **TOL)
    reused = after.startswith("reuse")
    assert len(ours[1]) == len(theirs[1]) + reused  # a reused layer traced once more: its own node and the fused one
    if not reused:
        for a, b in zip(ours[1], theirs[1], strict=True):
            np.testing.assert_allclose(a, b, **TOL)
    # ReLU's identity rule is its gradient (no _Pass either way); one forward pass per run, or two when
    # a change in place makes the run start again with copies
    runs = 1 + after.endswith("in_place")
    if after == "shifted":  # not fused: the batch norm's output, changed in place, is no longer the layer's
        # (and the change makes the run start again with copies)
        assert (ours[2], theirs[2]) == ((0, 0) if isinstance(act, nn.ReLU) else (2, 1))
    else:
        assert ours[2] == 0 and theirs[2] == (0 if isinstance(act, nn.ReLU) else runs)


def test_activation_with_a_value_at_zero_is_not_fused():
    """sigmoid(0) = 0.5: R = y c would put relevance on a layer output equal to 0, where the identity
    rule passes none (0 / 0 taken as 0); it runs by itself, so the scores and the layer trace equal
    those of the same network with a clone in between. The input's zero corner and zero conv bias
    and batch-norm mean and shift make one conv output exactly 0 (1e-12)."""
    torch.manual_seed(1)
    fused, apart = (_ActivationAfterLayer(nn.Sigmoid(), split).double().eval() for split in (False, True))
    with torch.no_grad():
        fused.layer.bias.zero_()
    apart.load_state_dict(fused.state_dict())
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x[:, :3, :3] = 0.0

    def run(net: nn.Module) -> list[np.ndarray]:
        e = salience.explain(ImageClassifier(net, labels=list("abc"), input_shape=(3, 8, 8)), x, method="lrp",
                             composite="epsilon_plus", low=0.0, high=1.0, target="all", trace=True)
        return [np.asarray(e.scores)] + [np.asarray(t[key]) for t in e.extras["_layers"] for key in ("relevance_out", "relevance_in")]

    for a, b in zip(run(fused), run(apart), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


class _ShiftBeforeBatchNorm(nn.Module):
    """Conv, a constant added (in place or not), batch norm, ReLU, a dense head."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.head, self.in_place = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 36, 3), in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        z = z.add_(0.3) if self.in_place else z + 0.3
        return self.head(torch.relu(self.bn(z)).flatten(1))


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box"])
def test_batch_norm_after_an_in_place_change_is_not_merged(composite):
    """A batch norm merges into the layer before it only if that layer's output reaches it unchanged:
    after a constant added in place (a tensor the layer gave, changed since) it is a layer of its
    own, as after the same addition out of place (1e-12). Merged (before the check), the rules left
    the constant out: the maps differed by 1.7 (epsilon_plus) and 24 (epsilon_gamma_box) times the
    out-of-place map's largest value."""
    torch.manual_seed(0)
    in_place, out_of_place = _ShiftBeforeBatchNorm(True).double().eval(), _ShiftBeforeBatchNorm(False).double().eval()
    out_of_place.load_state_dict(in_place.state_dict())
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(net: nn.Module) -> salience.Explanation:
        return salience.explain(ImageClassifier(net, labels=list("abc"), input_shape=(3, 8, 8)), x, method="lrp",
                                composite=composite, low=0.0, high=1.0, target="all")

    ours, theirs = run(in_place), run(out_of_place)
    np.testing.assert_allclose(np.asarray(ours.scores), np.asarray(theirs.scores), **TOL)
    assert ours.params["batch_norm_merged"] == theirs.params["batch_norm_merged"] == 0


class _PaddedBlock(nn.Module):
    """Conv + batch norm + ReLU6, zero padding, conv + batch norm + ReLU: every record the mode takes."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6())
        self.second = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)).sum((2, 3))


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus"])
def test_records_of_a_forward_pass_keep_no_tensor_alive(composite):
    """What the mode notes in a forward pass (layer outputs for batch norms and activations after them,
    zero padding for z^B, ReLU outputs known non-negative) is dropped when the outermost module
    returns and never holds a tensor strongly: once the caller lets go of the graph, every
    intermediate tensor is freed, rather than kept through the backward pass."""
    from salience.methods.lrp_composites import parse_composite

    net = _PaddedBlock().double().eval()
    seen: list[weakref.ref] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: seen.append(weakref.ref(out))) for m in net.modules()
             if not isinstance(m, (nn.Sequential, _PaddedBlock))]
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    with LRPMode(parse_composite(composite), bounds=(torch.zeros(3), torch.ones(3))) as mode:
        out = net(x)
        assert not (mode._outputs or mode._pads or mode._nonnegative)
        (grad,) = torch.autograd.grad(out[0, 1], x)
        del out
        assert len(seen) == 7 and all(ref() is None for ref in seen)
        # while a forward pass runs (here at its last module), the records hold the tensors they are about
        # weakly (a layer record's input is the rule's: its node keeps it anyway)
        held: list[tuple[object, ...]] = []
        hooks.append(net.second[-1].register_forward_hook(lambda *_: held.extend(
            [*mode._pads.values(), *mode._nonnegative.values(), *((r.output,) for r in mode._outputs.values())])))
        net(x)
        assert len(held) >= 6 and not [v for record in held for v in record if isinstance(v, torch.Tensor)]
    for hook in hooks:
        hook.remove()
    assert grad.shape == x.shape


class _PaddedStem(nn.Module):
    """Zero padding, a conv (with its batch norm, or with the batch norm folded into its weights),
    ReLU6 (right after, or after a clone: ``apart``), a dense head: EfficientNet's stem in small."""

    def __init__(self, folded: bool, apart: bool) -> None:
        super().__init__()
        self.apart = apart
        # (not named "conv": a composite's key "conv" would match the name before "input")
        self.stem, self.head = nn.Conv2d(3, 4, 3, stride=2), nn.Linear(4 * 16, 3)
        self.bn = None if folded else nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.stem(F.pad(x, (0, 1, 0, 1)))
        z = self.bn(z) if self.bn is not None else z
        return self.head(F.relu6(z.clone() if self.apart else z).flatten(1))


@pytest.mark.parametrize("fused", [True, False])
def test_input_layer_padding_mask_reaches_the_merged_and_fused_rule(fused):
    """z^B at an input layer after zero padding holds its bounds only on the image, not the padding
    (the mask); the conv + batch norm merged, and ReLU6 fused into it (or run apart), keep that mask:
    the scores equal those of the same network with the batch norm folded into the conv's weights
    and a clone before ReLU6 (neither merged nor fused: the conv's own rule node) (1e-12)."""
    torch.manual_seed(2)
    merged = _PaddedStem(folded=False, apart=not fused).double().eval()
    with torch.no_grad():
        merged.bn.running_mean.uniform_(-0.5, 0.5)
        merged.bn.running_var.uniform_(0.5, 2.0)
        merged.bn.weight.uniform_(0.5, 1.5)
        merged.bn.bias.uniform_(-0.2, 0.2)
    folded = _PaddedStem(folded=True, apart=True).double().eval()
    _fold_batch_norm(folded.stem, merged.stem, merged.bn)
    with torch.no_grad():
        folded.head.load_state_dict(merged.head.state_dict())
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    def scores(net: nn.Module) -> salience.Explanation:
        return salience.explain(ImageClassifier(net, labels=list("abc"), input_shape=(3, 8, 8)), x, method="lrp",
                                composite="epsilon_plus", low=0.0, high=1.0, target="all")

    ours, theirs = scores(merged), scores(folded)
    assert ours.params["batch_norm_merged"] == 1 and theirs.params["batch_norm_merged"] == 0
    assert ours.params["rules"]["Conv2d"] == ["zbox"]
    np.testing.assert_allclose(np.asarray(ours.scores), np.asarray(theirs.scores), **TOL)


def test_relevance_z_box_puts_on_zero_inputs_is_reported_once_named():
    """z^B gives an input equal to 0 relevance (-l J(W+)^T s - h J(W-)^T s) that R = x c cannot carry:
    it is reported in extras and warned about, the warning naming the method once."""
    torch.manual_seed(3)
    net = _PaddedStem(folded=True, apart=False).double().eval()
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x[:, :4] = 0.0
    with pytest.warns(salience.SalienceWarning, match=r"^lrp: relevance -?[0-9.e+-]+ fell on inputs equal to 0") as caught:
        e = salience.explain(ImageClassifier(net, labels=list("abc"), input_shape=(3, 8, 8)), x, method="lrp",
                             composite="epsilon_plus", low=0.0, high=1.0, target=0)
    assert e.extras["relevance_lost_at_zero_inputs"] != 0.0
    assert all("lrp: lrp:" not in str(w.message) for w in caught)
    # untraced (the default) it is counted all the same: equal to the traced run's (the same sums)
    with pytest.warns(salience.SalienceWarning, match="fell on inputs equal to 0"):
        traced = salience.explain(ImageClassifier(net, labels=list("abc"), input_shape=(3, 8, 8)), x, method="lrp",
                                  composite="epsilon_plus", low=0.0, high=1.0, target=0, trace=True)
    assert e.extras["_layers"] == [] and not e.params["traced"] and traced.params["traced"]
    assert [t["layer"] for t in traced.extras["_layers"]] == ["stem"]  # (the head, LRP-0, runs plainly)
    assert e.extras["relevance_lost_at_zero_inputs"] == traced.extras["relevance_lost_at_zero_inputs"]
    np.testing.assert_array_equal(np.asarray(e.scores), np.asarray(traced.scores))


def test_tensor_properties_read_on_the_path_are_linear():
    """Reading a property of a tensor on the relevance path (``h.shape``, ``h.mT``) is linear or no
    tensor at all: LRP and DeepLIFT give the scores of the same network without the reads (exactly:
    the same arithmetic). Before, both refused ``.mT`` as an unknown nonlinear function."""

    class Net(nn.Module):
        def __init__(self, reads: bool) -> None:
            super().__init__()
            self.conv, self.head, self.reads = nn.Conv2d(3, 4, 3), nn.Linear(4, 3), reads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x)).mean((2, 3))
            if self.reads:
                h = h.mT.reshape(h.shape[1], -1).mT  # (B, 4) -> (4, B) -> (B, 4) for B = 1
            return self.head(h)

    x = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    found = {}
    for reads in (False, True):
        torch.manual_seed(7)
        model = ImageClassifier(Net(reads).double().eval(), labels=list("abc"), input_shape=(3, 6, 6))
        found[reads] = [np.asarray(salience.explain(model, x, method="lrp", composite="epsilon", eps=1e-3, target=0).scores),
                        np.asarray(salience.explain(model, x, method="deeplift", baseline=torch.zeros_like(x), target=0).scores)]
    for ours, plain in zip(found[True], found[False], strict=True):
        np.testing.assert_array_equal(ours, plain)


class _ConvNormAct(nn.Module):
    """conv - batch norm - activation (its output added to the batch norm's when ``twice``) - pooling
    - linear; ``folded``: the batch norm folded into the convolution by hand instead."""

    def __init__(self, act: nn.Module, twice: bool = False, folded: bool = False) -> None:
        super().__init__()
        self.conv, self.act, self.head, self.twice = nn.Conv2d(3, 4, 3, padding=1), act, nn.Linear(4, 3), twice
        self.bn = None if folded else nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        z = z if self.bn is None else self.bn(z)
        y = self.act(z) + z if self.twice else self.act(z)
        return self.head(y.mean((2, 3)))


def _with_folded_twin(act: nn.Module, twice: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(12)
    net = _ConvNormAct(act, twice).double().eval()
    folded = _ConvNormAct(act, twice, folded=True).double().eval()
    with torch.no_grad():
        assert net.bn is not None
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 2.0)
        net.bn.bias.uniform_(-0.5, 0.5)
        folded.head.load_state_dict(net.head.state_dict())
    _fold_batch_norm(folded.conv, net.conv, net.bn)
    return net, folded


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.GELU(), nn.Sigmoid(), nn.ReLU()], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("twice", [False, True])
def test_activation_after_a_plain_batch_norm_passes_relevance_to_its_input(act, twice, monkeypatch):
    """An activation after a batch norm that runs plainly (LRP-0) takes the relevance straight to the
    batch norm's input, its ratio y / x scaled by the batch norm's factor (the batch norm's own
    backward left out): the scores equal those of the network with the batch norm folded into the
    convolution by hand (1e-12), also when the batch norm's output is used again (added to the
    activation's). ReLU, whose ratio is its derivative, keeps its own backward."""
    from salience.methods import lrp_mode

    net, folded = _with_folded_twin(act, twice)
    below = []
    real = lrp_mode._Pass.apply
    monkeypatch.setattr(lrp_mode._Pass, "apply", lambda *args: below.append(len(args) > 3) or real(*args))
    x = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)

    def scores(model: nn.Module) -> np.ndarray:
        return np.asarray(salience.explain(ImageClassifier(model, labels=list("abc"), input_shape=(3, 6, 6)), x,
                                           method="lrp", composite="epsilon", target="all").scores)

    ours = scores(net)
    assert below == ([] if isinstance(act, nn.ReLU) else [True])
    np.testing.assert_allclose(ours, scores(folded), rtol=1e-12, atol=1e-15)


def test_batch_norm_input_changed_in_place_is_not_skipped():
    """When the batch norm's input is changed in place after the batch norm read it, the activation
    does not take the relevance to it (the relevance would reach the change): the batch norm's own
    backward runs and autograd refuses the changed tensor, as it does for the plain gradient."""

    class Changed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            u = self.conv(x)
            z = self.bn(u)
            u.mul_(3.0)
            return self.head((F.relu6(z) + u).mean((2, 3)))

    model = ImageClassifier(Changed().double().eval(), labels=list("abc"), input_shape=(3, 6, 6))
    x = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=IN_PLACE_ERROR):
        salience.explain(model, x, method="lrp", composite="epsilon", target=0)
