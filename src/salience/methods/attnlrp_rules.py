"""AttnLRP's rules for transformers (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-wise
Relevance Propagation for Transformers"; code: LXT), as more rules of :class:`LRPMode`'s machinery.

The form is LRPMode's: what flows backward at a tensor a is c with relevance R = a * c, so each
rule below is a *modified gradient* (the relevance at an input x is x times what arrives there):

- softmax s = softmax(x): ``R_in = x * (R_out - s * sum(R_out))`` (Proposition 3.1 without its
  bias term, as LXT's ``softmax_fn``; -inf inputs from masks count as 0). Per unit of input this
  is ``c_in = R_out - s sum(R_out)``: exactly the softmax's ordinary gradient. The rule does not
  conserve: each call keeps ``sum(R_out) - sum(R_in)`` (the Taylor expansion's bias term), which
  the trace records (rule ``"softmax"``);
- a product of k >= 2 input-dependent tensors (Q K^T, A V, the SwiGLU gate ``act(g) * u``;
  ``*``, ``matmul``, ``bmm``, ``mm``, ``einsum``): the epsilon rule on the sum of products, then the
  uniform rule, each factor taking 1/k: ``c_f = (1/k) J_f^T (R_out / stab(p))`` with p the
  product (Propositions 3.2 and 3.3; LXT's ``matmul_fn`` and ``mul2_fn``); conserves up to the
  stabiliser. ``baddbmm`` / ``addmm`` / ``addbmm`` (Bloom's ALiBi scores: ``beta t + alpha q k^T``)
  take the same rule, the added t (off the relevance path, else refused) taking its share as a bias;
- normalisations: ``F.layer_norm`` and ``F.rms_norm`` propagate through their linear part with the
  divisor held constant (Proposition 3.4, identity on the normalisation: for LayerNorm the
  centring stays a linear map and the bias takes its share, for RMSNorm the whole layer passes
  relevance unchanged); inside a module whose class name ends with ``Norm`` (``LlamaRMSNorm``,
  ``T5LayerNorm``, ...) the statistics (``pow``, ``rsqrt``, ``sqrt``, ``var``, ``std``, ``norm``,
  ...) are held constant, which is the same rule for norms written in Python (LXT patches their
  ``forward`` with ``stop_gradient`` on the variance);
- ``F.scaled_dot_product_attention``: the model's own output forward; backward by the two rules
  above on its decomposition ``softmax(q k^T scale + mask) v`` (``enable_gqa`` repeats k and v per
  group; the causal mask is the top-left one), written out where q, k and v are all on the path
  (:func:`_attention_vjp`), else by autograd through the decomposition. Dropout (``dropout_p > 0``)
  is refused;
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: torchvision's ViT,
  ``nn.TransformerEncoderLayer``): the model's own output forward; backward through its parts, the
  input and output projections as linear layers (the composite's rule) and the heads by the
  decomposition above (its masks: boolean True = not attended, float added, key padding per row).
  bias_k / bias_v, add_zero_attn, static keys / values and dropout in training are refused.

Untraced and without a stabiliser (:func:`runs_plainly`) the softmax rule is the softmax's
gradient and the uniform rule 1/k of each factor's gradient, so those calls run plainly: a
product on factors whose gradients are scaled by 1/k, sdpa on q, k, v scaled by 1/4, 1/4, 1/2
(LXT's efficient mode). The rules' own backward runs only where a trace or a stabiliser needs it.

Everything else is LRPMode's: linear layers take their composite's rule (AttnLRP: epsilon, the
bias absorbing its share), elementwise activations (GELU, SiLU, tanh) the identity rule, sums of
two input-dependent tensors (residuals, rotary embeddings' ``q cos + rot(q) sin``) the
proportional split, and functions linear in the input (reshapes, rotations, masks added as
constants, scaling) their gradient. Anything else on the path is refused by the mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from salience.errors import ParameterError
from salience.methods.lrp_rules import stabilised_ratio
from salience.methods.rules import named_arguments, tensors_in

PASS = object()  # the call is not one of these rules: the mode goes on with its own

SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)
PRODUCTS = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.multiply, torch.Tensor.multiply,
            torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
            torch.Tensor.bmm, torch.mm, torch.Tensor.mm, torch.einsum)
IN_PLACE_PRODUCTS = (torch.Tensor.mul_, torch.Tensor.__imul__)
# products with a tensor added (beta input + alpha batch1 @ batch2: Bloom's ALiBi scores): the uniform rule when the
# added tensor is off the relevance path (it takes its share, as a bias)
ADDED_PRODUCTS = (torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.addbmm, torch.Tensor.addbmm)
# products whose vector-Jacobian product is written out (two factors, positional, in this order)
MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm, torch.Tensor.mm)
MULS = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.multiply, torch.Tensor.multiply)
# functions of a normalisation's statistics, held constant inside a module whose class name ends with "Norm"
STATISTICS = (torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.square, torch.Tensor.square, torch.sqrt,
              torch.Tensor.sqrt, torch.rsqrt, torch.Tensor.rsqrt, torch.reciprocal, torch.Tensor.reciprocal, torch.var,
              torch.Tensor.var, torch.std, torch.Tensor.std, torch.var_mean, torch.std_mean, torch.norm, torch.Tensor.norm,
              torch.linalg.vector_norm, torch.abs, torch.Tensor.abs)
# linear in the input, not in the call classification LRPMode shares with DeepLIFT (indexing, repeats)
LINEAR = (torch.take_along_dim, torch.Tensor.take_along_dim, torch.repeat_interleave, torch.Tensor.repeat_interleave)
HANDLED = ("softmax (AttnLRP's rule), products of input-dependent tensors (uniform rule: attention's matmuls, gated "
           "MLPs), layer and RMS norms (divisor held constant), scaled_dot_product_attention and torch's multi-head attention")


class Mode(Protocol):
    """What the rules need of :class:`salience.methods.lrp_mode.LRPMode`."""

    stabiliser: float
    forwards: int
    copy_outputs: bool
    tracing: bool

    def paused(self) -> Any: ...

    def location(self) -> str: ...

    def in_normalisation(self) -> bool: ...

    def record(self, layer: str, rule: str, relevance_out: tuple[torch.Tensor, torch.Tensor],
               relevance_in: list[tuple[torch.Tensor, torch.Tensor]], forward: int) -> None: ...

    def record_sums(self, layer: str, rule: str, relevance_out: torch.Tensor, relevance_in: torch.Tensor,
                    forward: int) -> None: ...

    def relevance_per_row(self, a: torch.Tensor, c: torch.Tensor, rows: int) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class Site:
    """One rule call: its mode, the module it ran in, the rule's name, the forward pass it belongs to,
    and whether its backward is recorded in the mode's trace."""

    mode: Mode
    layer: str
    rule: str
    forward: int
    record: bool = True


# (seed, the call's value, its inputs) -> the vector-Jacobian product of the call for each input
VJP = Callable[..., list[torch.Tensor]]


class _Surrogate(torch.autograd.Function):
    """Forward: the model's own ``value``; backward: the vector-Jacobian product of ``call`` (a
    function of ``inputs`` equal to ``value`` up to rounding, with the rule's constants held fixed)
    applied to ``c * weight(value)`` (``weight`` None: c). ``vjp``: that product written out (no
    forward pass of ``call`` in the backward); None: by autograd through ``call``."""

    @staticmethod
    def forward(ctx: Any, site: Site, call: Callable[..., torch.Tensor], vjp: VJP | None,
                weight: Callable[[torch.Tensor], torch.Tensor] | None, value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.site, ctx.call, ctx.vjp, ctx.weight = site, call, vjp, weight
        ctx.save_for_backward(value, *inputs)
        return value.clone() if site.mode.copy_outputs else value  # as LRPMode's rules

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, c: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        value, *inputs = ctx.saved_tensors
        site: Site = ctx.site
        seed = c if ctx.weight is None else c * ctx.weight(value)
        if ctx.vjp is not None:
            with site.mode.paused():
                found = ctx.vjp(seed.to(value.dtype), value, *inputs)
        else:
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            with site.mode.paused(), torch.enable_grad():
                out = ctx.call(*leaves)
                found = torch.autograd.grad(out, leaves, seed.to(out.dtype), allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g.to(x.dtype) for x, g in zip(inputs, found, strict=True)]
        if site.record:
            site.mode.record(site.layer, site.rule, (value, c), list(zip(inputs, grads, strict=True)),
                             site.forward)
        return (None, None, None, None, None, *grads)


Where = tuple[str, int]  # (module, forward pass) a rule call belongs to


def _site(mode: Mode, rule: str, where: Where | None = None) -> Site:
    layer, forward = where if where is not None else (mode.location(), mode.forwards)
    return Site(mode, layer, rule, forward)


def runs_plainly(mode: Mode) -> bool:
    """Whether the products' uniform rule and the attention rules run as plain calls: without a
    stabiliser each factor's relevance per unit is 1/k of its gradient (the softmax rule is its
    gradient always), so only a trace needs the rules' own backward."""
    return mode.stabiliser == 0 and not mode.tracing


class _ScaledGradients(torch.autograd.Function):
    """Each x itself (a view) forward; backward: each gradient times its factor. One node for all
    the tensors of a call (each node costs Python in both passes)."""

    @staticmethod
    def forward(ctx: Any, factors: tuple[float, ...], *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.factors = factors
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *cs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *(c * factor for c, factor in zip(cs, ctx.factors, strict=True)))


def scaled_gradients(xs: list[torch.Tensor], factors: list[float]) -> list[torch.Tensor]:
    """Each x, its gradient multiplied by its factor on the way back (x itself where the factor is 1).
    The views returned are for the caller's own call only: they may not be changed in place."""
    scaled = [i for i, factor in enumerate(factors) if factor != 1]
    found = list(xs)
    if scaled:
        outputs = _ScaledGradients.apply(tuple(factors[i] for i in scaled), *(xs[i] for i in scaled))
        for i, out in zip(scaled, outputs, strict=True):
            found[i] = out
    return found


# ------------------------------------------------------------------ softmax
def softmax_rule(mode: Mode, x: torch.Tensor, dim: int, dtype: torch.dtype | None = None,
                 value: torch.Tensor | None = None, where: Where | None = None) -> torch.Tensor:
    """``softmax(x, dim)`` (``value``: the model's own result, else computed) whose backward is
    AttnLRP's softmax rule, i.e. the softmax's gradient in the per-unit form."""
    call = partial(F.softmax, dim=dim, dtype=dtype)
    if value is None:
        with torch.no_grad():
            value = call(x)

    def vjp(seed: torch.Tensor, s: torch.Tensor, _x: torch.Tensor) -> list[torch.Tensor]:
        return [s * (seed - (seed * s).sum(dim, keepdim=True))]  # softmax's backward at its output s

    return _Surrogate.apply(_site(mode, "softmax", where), call, vjp, None, value, x)  # type: ignore[no-any-return]


def _softmax_call(mode: Mode, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not _on_path(x):
        return PASS
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:
        raise ParameterError(f"attnlrp: softmax without dim{_at(mode)}; give dim")
    if not mode.tracing:  # the rule is the softmax's gradient: only a trace needs it run as a rule
        return func(*args, **kwargs)
    position = 3 if func is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype); torch.softmax(input, dim, dtype)
    dtype = kwargs.get("dtype", args[position] if len(args) > position else None)
    with torch.no_grad():
        value = func(*args, **kwargs)
    return softmax_rule(mode, x, int(dim), dtype, value)


# ------------------------------------------------------------------ products of input-dependent tensors
def _substitute(values: Any, leaves: dict[int, torch.Tensor]) -> Any:
    if isinstance(values, torch.Tensor):
        return leaves.get(id(values), values)
    if isinstance(values, (list, tuple)):
        return type(values)(_substitute(v, leaves) for v in values)
    if isinstance(values, dict):
        return {k: _substitute(v, leaves) for k, v in values.items()}
    return values


def _on_path(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def uniform_rule(mode: Mode, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 where: Where | None = None) -> Any:
    """``func(*args, **kwargs)``, a product of k >= 2 input-dependent tensors, whose backward is the
    epsilon rule on the products' sum followed by the uniform rule (1/k of the relevance to each
    factor). A call with fewer than two input-dependent factors is :data:`PASS` (linear)."""
    factors = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
    if len(factors) < 2:
        return PASS
    unique = list({id(t): t for t in factors}.values())
    k, eps = len(factors), mode.stabiliser
    if runs_plainly(mode):  # 1/k of each factor's gradient: the plain call on factors so scaled
        mapping = {id(t): leaf for t, leaf in zip(unique, scaled_gradients(unique, [1.0 / k] * len(unique)), strict=True)}
        return func(*_substitute(args, mapping), **_substitute(kwargs, mapping))

    def call(*leaves: torch.Tensor) -> torch.Tensor:
        mapping = {id(t): leaf for t, leaf in zip(unique, leaves, strict=True)}
        return func(*_substitute(args, mapping), **_substitute(kwargs, mapping))  # type: ignore[no-any-return]

    def weight(p: torch.Tensor) -> torch.Tensor | float:  # p / stab(p) / k; without a stabiliser p / p = 1
        return 1.0 / k if eps == 0 else stabilised_ratio(p, eps).div_(k)

    with torch.no_grad():
        value = func(*args, **kwargs)
    vjp = None
    if len(unique) == 2 and len(factors) == 2 and len(args) == 2 and not kwargs and args[0] is unique[0] \
            and args[1] is unique[1]:
        if func in MATMULS and min(args[0].dim(), args[1].dim()) >= 2:
            vjp = _matmul_vjp
        elif func in MULS:
            vjp = _mul_vjp
    return _Surrogate.apply(_site(mode, "uniform", where), call, vjp, weight, value, *unique)


def _matmul_vjp(seed: torch.Tensor, _value: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """a @ b (both at least 2-d, batch dimensions broadcast)."""
    return [seed.matmul(b.transpose(-1, -2)).sum_to_size(a.shape), a.transpose(-1, -2).matmul(seed).sum_to_size(b.shape)]


def _mul_vjp(seed: torch.Tensor, _value: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """a * b (broadcast)."""
    return [(seed * b).sum_to_size(a.shape), (seed * a).sum_to_size(b.shape)]


# ------------------------------------------------------------------ normalisations
def _shape(shape: Any) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(n) for n in shape)


def _norm_dims(shape: Any) -> tuple[int, ...]:
    return tuple(range(-len(_shape(shape)), 0))


def _layer_norm(mode: Mode, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ("input", "normalized_shape", "weight", "bias", "eps") if func is F.layer_norm else \
        ("input", "normalized_shape", "weight", "eps")
    bound = named_arguments(names, args, kwargs)
    x = bound["input"]
    if not _on_path(x):
        return PASS
    dims, weight = _norm_dims(bound["normalized_shape"]), bound.get("weight")
    with torch.no_grad():
        if func is F.layer_norm:  # the value and 1 / sqrt(var + eps) from one kernel (F.layer_norm's own)
            value, _, scale = torch.ops.aten.native_layer_norm(x, list(_shape(bound["normalized_shape"])), weight,
                                                               bound.get("bias"), float(bound.get("eps", 1e-5)))
            scale = scale.to(x.dtype)
        else:
            value = func(*args, **kwargs)
            eps = bound.get("eps")
            eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
            scale = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    centred = func is F.layer_norm
    if not mode.tracing:  # the same backward, without the trace's bookkeeping
        return _HeldDivisor.apply(x, value, scale, weight, dims, centred)

    def call(leaf: torch.Tensor) -> torch.Tensor:
        y = (leaf - leaf.mean(dims, keepdim=True) if centred else leaf) * scale
        return y if weight is None else y * weight

    def vjp(seed: torch.Tensor, _value: torch.Tensor, _x: torch.Tensor) -> list[torch.Tensor]:
        return [held_divisor_backward(seed, scale, weight, dims, centred)]

    return _Surrogate.apply(_site(mode, "layer_norm" if centred else "rms_norm"), call, vjp, None, value, x)


def held_divisor_backward(c: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None, dims: tuple[int, ...],
                          centred: bool) -> torch.Tensor:
    """A norm's gradient with its divisor held constant: ``g = c w / sigma`` (``scale`` = 1 / sigma),
    centred over the normalised ``dims`` for LayerNorm (the centring's Jacobian is symmetric)."""
    g = (c if weight is None else c * weight) * scale
    return g - g.mean(dims, keepdim=True) if centred else g


class _HeldDivisor(torch.autograd.Function):
    """A norm's own output ``value`` forward; backward: :func:`held_divisor_backward` (untraced:
    no trace bookkeeping)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
                dims: tuple[int, ...], centred: bool) -> torch.Tensor:
        ctx.dims, ctx.centred = dims, centred
        ctx.save_for_backward(scale, weight)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, c: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale, weight = ctx.saved_tensors
        return held_divisor_backward(c, scale, weight, ctx.dims, ctx.centred), None, None, None, None, None


def is_normalisation(module: nn.Module) -> bool:
    """A module whose class (or a base class) name ends with ``Norm``: LayerNorm, LlamaRMSNorm, T5LayerNorm, ..."""
    return any(c.__name__.endswith("Norm") for c in type(module).__mro__)


# ------------------------------------------------------------------ scaled dot-product attention
def attention(mode: Mode, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
              where: Where | None = None) -> torch.Tensor:
    """``softmax(q k^T scale + mask) v`` with AttnLRP's rules on both matmuls and the softmax: the
    decomposition of ``F.scaled_dot_product_attention`` (no dropout). ``where``: the module and
    forward pass its rules are recorded under (default: the mode's current ones)."""
    k, v = _grouped(q, k, v, enable_gqa)
    factor = _factor(q, scale)
    scores = _masked(_product(mode, q, k.transpose(-2, -1), where) * factor, attn_mask, is_causal)
    return _product(mode, softmax_rule(mode, scores, -1, where=where), v, where)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v repeated per query group (grouped-query attention), else as they are."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        return k.repeat_interleave(q.shape[-3] // k.shape[-3], -3), v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    return k, v


def _factor(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _masked(scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Scores with sdpa's masks: the causal one top-left, a boolean one (False: -inf), a float one added."""
    if is_causal:
        allowed = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores


def _attention_vjp(mode: Mode, where: Where, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                   enable_gqa: bool) -> VJP:
    """The backward of :func:`attention` written out, for q, k and v all on the relevance path: the
    same rules, relevance and trace (up to rounding) as autograd through the decomposition, with one
    product less (A V is the forward's value) and fewer passes over the (L, S) scores.

    With P = q k^T, S = f P + mask, A = softmax(S), O = A V and c the gradient at O (per unit):
    A V's rule gives ``c_A = s V^T``, ``c_V = A^T s`` with ``s = c O / stab(O) / 2``; the softmax's
    ``c_S = A (c_A - sum(A c_A))``; P's rule ``c_q = (f/2) w k``, ``c_k = (f/2) w^T q`` with
    ``w = c_S P / stab(P)``. A masked score has A = 0, hence c_S = 0: its relevance is 0 (as
    the decomposition's, whose -inf scores the trace counts as 0)."""
    eps = mode.stabiliser
    layer, forward = where
    additive = attn_mask is not None and attn_mask.dtype != torch.bool
    # read once here, not in each target's backward (a host synchronisation on a GPU)
    mask = None if additive and not bool(attn_mask.any()) else attn_mask  # an additive mask of zeros: none
    added = mask if additive else None
    kept_weights: list[torch.Tensor] = []  # without a stabiliser: A, computed by the first target's backward, kept for the others

    def vjp(c: torch.Tensor, o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        kr, vr = _grouped(q, k, v, enable_gqa)
        factor = _factor(q, scale)
        rows = o.shape[0] if o.dim() else 1
        if eps == 0 and kept_weights:
            scaled, a = None, kept_weights[0]
        else:
            scaled = torch.matmul(q * factor, kr.transpose(-2, -1))  # f P
            a = F.softmax(_masked(scaled, mask, is_causal), dim=-1)
            if eps == 0:
                kept_weights.append(a)
        s = c * 0.5 if eps == 0 else c * stabilised_ratio(o, eps).div_(2)
        c_a, c_v = s.matmul(vr.transpose(-2, -1)), a.transpose(-2, -1).matmul(s)
        c_s = a * c_a
        kept = c_s.sum(-1, keepdim=True)  # per query: the relevance at the softmax's output (sum of A c_A)
        c_s.addcmul_(a, kept, value=-1.0)  # A c_A - A sum(A c_A)
        # P / stab(P) = f P / stab(f P, |f| eps) (1 without a stabiliser), times c_S; the factor f / 2
        # (scaling, then half to each factor) goes on the small products
        w = c_s if eps == 0 else c_s * stabilised_ratio(scaled, abs(factor) * eps)  # c_s may be vmapped
        c_q = w.matmul(kr).mul_(factor / 2).sum_to_size(q.shape)
        c_k = _ungrouped(w.transpose(-2, -1).matmul(q).mul_(factor / 2), k)
        c_v = _ungrouped(c_v, v)
        if not mode.tracing:
            return [c_q, c_k, c_v]
        at_softmax = kept.reshape(rows, -1).sum(1).double()  # per row: the queries' sums added
        # sum of P c_P = sum of (f P) c_S; without a stabiliser the rule on P conserves, and q and k
        # take half each: 2 sum(q c_q)
        at_q, at_k = mode.relevance_per_row(q, c_q, rows), mode.relevance_per_row(k, c_k, rows)
        at_product = 2 * at_q if eps == 0 else mode.relevance_per_row(scaled, c_s, rows)
        at_scores = at_product if added is None else at_product + _mask_share(added, c_s, rows)  # sum of S c_S
        mode.record_sums(layer, "uniform", mode.relevance_per_row(o, c, rows),
                         at_softmax + mode.relevance_per_row(v, c_v, rows), forward)
        mode.record_sums(layer, "softmax", at_softmax, at_scores, forward)
        mode.record_sums(layer, "uniform", at_product, at_q + at_k, forward)
        return [c_q, c_k, c_v]

    return vjp


def _mask_share(mask: torch.Tensor, c: torch.Tensor, rows: int) -> torch.Tensor:
    """The relevance an additive attention mask takes in the softmax's input: ``sum(mask * c)`` per
    row (dimension 0 of c, of size ``rows``; -inf entries, where c is 0, count as 0), c summed to
    the mask's broadcast shape first (no copy of the mask per head)."""
    m = torch.nan_to_num(mask, nan=0.0, posinf=0.0, neginf=0.0).to(c.dtype)
    m = m.reshape((1,) * (c.dim() - m.dim()) + tuple(m.shape))
    reduced = c.sum_to_size((rows,) + tuple(m.shape[1:]))
    return (m * reduced).sum(dim=tuple(range(1, c.dim()))).double()


def _ungrouped(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient at k or v, repeated per query group (grouped-query attention) or broadcast (a
    dimension of size 1), summed back to ``like``'s shape."""
    heads = like.shape[-3] if like.dim() >= 3 else 1
    if like.dim() >= 3 and heads > 1 and grad.shape[-3] != heads:
        grad = grad.reshape(*grad.shape[:-3], heads, grad.shape[-3] // heads, *grad.shape[-2:]).sum(-3)  # vmap has no unflatten
    return grad.sum_to_size(like.shape)


def _product(mode: Mode, a: torch.Tensor, b: torch.Tensor, where: Where | None) -> torch.Tensor:
    found = uniform_rule(mode, torch.matmul, (a, b), {}, where)
    return torch.matmul(a, b) if found is PASS else found  # type: ignore[no-any-return]


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa(mode: Mode, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bound = named_arguments(_SDPA_NAMES, args, kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    path = [t for t in (q, k, v) if _on_path(t)]
    if not path:
        return PASS
    if float(bound.get("dropout_p", 0.0) or 0.0) > 0.0:
        raise ParameterError(f"attnlrp: scaled_dot_product_attention with dropout{_at(mode)}; call model.eval()")
    if runs_plainly(mode) and not _on_path(bound.get("attn_mask")):
        return _sdpa_scaled(func, bound)
    with torch.no_grad():
        value = func(*args, **kwargs)
    mask, causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))
    scale, gqa = bound.get("scale"), bool(bound.get("enable_gqa", False))
    on_path = [_on_path(t) for t in (q, k, v)]
    where = (mode.location(), mode.forwards)
    if all(on_path):  # the backward written out (the rules record themselves)
        vjp = _attention_vjp(mode, where, mask, causal, scale, gqa)
        return _Surrogate.apply(Site(mode, where[0], "attention", where[1], record=False), None, vjp, None, value, q, k, v)

    def call(*leaves: torch.Tensor) -> torch.Tensor:
        given = iter(leaves)
        qkv = [next(given) if flag else t.detach() for t, flag in zip((q, k, v), on_path, strict=True)]
        return attention(mode, *qkv, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa, where=where)

    # the decomposition's own rules record themselves: this call is not recorded (its relevance is theirs)
    return _Surrogate.apply(Site(mode, where[0], "attention", where[1], record=False), call, None, None, value, *path)


def _sdpa_scaled(func: Callable[..., Any], bound: dict[str, Any]) -> torch.Tensor:
    """sdpa as the plain call, its inputs' gradients scaled: the rules of its decomposition without
    a stabiliser. A V's uniform rule gives A and V half of their gradients where both are on the
    path, the softmax's rule passes its gradient, and q k^T's uniform rule halves q's and k's again
    where both are on the path (so 1/4 to q, k and 1/2 to v in self-attention)."""
    on_q, on_k, on_v = (_on_path(bound[name]) for name in ("query", "key", "value"))
    product = 0.5 if on_q and on_k else 1.0
    weights = 0.5 if (on_q or on_k) and on_v else 1.0
    q, k, v = scaled_gradients([bound["query"], bound["key"], bound["value"]],
                               [product * weights if on_q else 1.0, product * weights if on_k else 1.0,
                                weights if on_v else 1.0])
    rest = {name: value for name, value in bound.items() if name not in ("query", "key", "value")}
    return func(q, k, v, **rest)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ torch's multi-head attention
_MHA_NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
              "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
              "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
              "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None,
                 "static_k": None, "static_v": None, "average_attn_weights": True, "is_causal": False}


class _OwnValue(torch.autograd.Function):
    """Forward: ``value`` (the model's own result); backward: the gradient goes to ``decomposed`` (the
    same function computed from its parts, equal up to rounding, whose nodes carry the rules)."""

    @staticmethod
    def forward(ctx: Any, decomposed: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, c: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return c, None


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A multi-head-attention mask as added to the scores: a boolean one (True: not attended) as
    -inf / 0, a float one as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(mask, float("-inf"))
    return mask.to(like.dtype)


def _multi_head_attention(mode: Mode, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``F.multi_head_attention_forward`` (nn.MultiheadAttention, nn.TransformerEncoderLayer) by its
    parts: the input projections and the output projection as linear layers (the composite's rule),
    the heads by :func:`attention` (AttnLRP's rules on both matmuls and the softmax), with the
    model's own output values forward. Its attention weights (``need_weights``) are the model's,
    off the relevance path. Refused: bias_k / bias_v, add_zero_attn, static keys or values,
    dropout in training."""
    b = named_arguments(_MHA_NAMES, args, kwargs, _MHA_DEFAULTS)
    q_in, k_in, v_in = b["query"], b["key"], b["value"]
    if not any(_on_path(t) for t in (q_in, k_in, v_in)):
        return PASS
    unsupported = [name for name, present in (
        ("bias_k / bias_v (add_bias_kv)", b["bias_k"] is not None or b["bias_v"] is not None),
        ("add_zero_attn", bool(b["add_zero_attn"])), ("static_k / static_v", b["static_k"] is not None or b["static_v"] is not None),
        ("dropout in training", bool(b["training"]) and float(b["dropout_p"]) > 0)) if present]
    if unsupported:
        raise ParameterError(f"attnlrp: multi-head attention with {', '.join(unsupported)}{_at(mode)} has no decomposition "
                             "here; call model.eval() for dropout")
    with torch.no_grad():
        output, weights = func(*args, **kwargs)
    batched = q_in.dim() == 3
    q_in, k_in, v_in = (t if batched else t.unsqueeze(1) for t in (q_in, k_in, v_in))  # (L, N, E), sequence first
    length, rows, width = q_in.shape
    heads = int(b["num_heads"])
    if q_in is k_in is v_in and not b["use_separate_proj_weight"]:  # self-attention: one projection, as torch's
        q, k, v = mode.linear(q_in, b["in_proj_weight"], b["in_proj_bias"]).chunk(3, dim=-1)
    else:
        separate = b["use_separate_proj_weight"]
        weights_qkv = (b["q_proj_weight"], b["k_proj_weight"], b["v_proj_weight"]) if separate else b["in_proj_weight"].chunk(3)
        biases = (None, None, None) if b["in_proj_bias"] is None else b["in_proj_bias"].chunk(3)
        q, k, v = (mode.linear(t, w, bias) for t, w, bias in zip((q_in, k_in, v_in), weights_qkv, biases, strict=True))

    def split(t: torch.Tensor) -> torch.Tensor:  # (S, N, E) -> (N, H, S, E / H)
        return t.reshape(t.shape[0], rows, heads, width // heads).permute(1, 2, 0, 3)

    mask = None
    if b["attn_mask"] is not None:
        found = _additive(b["attn_mask"], q)
        mask = found.reshape(rows, heads, *found.shape[-2:]) if found.dim() == 3 else found
    if b["key_padding_mask"] is not None:
        padding = _additive(b["key_padding_mask"], q)
        padding = padding.reshape(rows, 1, 1, -1) if padding.dim() == 2 else padding.reshape(1, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    heads_out = attention(mode, split(q), split(k), split(v), attn_mask=mask)  # (N, H, L, E / H)
    merged = heads_out.permute(2, 0, 1, 3).reshape(length, rows, width)
    decomposed = mode.linear(merged, b["out_proj_weight"], b["out_proj_bias"])
    decomposed = decomposed if batched else decomposed.squeeze(1)
    return _OwnValue.apply(decomposed, output), weights


def _at(mode: Mode) -> str:
    where = mode.location()
    return f" (in {where})" if where else ""


# ------------------------------------------------------------------ dispatch
def _added_product(mode: Mode, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``beta t + alpha a @ b`` (:data:`ADDED_PRODUCTS`): the uniform rule, t taking its share as a
    bias; refused when t depends on the input (a sum, not a factor)."""
    if _on_path(args[0] if args else kwargs.get("input")):
        raise ParameterError(f"attnlrp: {getattr(func, '__name__', func)} adds an input-dependent tensor to a product{_at(mode)}; "
                             "the uniform rule needs the sum and the product as two calls")
    return uniform_rule(mode, func, args, kwargs)


TransformerRule = Callable[[Mode, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
# torch function -> its rule (each returns the call's result, or PASS when the call is off the relevance path)
_RULES: dict[Callable[..., Any], TransformerRule] = {
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _multi_head_attention,
    **dict.fromkeys(SOFTMAXES, _softmax_call),
    **dict.fromkeys((f for f in (F.layer_norm, getattr(F, "rms_norm", None)) if f is not None), _layer_norm),
    **dict.fromkeys(PRODUCTS, uniform_rule),
    **dict.fromkeys(ADDED_PRODUCTS, _added_product),
}


def has_transformer_rule(func: Callable[..., Any], in_normalisation: bool) -> bool:
    """Whether one of these rules covers ``func`` (inside a normalisation module: ``in_normalisation``)."""
    return func in _RULES or (func in STATISTICS and in_normalisation)


def transformer_call(mode: Mode, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The result of ``func(*args, **kwargs)`` under AttnLRP's rules, or :data:`PASS` when none applies."""
    rule = _RULES.get(func)
    if rule is not None:
        return rule(mode, func, args, kwargs)
    if func in IN_PLACE_PRODUCTS and sum(t.requires_grad for t in tensors_in((args, kwargs))) >= 2:
        raise ParameterError(f"attnlrp cannot apply the uniform rule to an in-place product{_at(mode)}; write x = x * y")
    if func in LINEAR:
        return func(*args, **kwargs)
    if func in STATISTICS and mode.in_normalisation():
        result = func(*args, **kwargs)
        return tuple(t.detach() for t in result) if isinstance(result, tuple) else result.detach()
    return PASS
