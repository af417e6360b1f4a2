"""LRP rules for one linear layer (dense, convolution, batch norm as a per-channel scale and shift,
average pooling): each maps the relevance at the layer's output to the relevance at its input.

A layer is a call ``z = f(x; W, b)`` that is linear in x for fixed (W, b) (:class:`Layer`). With
``J(W)^T s`` the vector-Jacobian product of ``f(., W, 0)`` (independent of x), ``x+ = max(x, 0)``,
``x- = min(x, 0)``, ``W+``/``W-`` the positive/negative parts and ``stab(z) = z + e sign(z)``
(sign(0) = +1) the rules are (Bach et al. 2015; Montavon et al. 2017, 2019; zennit's forms):

- epsilon: ``R_in = x * J(W)^T (R / stab_eps(z))`` with z = f(x; W, b) (eps = the rule's epsilon);
- gamma (generalised as zennit: positive and negative inputs): with W^g+ = W + g W+, W^g- = W + g W-,
  ``z_p = f(x+; W^g+, b + g b+) + f(x-; W^g-, 0)``, ``z_n = f(x+; W^g-, b + g b-) + f(x-; W^g+, 0)``,
  ``s_p = [z > 0] R / stab(z_p)``, ``s_n = [z < 0] R / stab(z_n)``,
  ``R_in = x+ * (J(W^g+)^T s_p + J(W^g-)^T s_n) + x- * (J(W^g-)^T s_p + J(W^g+)^T s_n)``;
  for x >= 0 and z > 0 this is Montavon's ``x (w + g w+) / sum (x (w + g w+)) + b + g b+``;
- alpha-beta (alpha - beta = 1): ``z_p = f(x+; W+, b+) + f(x-; W-, 0)``, ``z_n = f(x+; W-, b-) + f(x-; W+, 0)``,
  ``R_in = alpha (x+ J(W+)^T + x- J(W-)^T)(R / stab(z_p)) - beta (x+ J(W-)^T + x- J(W+)^T)(R / stab(z_n))``;
  alpha = 1, beta = 0 is z+;
- flat: ``R_in = J(1)^T (R / stab(f(1; 1, 0)))`` (every input and weight 1, no bias);
- w-square: ``R_in = J(W^2)^T (R / stab(f(1; W^2, 0)))`` (no bias, unlike zennit's WSquare, which
  squares the bias too);
- z^B (bounded input, l <= x <= h): ``z = f(x; W, 0) - f(l; W+, 0) - f(h; W-, 0)``,
  ``R_in = x J(W)^T s - l J(W+)^T s - h J(W-)^T s`` with ``s = R / stab(z)``.

The stabiliser e of every rule but epsilon is ``stab`` (default :data:`STABILISER`, zennit's). Rules conserve
relevance up to their stabiliser where the denominator has no bias (alpha-beta and z+ with
``b = 0``, z^B, flat, w-square); epsilon and gamma give part of it to the bias.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from salience.errors import ParameterError

STABILISER = 1e-6  # the denominators' stabiliser of every rule but epsilon (zennit's default)


@lru_cache(maxsize=64)
def _representable(eps: float, dtype: torch.dtype) -> bool:
    """Whether eps is not 0 in ``dtype``."""
    return torch.tensor(eps, dtype=dtype).item() > 0


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps sign(z)`` with sign(0) = +1; a denominator still 0 (eps = 0) is replaced by 1 (the
    relevance there is 0: it is the layer's output times what flows back)."""
    if eps > 0 and _representable(eps, z.dtype):
        # |z + eps sign(z)| >= eps > 0 everywhere (eps representable in z's dtype). Arithmetic, not a
        # boolean mask (several times faster on the CPU), two passes over z; z = -0.0 takes -eps,
        # where z's relevance is 0
        return torch.copysign(torch.full((), eps, dtype=z.dtype, device=z.device), z).add_(z)
    found = z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)
    return torch.where(found == 0, torch.ones_like(found), found)


def stabilise_nonnegative(z: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`stabilise` of a fresh tensor known to be >= 0 (the positive part of alpha-beta): z + eps
    in place, one pass (no sign needed; -0.0 takes +eps, where the rule's contributions are all 0)."""
    if eps > 0 and _representable(eps, z.dtype):
        return z.add_(eps)
    return stabilise(z, eps)


def stabilised_ratio(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z / stabilise(z, eps)`` (a fresh tensor; 0 where z = 0), computed as ``|z| / (|z| + eps)``:
    the same values (the signs cancel exactly), without copysign, which is slow on the CPU."""
    if eps > 0 and _representable(eps, z.dtype):
        size = z.abs()
        return size.div_(size + eps)
    return z / stabilise(z, eps)


def _scale_shift(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A per-channel scale and shift on dimension 1 (batch norm in eval mode, merged to affine)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = x * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


@dataclass
class Layer:
    """One call of a linear layer: ``func(x, weight, bias, *rest, **options)`` (F.linear, F.conv*d,
    a scale and shift), or ``func(x, *rest, **options)`` without weights (pooling by averages).
    ``name`` and ``kind`` describe it in errors and traces."""

    func: Callable[..., torch.Tensor]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    rest: tuple[Any, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    name: str = "?"
    kind: str = "linear"
    nonnegative_input: bool = False  # known from the forward pass (a ReLU's output): the rules skip checking x's sign

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight is None:
            return self.func(x, *self.rest, **self.options)
        return self.func(x, weight, bias, *self.rest, **self.options)

    @staticmethod
    def scale_shift(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> Layer:
        return Layer(_scale_shift, weight, bias, name=name, kind="batch_norm")

    def merged_with_batch_norm(self, scale: torch.Tensor, shift: torch.Tensor) -> Layer:
        """This layer followed by ``y = scale * z + shift`` per output channel, as one layer
        (``W' = scale W`` on the output-channel dimension, ``b' = scale b + shift``)."""
        assert self.weight is not None
        shape = (-1,) + (1,) * (self.weight.dim() - 1)  # output channels: dimension 0 of linear and conv weights
        weight = self.weight * scale.reshape(shape)
        bias = shift if self.bias is None else self.bias * scale + shift
        return replace(self, weight=weight, bias=bias, name=f"{self.name}+bn")

    def weights(self, rule: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.weight is None:
            raise ParameterError(f"lrp: rule {rule!r} needs a layer with weights; {self.name} ({self.kind}) has none "
                                 "(pooling by averages takes the epsilon rule)")
        return self.weight, self.bias


_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_ARGUMENTS = ("stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (1, 0, 1, 1)


def _conv_options(layer: Layer, like: torch.Tensor) -> tuple[list[int], list[int], list[int], int, int] | None:
    """(stride, padding, dilation, groups, spatial dims) of a batched F.conv*d call with numeric
    padding (or "valid"), else None."""
    dims = _CONVS.get(layer.func)
    if dims is None or like.dim() != dims + 2 or len(layer.rest) > len(_CONV_ARGUMENTS):
        return None
    given = dict(zip(_CONV_ARGUMENTS, layer.rest, strict=False))
    if set(layer.options) - set(_CONV_ARGUMENTS) or set(given) & set(layer.options):
        return None
    given.update(layer.options)
    stride, padding, dilation, groups = (given.get(n, d) for n, d in zip(_CONV_ARGUMENTS, _CONV_DEFAULTS, strict=True))
    if isinstance(padding, str):
        if padding != "valid":
            return None
        padding = 0

    def expand(value: Any) -> list[int]:
        return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]

    return expand(stride), expand(padding), expand(dilation), int(groups), dims


def _back(layer: Layer, like: torch.Tensor, weight: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    """``J(weight)^T s``: the vector-Jacobian product of x -> layer(x; weight, no bias) at any x.
    Dense and convolution layers take it directly (``s W``; the convolution's input gradient, no
    forward pass); other layers by autograd through a forward pass at x = 0."""
    if weight is not None and layer.func is F.linear:
        return s.matmul(weight)
    conv = _conv_options(layer, like) if weight is not None else None
    if conv is not None:
        stride, padding, dilation, groups, dims = conv
        grad, _, _ = torch.ops.aten.convolution_backward(s, like, weight, None, stride, padding, dilation, False,
                                                         [0] * dims, groups, [True, False, False])
        return grad  # type: ignore[no-any-return]
    leaf = torch.zeros_like(like).requires_grad_(True)
    with torch.enable_grad():
        z = layer(leaf, weight, None)
        (grad,) = torch.autograd.grad(z, leaf, s)
    return grad


def _out(layer: Layer, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return layer(x, weight, bias)


def _has_negatives(layer: Layer, x: torch.Tensor) -> bool:
    return not layer.nonnegative_input and x.numel() > 0 and bool(x.min() < 0)


def _by_sign(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up`` where x > 0, ``down`` where x < 0 (their mean at 0, where x times it is 0): one
    interpolation by (sign(x) + 1) / 2 (a boolean mask is slower on the CPU)."""
    return torch.lerp(down, up, (x.sign() + 1) * 0.5)


def _pos(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


def _spread(layer: Layer, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, stab: float) -> torch.Tensor:
    """Relevance in proportion to ``weight`` alone (inputs taken as 1, no bias): flat and w-square."""
    z = _out(layer, torch.ones_like(x), weight, None)
    return _back(layer, x, weight, r / stabilise(z, stab))


class Rule(Protocol):
    """Maps the relevance at a layer's output to the relevance at its input."""

    name: str

    def relevance(self, layer: Layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Epsilon:
    """LRP-epsilon (LRP-0 for eps = 0 with no bias)."""

    eps: float = 1e-6
    name: str = "epsilon"

    def relevance(self, layer: Layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(layer, x, r)

    def coefficients(self, layer: Layer, x: torch.Tensor, r: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """c with relevance R_in = x * c. ``z``: the layer's output at x when known (the forward's)."""
        if layer.weight is None:
            leaf = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = layer(leaf)
                (grad,) = torch.autograd.grad(out, leaf, r / stabilise(out.detach(), self.eps))
            return grad
        if z is None:
            z = _out(layer, x, layer.weight, layer.bias)
        return _back(layer, x, layer.weight, r / stabilise(z, self.eps))

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, "epsilon": self.eps}


@dataclass(frozen=True)
class Gamma:
    """LRP-gamma, generalised to inputs of either sign (zennit's Gamma)."""

    gamma: float = 0.25
    stab: float = STABILISER
    name: str = "gamma"

    def relevance(self, layer: Layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(layer, x, r)

    def coefficients(self, layer: Layer, x: torch.Tensor, r: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """c with R_in = x * c (x+ * up + x- * down = x * (up where x > 0, else down)). ``z``: the
        layer's output at x when known. Without negative inputs the x- terms (0) are skipped."""
        w, b = layer.weights(self.name)
        g = self.gamma
        w_up, w_down = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        b_up = None if b is None else b + g * b.clamp(min=0)
        b_down = None if b is None else b + g * b.clamp(max=0)
        if z is None:
            z = _out(layer, x, w, b)
        negative = _has_negatives(layer, x)
        xp = x.clamp(min=0) if negative else x
        z_p, z_n = _out(layer, xp, w_up, b_up), _out(layer, xp, w_down, b_down)
        if negative:
            xn = x.clamp(max=0)
            z_p, z_n = z_p + _out(layer, xn, w_down, None), z_n + _out(layer, xn, w_up, None)
        s_p = (z > 0).to(r) * r / stabilise(z_p, self.stab)
        s_n = (z < 0).to(r) * r / stabilise(z_n, self.stab)
        up = _back(layer, x, w_up, s_p) + _back(layer, x, w_down, s_n)
        if not negative:
            return up
        down = _back(layer, x, w_down, s_p) + _back(layer, x, w_up, s_n)
        return _by_sign(x, up, down)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, "gamma": self.gamma}


@dataclass(frozen=True)
class AlphaBeta:
    """LRP-alpha-beta (alpha - beta = 1); alpha = 1, beta = 0 is z+."""

    alpha: float = 2.0
    beta: float = 1.0
    stab: float = STABILISER
    name: str = "alpha_beta"

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ParameterError(f"lrp: alpha-beta needs alpha, beta >= 0 and alpha - beta = 1; got alpha={self.alpha}, "
                                 f"beta={self.beta}")

    def relevance(self, layer: Layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(layer, x, r)

    def coefficients(self, layer: Layer, x: torch.Tensor, r: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """c with R_in = x * c (as Gamma's; ``z`` is not needed). Without negative inputs (after a
        ReLU) the x- terms (0) are skipped: one forward and one backward convolution for z+."""
        w, b = layer.weights(self.name)
        negative = _has_negatives(layer, x)
        wp, wn = w.clamp(min=0), w.clamp(max=0) if negative or self.beta else None
        xp = x.clamp(min=0) if negative else x
        xn = x.clamp(max=0) if negative else None
        z_p = _out(layer, xp, wp, _pos(b))  # >= 0: positive inputs times positive weights (and negative times negative)
        s_p = r / stabilise_nonnegative(z_p if xn is None else z_p.add_(_out(layer, xn, wn, None)), self.stab)
        if self.alpha != 1.0:
            s_p = self.alpha * s_p
        up = _back(layer, x, wp, s_p)
        down = _back(layer, x, wn, s_p) if xn is not None else None
        if self.beta:
            z_n = _out(layer, xp, wn, _neg(b))
            s_n = self.beta * r / stabilise(z_n if xn is None else z_n + _out(layer, xn, wp, None), self.stab)
            up = up - _back(layer, x, wn, s_n)
            if down is not None:
                down = down - _back(layer, x, wp, s_n)
        return up if down is None else _by_sign(x, up, down)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, "alpha": self.alpha, "beta": self.beta}


@dataclass(frozen=True)
class Flat:
    """LRP-flat: relevance spread uniformly over each output's receptive field."""

    stab: float = STABILISER
    name: str = "flat"

    def relevance(self, layer: Layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        w, _ = layer.weights(self.name)
        return _spread(layer, x, r, torch.ones_like(w), self.stab)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name}


@dataclass(frozen=True)
class WSquare:
    """LRP-w^2: relevance spread in proportion to the squared weights (no bias)."""

    stab: float = STABILISER
    name: str = "w_square"

    def relevance(self, layer: Layer, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        w, _ = layer.weights(self.name)
        return _spread(layer, x, r, w * w, self.stab)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name}


@dataclass(frozen=True)
class ZBox:
    """LRP-z^B for an input bounded by ``low`` <= x <= ``high`` (tensors broadcastable to x, e.g.
    (1, C, 1, 1) per channel). ``mask``: where the bounds hold (0 on padding the model added)."""

    low: torch.Tensor
    high: torch.Tensor
    stab: float = STABILISER
    name: str = "zbox"

    def relevance(self, layer: Layer, x: torch.Tensor, r: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        w, _ = layer.weights(self.name)
        low, high = self.low.to(x).expand_as(x), self.high.to(x).expand_as(x)
        if mask is not None:
            low, high = low * mask, high * mask
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        z = _out(layer, x, w, None) - _out(layer, low, wp, None) - _out(layer, high, wn, None)
        s = r / stabilise(z, self.stab)
        return x * _back(layer, x, w, s) - low * _back(layer, x, wp, s) - high * _back(layer, x, wn, s)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, "low": self.low.flatten().tolist(), "high": self.high.flatten().tolist()}


# rule name -> (factory from its options, the options it accepts)
RULES: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "epsilon": (lambda eps=1e-6, epsilon=None: Epsilon(eps if epsilon is None else epsilon), ("eps", "epsilon")),
    "gamma": (lambda gamma=0.25: Gamma(gamma), ("gamma",)),
    "alpha_beta": (lambda alpha=2.0, beta=1.0: AlphaBeta(alpha, beta), ("alpha", "beta")),
    "alpha2_beta1": (lambda: AlphaBeta(2.0, 1.0), ()),
    "alpha1_beta0": (lambda: AlphaBeta(1.0, 0.0, name="zplus"), ()),
    "zplus": (lambda: AlphaBeta(1.0, 0.0, name="zplus"), ()),
    "flat": (lambda: Flat(), ()),
    "w_square": (lambda: WSquare(), ()),
    "zbox": (lambda: "zbox", ()),  # built with the input's bounds by the method
}


def rule_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """A composite's value as (rule name, options): "gamma", ("gamma", {"gamma": 0.5}) or
    {"rule": "gamma", "gamma": 0.5}; unknown names and options are refused."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping) and "rule" in spec:
        name, options = spec["rule"], {k: v for k, v in spec.items() if k != "rule"}
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], Mapping):
        name, options = spec[0], dict(spec[1])
    else:
        raise ParameterError(f"lrp: a rule is a name, (name, {{options}}) or {{'rule': name, ...}}; got {spec!r}")
    key = str(name).strip().lower().replace("-", "_")
    if key not in RULES:
        raise ParameterError(f"lrp: unknown rule {name!r}; choose one of {', '.join(RULES)}")
    extra = sorted(set(options) - set(RULES[key][1]))
    if extra:
        raise ParameterError(f"lrp: rule {key!r} has no option {extra[0]!r}"
                             + (f" (options: {', '.join(RULES[key][1])})" if RULES[key][1] else " (it takes none)"))
    return key, dict(options)
