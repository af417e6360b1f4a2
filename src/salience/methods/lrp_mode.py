"""LRP as a modified gradient: a :class:`torch.overrides.TorchFunctionMode` (the mechanism of
:mod:`salience.methods.rules`) that, while active, makes the backward pass of a model's forward
pass propagate relevance.

What flows backward is the relevance *per unit of activation*: at a tensor a the backward carries
c with R = a * c (elementwise), so the gradient seed 1 at the explained logit z is the relevance
R = z, and the input's relevance is x * (what arrives at x). In that form the rules are:

- linear layers (F.linear, F.conv1d/2d/3d, and a dense layer written out as a product with its
  weight: ``x @ W``, ``x.mm(W)``, ``addmm(b, x, W)`` with W a 2-d ``nn.Parameter``, as GPT-2's
  ``Conv1D``, taken as ``F.linear(x, W^T, b)``, or ``W @ x``) take their composite's rule
  (:mod:`salience.methods.lrp_rules`): c_in = R_in / x (0 where x = 0: the relevance a rule puts
  on an input equal to 0, possible with flat, w-square and z^B only, is counted in ``lost``).
  LRP-0 (epsilon with eps = 0) is the layer's own gradient in this form, c_in = J^T (z c / z) =
  J^T c, and runs as the plain call (no rule, no trace; at an output exactly 0, where z c / z is
  0 / 0, the gradient's convention: c passes back);
- batch norm (eval mode) right after a linear layer is merged into it for the rule (canonizer:
  W' = s W, b' = s b + t with s = gamma / sqrt(var + eps), t = beta - mean s); the forward values are
  the model's own; a batch norm not after a linear layer is a per-channel scale and shift layer;
- average pooling is a weightless linear layer (its composite rule, epsilon);
- a sum of two relevance-carrying tensors (residual a + b) splits R in proportion to each
  summand, R_a = a R / (a + b): per unit, c_a = c, its gradient (a difference likewise), so sums
  run as plain calls (no stabiliser: there is no division in this form);
- elementwise activations (the ReLU family, sigmoid, tanh, ..., and a module of
  ``transformers.activations`` written out in torch functions, or one whose class declares
  ``salience_elementwise = True``, as one unit, its own calls run without gradients:
  :func:`salience.methods.rules.is_activation_unit`) pass relevance
  through (R_in = R_out: c_in = c_out y / x); for ReLU, y / x is its derivative, so it runs as the plain
  call; one with f(0) = 0 right after a layer that runs a rule (conv + batch norm + ReLU6) runs
  in one node with it, the layer's rule starting from R = y c (no ratio computed or kept); one
  right after a batch norm that runs plainly (LRP-0) passes the relevance straight to the batch
  norm's input, its ratio scaled by the batch norm's factor (the batch norm's backward left out);
- max pooling keeps its gradient (winner takes all); other functions linear in the input
  (reshapes, indexing, padding, dropout in eval mode, scaling by constants) keep their gradient,
  which in this form is LRP-0 (relevance moves unchanged or in proportion);
- anything else on the path (softmax, products of two input-dependent tensors, unknown functions)
  is refused with a one-line error naming it, unless ``transformer=True`` adds AttnLRP's rules
  (:mod:`salience.methods.attnlrp_rules`: softmax, products of input-dependent tensors, layer and
  RMS norms, scaled dot-product attention).

Nothing is attached to the model: layers are named through process-wide module hooks that exist
only inside the ``with`` block and are removed on every path (errors included); the model's
parameters and buffers are read, never written. TorchScript modules are refused (their layers
are not seen).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from salience.errors import ParameterError, SalienceError
from salience.methods.attnlrp_rules import HANDLED as TRANSFORMER_HANDLED
from salience.methods.attnlrp_rules import PASS, has_transformer_rule, is_normalisation, transformer_call
from salience.methods.deeplift import check_logit_targets
from salience.methods.lrp_composites import Composite, covering
from salience.methods.lrp_rules import RULES, STABILISER, Epsilon, Gamma, Layer, Rule, ZBox
from salience.methods.rules import (
    ELEMENTWISE,
    LINEAR,
    RELU_FAMILY,
    ModuleHookedMode,
    check_unit_output,
    custom_function_refusal,
    custom_functions,
    function_name,
    input_dependent,
    is_activation_unit,
    is_inplace,
    is_linear_call,
    named_arguments,
    tensors_in,
)

LAYERS: dict[Callable[..., Any], str] = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}
# dense layers written out as products with a weight (see LRPMode._weight_product)
ADDMMS = (torch.addmm, torch.Tensor.addmm)
WEIGHT_PRODUCTS = frozenset((torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, *ADDMMS))
AVG_POOLS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
MAX_POOLS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
ACTIVATIONS = set(RELU_FAMILY) | set(ELEMENTWISE)
# elementwise activations with f(0) = 0 (besides the ReLU family): fused with a rule layer before them
ZERO_AT_ZERO = {func for func, name in ELEMENTWISE.items()
                if name.rsplit(".", 1)[-1] in ("elu", "selu", "celu", "leaky_relu", "tanh", "gelu", "silu", "mish",
                                               "hardswish", "softsign", "tanhshrink")}
# F.batch_norm's parameters and defaults (read by named_arguments)
_BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
HANDLED = ("convolutions and linear layers (by the composite's rules), batch norm in eval mode, average and max pooling, "
           "residual sums, elementwise activations and functions linear in the input")


@functools.cache
def class_names(cls: type) -> tuple[str, ...]:
    """The names of a module class and its bases, nearest first (nn.Module and object left out)."""
    return tuple(c.__name__ for c in cls.__mro__ if c not in (nn.Module, object))


def gradient_form(rule: Rule) -> bool:
    """Whether a layer's rule is its own gradient in the per-unit form: LRP-0 (epsilon, eps = 0)."""
    return isinstance(rule, Epsilon) and rule.eps == 0


def _path(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _linear_call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call's gradient is its LRP-0 rule: linear in its input-dependent tensors (as DeepLIFT
    decides it), or a max pooling (winner takes all)."""
    return func in MAX_POOLS or is_linear_call(func, args, kwargs)


Sums = torch.Tensor | tuple[float, ...]  # per backward row


def _kept(sums: Sums) -> Sums:
    """Per-row sums as the trace keeps them: Python floats for a CPU tensor, the tensor itself on an
    accelerator (reading it would synchronise). Thousands of tiny tensors kept while a backward pass
    allocates and frees large buffers fragment the C heap: with one backward per target, SmolLM2's
    peak memory at 256 + 16 tokens grew by 0.6 GiB (2.19 GiB against 1.56 GiB)."""
    return tuple(sums.tolist()) if isinstance(sums, torch.Tensor) and sums.device.type == "cpu" else sums


def sums_tensor(sums: Sums) -> torch.Tensor:
    """A trace's per-row sums as a float64 CPU tensor."""
    return sums.double().cpu() if isinstance(sums, torch.Tensor) else torch.tensor(sums, dtype=torch.float64)


@dataclass
class LayerTrace:
    """One rule layer's backward call: relevance at its output and input summed per backward row,
    the part of the input's relevance put on inputs equal to 0 (not representable: lost), and
    the forward pass (0, 1, ... in the order they ran) whose rows these are, and, when one forward
    pass serves several targets that run backward one by one, the backward pass (0, 1, ...; None
    for a backward shared by the targets, such as the output head's). Sums of CPU tensors are kept
    as Python floats (see :func:`_kept`; :func:`sums_tensor` reads either)."""

    layer: str
    rule: str
    relevance_out: Sums
    relevance_in: Sums
    lost: Sums
    forward: int = 0
    backward: int | None = None

    def __post_init__(self) -> None:
        self.relevance_out, self.relevance_in, self.lost = (_kept(self.relevance_out), _kept(self.relevance_in),
                                                            _kept(self.lost))


IN_PLACE_ERROR = "modified by an inplace operation"


@dataclass
class _Step:
    mode: LRPMode
    layer: Layer
    rule: Rule
    mask: torch.Tensor | None = None
    forward: int = 0
    # for a rule layer fused with the identity-rule activation after it (see LRPMode._fused_activation):
    # the layer's own output (the activation's input) and its version counter when the activation ran
    pre_activation: torch.Tensor | None = None
    pre_version: int = 0

    def layer_output(self, value: torch.Tensor) -> torch.Tensor:
        """The layer's output at its input: ``value`` (the node's output), or for a fused activation the
        activation's input, refused as autograd refuses a saved tensor changed in place since."""
        if self.pre_activation is None:
            return value
        if self.pre_activation._version != self.pre_version:
            raise RuntimeError(f"{self.mode.method}: the output of layer {self.layer.name} was {IN_PLACE_ERROR} after the "
                               "activation that follows it read it")
        return self.pre_activation

    def relevance(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rule, ZBox):
            return self.rule.relevance(self.layer, x, r, self.mask)
        return self.rule.relevance(self.layer, x, r)

    def coefficients(self, x: torch.Tensor, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """c with R_in = x * c, for the rules that put relevance on inputs in that form (epsilon,
        gamma, alpha-beta: none on an input equal to 0); None for the others. ``z``: the layer's output."""
        found = getattr(self.rule, "coefficients", None)
        return None if found is None else found(self.layer, x, r, z)  # type: ignore[no-any-return]


T = TypeVar("T")


def run_with_copies_if_needed(run: Callable[[bool], T]) -> T:
    """``run(copy_outputs=False)``; if the model changed a rule's output in place (autograd's version
    check fails in the backward), ``run(copy_outputs=True)`` from the start."""
    try:
        return run(False)
    except RuntimeError as error:
        if IN_PLACE_ERROR not in str(error):
            raise
    return run(True)


def predict_in_mode(model: Any, encoded: Any, resolve: Callable[[Any], Any], method: str,
                    make_mode: Callable[[bool], LRPMode]) -> tuple[Any, Any, torch.Tensor, torch.Tensor, LRPMode]:
    """The adapter's prediction pass (``predict_with_input_gradient``: one forward + one backward)
    run inside ``make_mode(copy_outputs)``: the prediction, the target ``resolve`` picks (refused
    unless a logit, before the backward), its logit and the modified gradient at the input, and the
    mode with its trace. What the method would otherwise compute with a prediction pass and then
    a pass of its own."""

    def checked(prediction: Any) -> Any:
        target = resolve(prediction)
        check_logit_targets([target], method)
        return target

    def run(copy_outputs: bool) -> tuple[LRPMode, tuple[Any, Any, torch.Tensor, torch.Tensor]]:
        with make_mode(copy_outputs) as mode:
            found = model.predict_with_input_gradient(encoded, checked)
        return mode, found

    mode, (prediction, target, value, gradient) = run_with_copies_if_needed(run)
    return prediction, target, value, gradient, mode


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sum of a * b over every dimension but the first, as a batched dot product (no product
    tensor; about twice as fast as multiplying and summing on the CPU)."""
    if a.dim() < 2:
        return a * b
    rows = a.shape[0]
    return torch.matmul(a.reshape(rows, 1, -1), b.reshape(rows, -1, 1)).reshape(rows)


def _finite_row_dot(a: torch.Tensor, c: torch.Tensor, check_first: bool) -> torch.Tensor:
    """:func:`_row_dot` with infinite values of ``a`` (attention masks' -inf, where c is 0) counted
    as 0. ``check_first``: zero them only when the plain dot is not finite (a host check, free on
    the CPU); else always, in one more pass (no host synchronisation: on a GPU a synchronisation per
    traced call costs more than the pass)."""
    if check_first:
        found = _row_dot(a, c)
        if bool(torch.isfinite(found).all()):
            return found
    return _row_dot(torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0), c)


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """The sum over every dimension but the first (no copy of a non-contiguous tensor)."""
    return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t


@dataclass
class _LayerOutput:
    """A linear layer's output in this forward pass (held weakly) and its version counter then; the
    layer's input (its rule node keeps it anyway), Layer, rule and z^B's padding mask (input and
    Layer None: the call ran plainly, as LRP-0). A batch norm run plainly (LRP-0, merged or alone)
    keeps its input, the input's version counter then and its arguments (``batch_norm``, for an
    activation after it: see :meth:`LRPMode._after_plain_batch_norm`). Dropped when the forward
    pass ends."""

    output: weakref.ref[torch.Tensor]
    version: int
    input: torch.Tensor | None
    layer: Layer | None
    rule: Rule
    mask: torch.Tensor | None = None
    batch_norm: dict[str, Any] | None = None
    input_version: int = 0


def _batch_norm_scale(batch_norm: dict[str, Any]) -> torch.Tensor:
    """The per-channel factor s of a batch norm in eval mode (its arguments by name), y = s x + t."""
    scale = torch.rsqrt(batch_norm["running_var"] + batch_norm["eps"])
    return scale if batch_norm.get("weight") is None else scale * batch_norm["weight"]


def _weight_on_the_left(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``weight @ x`` (x (..., in, N)), a dense layer over x's second-to-last dimension, plus ``bias``
    per output row: the call :meth:`LRPMode._weight_product` recognises, as a :class:`Layer`."""
    out = weight @ x
    return out if bias is None else out + bias[:, None]


class _Relevance(torch.autograd.Function):
    """Forward: the layer's own output ``compute()`` (the model's call, run here without gradients;
    for a fused activation, the activation of the layer's output); backward: the rule's relevance,
    per unit of input, from the relevance ``value * c`` at the output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, step: _Step, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        value = compute()
        ctx.save_for_backward(x, value)
        ctx.step = step
        # a copy keeps the saved value as it is if a later in-place call (ReLU(inplace=True)) changes the
        # output; without it such a call makes the backward fail (autograd's version check)
        return value.clone() if step.mode.copy_outputs else value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, c: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, value = ctx.saved_tensors
        step: _Step = ctx.step
        r_out = value * c
        z = step.layer_output(value)
        with step.mode.paused():
            coefficients = step.coefficients(x, r_out, z)
            if coefficients is None:
                r_in = step.relevance(x, r_out)
        if coefficients is not None:  # R_in = x * c: nothing on inputs equal to 0 (c set to 0 there: |sign(x)|,
            # arithmetic: faster than a boolean mask on the CPU). A ReLU's output needs no mask: the ReLU's
            # backward multiplies what arrives by its output, 0 at the same places
            c_in = coefficients if step.layer.nonnegative_input else coefficients.mul_(x.sign().abs_())
        else:
            zero = x == 0
            c_in = torch.where(zero, 0.0, r_in / torch.where(zero, 1.0, x))
        if not step.mode.tracing:  # (under vmap nothing may be kept)
            if coefficients is None and step.mode.count_lost:
                step.mode.lost.append(_kept(_per_row(torch.where(zero, r_in, 0.0))))
            return c_in, None, None
        if coefficients is not None:
            found, lost = _row_dot(x, c_in), torch.zeros(x.shape[0] if x.dim() else 1, dtype=c_in.dtype, device=c_in.device)
        else:
            found, lost = _per_row(r_in), _per_row(torch.where(zero, r_in, 0.0))
        step.mode.trace.append(LayerTrace(step.layer.name, step.rule.name, _per_row(r_out), found, lost, step.forward,
                                          step.mode.backward_row))
        return c_in, None, None


class _Pass(torch.autograd.Function):
    """An elementwise activation y = f(x) (in place when it was) passing relevance through:
    c_in = c y / x. The ratio y / x is computed once, in the forward pass (0 where it is not finite:
    at x = 0, where the input's relevance x c_in is 0), so each backward row (one per target) is
    one product. ``below``: the input u of a batch norm x = s u + t run plainly (LRP-0: its
    gradient) just before, and its per-channel scale s, or None (then ``x`` is passed detached);
    given, the relevance goes straight to u, c_u = s c y / x: one product with the ratio scaled
    once, and the batch norm's own backward pass (a pass over the tensor) is not run (it runs if x
    has other uses). ``below`` and ``scale`` come together (two arguments: autograd follows only
    tensors passed directly)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: Callable[[], torch.Tensor], inplace: bool,
                below: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        if (below is None) != (scale is None):
            raise ValueError("_Pass: give both the batch norm's input and its scale, or neither")
        before = x.detach().clone() if inplace else x.detach()
        y = call()
        if inplace:
            ctx.mark_dirty(x)
        ratio = torch.div(y.detach(), before).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if scale is not None:
            ratio.mul_(scale.reshape((1, -1) + (1,) * (ratio.dim() - 2)))
        ctx.save_for_backward(ratio)
        ctx.below = below is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, c: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (ratio,) = ctx.saved_tensors
        return (None, None, None, c * ratio, None) if ctx.below else (c * ratio, None, None, None, None)


class LRPMode(ModuleHookedMode):
    """``with LRPMode(composite, ...) as mode:`` run forward + backward passes; the gradient that
    reaches the input x is c with the input's relevance R = x * c. ``bounds``: per-channel (low,
    high) of the input for z^B. ``trace``: every rule layer's backward in order; ``layers``: rule
    layer calls seen; ``rules``: layer type -> rules used; ``merged``: batch norms merged;
    ``forwards``: forward passes of the model begun. ``tracing``: whether the rules record the
    trace (False: nothing recorded but what ``count_lost`` asks for, and the backward can run
    vmapped over targets); ``transformer``: AttnLRP's rules too; ``method``: the name errors
    give. ``count_lost``: untraced, still sum per backward row the relevance the rules that can
    lose it (flat, w-square, z^B) put on inputs equal to 0, in ``lost`` (not under vmap: the
    backward rows must run as plain passes). ``copy_outputs``: the rules' outputs are copies of
    the values their backward keeps (safe when the model changes an output in place); False saves
    a copy per rule call, and a model that changes an output in place then fails in the backward with
    autograd's "modified by an inplace operation" error (see :func:`run_with_copies_if_needed`)."""

    def __init__(self, composite: Composite, *, eps: float = 0.0, gamma: float = 0.25,
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None, merge_batch_norm: bool = True,
                 stabiliser: float = STABILISER, transformer: bool = False, method: str = "lrp",
                 copy_outputs: bool = True, tracing: bool = True, count_lost: bool = False) -> None:
        super().__init__()
        self.copy_outputs, self.tracing, self.count_lost = copy_outputs, tracing, count_lost
        self.composite, self.eps, self.gamma, self.stabiliser = composite, eps, gamma, stabiliser
        self.bounds, self.merge_batch_norm = bounds, merge_batch_norm
        self.transformer, self.method = transformer, method
        self.forwards = -1
        self.backward_row: int | None = None  # set by next_backward_row
        self.trace: list[LayerTrace] = []
        self.lost: list[Sums] = []  # untraced with count_lost: per rule call, the relevance lost per backward row
        self.rules: dict[str, set[str]] = {}
        self.layers = 0
        self.merged = 0
        self._paused = False
        self._stack: list[nn.Module] = []
        # an activation module running now as one unit (see _begin_activation_module): its input and the input's version
        self._unit: tuple[nn.Module, torch.Tensor, int] | None = None
        self._names: dict[int, str] = {}
        self._calls = 0  # linear layers seen in this forward pass
        # layer outputs of this forward pass, for a batch norm or an activation right after the layer
        self._outputs: dict[int, _LayerOutput] = {}
        # (held weakly, and dropped when the forward pass ends: see _forget_forward)
        self._pads: dict[int, tuple[weakref.ref[torch.Tensor], Callable[[torch.Tensor], torch.Tensor], torch.Size]] = {}
        # outputs of ReLUs (and their zero padding) in this forward pass, with their version counters
        self._nonnegative: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._refusal: SalienceError | None = None  # the first error a rule raised in this block
        # where a call on the relevance path first ran without gradients in this forward pass (inside a
        # custom autograd Function's forward, or a no_grad block): see _check_custom_functions
        self._untracked: str | None = None

    # ------------------------------------------------------------ entering and leaving
    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        super().__exit__(exc_type, exc, traceback)
        refusal, self._refusal = self._refusal, None
        # a refusal raised inside a Tensor operator (x * y, x @ y) comes out as "unsupported operand type(s)",
        # or not at all when Python falls back to another operator (x *= y to x = x * y): it is raised here
        if refusal is not None and exc is not refusal and (exc is None or isinstance(exc, TypeError)
                                                           and not isinstance(exc, SalienceError)):
            raise refusal

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Calls made by the rules themselves (in backward) run unchanged."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def _push(self, module: nn.Module, _args: Any) -> None:
        if isinstance(module, torch.jit.ScriptModule):
            raise ParameterError(f"{self.method} cannot see the layers of the TorchScript module {type(module).__name__}; "
                                 "explain the plain (not scripted) nn.Module")
        if not self._stack:  # a new forward pass of the model
            self.forwards += 1
            self._names = {id(m): name for name, m in module.named_modules()}
            self._calls = 0
            self._unit = None
            self._forget_forward()
        self._stack.append(module)
        if self._unit is None and is_activation_unit(module):
            self._begin_activation_module(module, _args)

    def _pop(self, module: nn.Module, _args: Any, output: Any) -> Any:
        if self._stack:
            self._stack.pop()
            if not self._stack:  # the forward pass is over: nothing more can follow its layers
                self._forget_forward()
                self._check_custom_functions(output)
        if self._unit is not None and self._unit[0] is module:
            return self._end_activation_module(output)
        return None

    def _check_custom_functions(self, output: Any) -> None:
        """At the end of a forward pass in which a call on the relevance path ran without gradients:
        refuse a custom ``torch.autograd.Function`` in the output's graph (its backward, not a rule,
        would carry the relevance: a silently wrong map). Nothing is walked in other passes."""
        where, self._untracked = self._untracked, None
        if where is None:
            return
        found = custom_functions(output)
        if found:
            raise ParameterError(custom_function_refusal(self.method, found[0], where))

    def _begin_activation_module(self, module: nn.Module, args: Any) -> None:
        """An activation module (:func:`is_activation_unit`) called on a tensor on the relevance
        path runs as one elementwise unit: its calls run plainly without gradients (see
        ``__torch_function__``), and :meth:`_end_activation_module` gives its output the identity
        rule. Called with its input by keyword it is left to the rules call by call."""
        x = args[0] if isinstance(args, tuple) and args else None
        if _path(x) and torch.is_grad_enabled():
            self._unit = (module, x, x._version)

    def _end_activation_module(self, output: Any) -> Any:
        """The activation module's output with the identity rule (c_in = c y / x, as an elementwise
        activation), or None (unchanged) when its forward raised."""
        module, x, version = self._unit  # type: ignore[misc]
        self._unit = None
        if output is None:
            return None
        check_unit_output(self.method, module, x, version, output, "the identity rule", self._where_module(module))
        with torch._C.DisableTorchFunction():  # (the ratio's own calls need no rule; paused, each would still be dispatched)
            return _Pass.apply(x, lambda: output, False)

    def _forget_forward(self) -> None:
        """Drop the records of a forward pass's layer outputs, padding and ReLU outputs. Held until the
        backward pass, the inputs and merged weights they keep would stay allocated through it (it
        frees what it has used as it goes) and make it allocate fresh memory instead."""
        self._outputs.clear()
        self._pads.clear()
        self._nonnegative.clear()

    def location(self) -> str:
        """The dotted name of the innermost module running now ("" outside the model, "model" for its root)."""
        if not self._stack:
            return ""
        return self._names.get(id(self._stack[-1]), "?") or "model"

    def in_normalisation(self) -> bool:
        """Whether a normalisation module (class name ending with ``Norm``) is running."""
        return any(is_normalisation(module) for module in self._stack)

    def record(self, layer: str, rule: str, relevance_out: tuple[torch.Tensor, torch.Tensor],
               relevance_in: list[tuple[torch.Tensor, torch.Tensor]], forward: int) -> None:
        """Trace one rule call's backward: the relevance per backward row at its output and summed
        over its inputs, each given as (value, relevance per unit c) with R = value * c, summed as
        dot products (no R tensor: attention's (heads, L, L) ones are large) in the tensors' dtype;
        infinite values (attention masks' -inf, where c is 0) count as 0. Nothing when not ``tracing``."""
        if not self.tracing:
            return
        value = relevance_out[0]
        rows = value.shape[0] if value.dim() else 1
        found = sum((self.relevance_per_row(a, c, rows) for a, c in relevance_in),
                    torch.zeros(rows, dtype=torch.float64, device=value.device))
        self.record_sums(layer, rule, self.relevance_per_row(*relevance_out, rows), found, forward)

    def record_sums(self, layer: str, rule: str, relevance_out: torch.Tensor, relevance_in: torch.Tensor,
                    forward: int) -> None:
        """Trace one rule call's backward from its relevance per backward row (float64, (rows,)) at
        its output and summed over its inputs (see :meth:`record`). Nothing when not ``tracing``."""
        if not self.tracing:
            return
        self.trace.append(LayerTrace(layer, rule, relevance_out, relevance_in, torch.zeros_like(relevance_in), forward,
                                     self.backward_row))

    @staticmethod
    def relevance_per_row(a: torch.Tensor, c: torch.Tensor, rows: int) -> torch.Tensor:
        """The relevance ``a * c`` summed per backward row (dimension 0; float64, (rows,)), infinite
        values of ``a`` counting as 0; a tensor without that row dimension is shared equally by the rows."""
        if a.dtype != c.dtype:  # e.g. a softmax computed in float32 for a half-precision model
            common = torch.promote_types(a.dtype, c.dtype)
            a, c = a.to(common), c.to(common)
        if a.dim() and a.shape == c.shape and a.shape[0] == rows:
            return _finite_row_dot(a, c, check_first=a.device.type == "cpu").double()
        a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        return (a * c).double().sum().expand(rows) / rows  # broadcast over the rows: shared equally (bookkeeping only)

    def next_backward_row(self) -> None:
        """Mark the start of the next target's own backward pass (see
        :func:`salience.models.passes.one_target_per_backward`): the trace keys its calls by it."""
        self.backward_row = 0 if self.backward_row is None else self.backward_row + 1

    def per_row(self, rules: set[str]) -> torch.Tensor:
        """Relevance kept by the traced calls of ``rules`` (output minus input), per backward row, rows
        in the order of the forward passes (each forward's rows in its order), or of the backward
        passes when targets ran backward one by one (calls of a backward they shared left out)."""
        by_backward = any(t.backward is not None for t in self.trace)
        rows: dict[int, torch.Tensor] = {}
        for t in self.trace:
            key = t.backward if by_backward else t.forward
            if key is None:
                continue
            kept = sums_tensor(t.relevance_out) - sums_tensor(t.relevance_in)
            if t.rule in rules:
                rows[key] = rows.get(key, torch.zeros_like(kept)) + kept
            else:
                rows.setdefault(key, torch.zeros_like(kept))
        return torch.cat([rows[k] for k in sorted(rows)]) if rows else torch.zeros(0, dtype=torch.float64)

    # ------------------------------------------------------------ dispatch
    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self._paused or not torch.is_grad_enabled():
            if not self._paused and self._stack and self._unit is None and self._untracked is None \
                    and input_dependent((args, kwargs)):
                self._untracked = self._where()  # (a custom Function's forward runs its calls so: checked in _pop)
            return func(*args, **kwargs)
        try:  # (one level: an extra call per torch function costs 1 % of a small transformer's time)
            if self._unit is not None:  # inside an activation module: one unit (its rule: _end_activation_module)
                with torch.no_grad():
                    return func(*args, **kwargs)
            if func in LAYERS:
                return self._layer(func, LAYERS[func], args, kwargs)
            if func in WEIGHT_PRODUCTS:
                found = self._weight_product(func, args, kwargs)
                if found is not PASS:
                    return found
            if func is F.batch_norm:
                return self._batch_norm(func, args, kwargs)
            if func in AVG_POOLS:
                return self._pool(func, args, kwargs)
            if func in ACTIVATIONS:
                return self._activation(func, args, kwargs)
            if func in LINEAR and func is not F.pad:  # reshapes, indexing, constants added: their gradient (no check needed)
                return func(*args, **kwargs)
            if self.transformer:
                found = transformer_call(self, func, args, kwargs)
                if found is not PASS:
                    return found
            result = func(*args, **kwargs)
            if func is F.pad:
                self._record_pad(result, args, kwargs)
            elif any(t.requires_grad for t in tensors_in(result)) and not _linear_call(func, args, kwargs):
                refused = "other nonlinear functions (custom attention included)" if self.transformer else \
                    "softmax read-outs, products of two input-dependent tensors (attention, squeeze-excitation) and other " \
                    "nonlinear functions"
                handled = f"{HANDLED}, {TRANSFORMER_HANDLED}" if self.transformer else HANDLED
                hint = " (method='attnlrp' has a rule for it)" \
                    if not self.transformer and has_transformer_rule(func, self.in_normalisation()) else ""
                raise ParameterError(f"{self.method} has no rule for {function_name(func)} on the relevance path{self._where()}"
                                     f"{hint}; it handles {handled}: {refused} are refused")
            return result
        except SalienceError as error:  # kept: raised again on leaving if an operator swallows it (see __exit__)
            self._refusal = self._refusal or error
            raise

    def _where(self) -> str:
        if not self._stack:
            return ""
        module = self._stack[-1]
        return f" (in {self._names.get(id(module), '?') or 'the model'}, {type(module).__name__})"

    def _where_module(self, module: nn.Module) -> str:
        name = self._names.get(id(module))
        return f" ({name})" if name else ""

    # ------------------------------------------------------------ rules
    def _rule(self, kind: str, is_input: bool, x: torch.Tensor) -> tuple[str, Rule]:
        module = self._stack[-1] if self._stack else None
        dotted = self._names.get(id(module), "") if module is not None else ""
        classes = list(class_names(type(module))) if module is not None else []
        found = self.composite.lookup(dotted, classes, kind, is_input)
        shown = f"{dotted or 'the model'!r} ({classes[0] if classes else 'no module'}, {kind})" \
            if found is None or found[1] == "zbox" else ""  # (for the errors only)
        if found is None:
            others = covering(classes, kind, is_input)
            raise ParameterError(f"{self.method}: layer {shown} has no rule in composite {self.composite.name} "
                                 f"{self.composite.describe()}; composites that cover it: {', '.join(others) or 'none'} "
                                 f"(or add {dotted!r}, {classes[0] if classes else kind!r} or {kind!r} to yours)")
        _, name, options = found
        rule = self._build(name, options, x, shown)
        self.rules.setdefault(classes[0] if classes else kind, set()).add(rule.name)
        return dotted or kind, rule

    def _build(self, name: str, options: dict[str, Any], x: torch.Tensor, shown: str) -> Rule:
        if name == "epsilon":
            return Epsilon(float(options.get("eps", options.get("epsilon", self.eps))))
        if name == "gamma":
            return Gamma(float(options.get("gamma", self.gamma)), stab=self.stabiliser)
        if name != "zbox":
            rule: Rule = dataclasses.replace(RULES[name][0](**options), stab=self.stabiliser)
            return rule
        if self.bounds is None:
            raise ParameterError(f"lrp: the z^B rule of layer {shown} needs the input's bounds: give low= and high=")
        low, high = self.bounds
        if x.dim() >= 3 and x.shape[1] == low.numel():
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return ZBox(low.reshape(shape), high.reshape(shape), stab=self.stabiliser)
        if bool((low == low.flatten()[0]).all() and (high == high.flatten()[0]).all()):
            return ZBox(low.flatten()[:1], high.flatten()[:1], stab=self.stabiliser)
        raise ParameterError(f"lrp: the z^B rule of layer {shown} has per-channel bounds but its input has shape "
                             f"{tuple(x.shape)}; give scalar low= and high=")

    # ------------------------------------------------------------ handlers
    def _layer(self, func: Callable[..., Any], kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.get("input")
        if not _path(x):
            return func(*args, **kwargs)

        def layer(name: str) -> Layer:
            rest = dict(kwargs)
            weight = args[1] if len(args) > 1 else rest.pop("weight")
            bias = args[2] if len(args) > 2 else rest.pop("bias", None)
            rest.pop("input", None)
            return Layer(func, weight, bias, tuple(args[3:]), rest, name=name, kind=kind,
                         nonnegative_input=self._known_nonnegative(x))

        return self._rule_layer(x, kind, layer, partial(func, *args, **kwargs))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` as a linear layer of the running module, with its composite's
        rule (for rules that decompose a call into layers: torch's multi-head attention)."""
        return self._layer(F.linear, "linear", (x, weight, bias), {})  # type: ignore[no-any-return]

    def _rule_layer(self, x: torch.Tensor, kind: str, layer: Callable[[str], Layer], compute: Callable[[], torch.Tensor]) -> Any:
        """``compute()``, a linear layer's call on x (on the relevance path), run with its composite's
        rule; ``layer(name)``: the call as a :class:`Layer` (not built for LRP-0, which runs plainly)."""
        is_input = self._calls == 0
        self._calls += 1
        name, rule = self._rule(kind, is_input, x)
        self.layers += 1
        if gradient_form(rule):
            out = compute()
            self._record_output(out, None, None, rule)  # no Layer: the call ran plainly
            return out
        built = layer(name)
        mask = self._pad_mask(x, rule)
        out = _Relevance.apply(x, _Step(self, built, rule, mask, self.forwards), compute)
        self._record_output(out, x, built, rule, mask)
        return out

    def _weight_product(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``x @ W``, ``x.mm(W)`` or ``addmm(b, x, W)`` with W a 2-d ``nn.Parameter`` and only x on
        the relevance path: a dense layer written out (GPT-2's Conv1D), run as ``F.linear(x, W^T,
        b)`` would be, with the composite's rule for linear layers (its forward value the call's
        own); likewise ``W @ x`` and ``W.mm(x)`` (the weight on the left: ``F.linear(x^T, W)^T``).
        Any other call: :data:`PASS`."""
        if "out" in kwargs:
            return PASS
        if func in ADDMMS:
            bound = named_arguments(("input", "mat1", "mat2"), args, kwargs, {"beta": 1, "alpha": 1})
            bias, x, weight = bound.get("input"), bound.get("mat1"), bound.get("mat2")
            if bound["beta"] != 1 or bound["alpha"] != 1 or (_path(bias) and not isinstance(bias, nn.Parameter)):
                return PASS
            left = False
        elif len(args) == 2 and not kwargs:
            (x, weight), bias, left = args, None, False
            if isinstance(x, nn.Parameter) and not isinstance(weight, nn.Parameter):  # W @ x
                (weight, x), left = args, True
        else:
            return PASS
        if not (_path(x) and isinstance(weight, nn.Parameter) and weight.dim() == 2) or (left and x.dim() < 2):
            return PASS

        call, weights, biases = (_weight_on_the_left, weight, None) if left else (F.linear, weight.mT, bias)
        return self._rule_layer(x, "linear", lambda name: Layer(call, weights, biases, name=name, kind="linear",
                                                                nonnegative_input=self._known_nonnegative(x)),
                                partial(func, *args, **kwargs))

    def _record_output(self, out: torch.Tensor, x: torch.Tensor | None, layer: Layer | None, rule: Rule,
                       mask: torch.Tensor | None = None, batch_norm: dict[str, Any] | None = None) -> None:
        self._outputs[id(out)] = _LayerOutput(weakref.ref(out), out._version, x, layer, rule, mask, batch_norm,
                                              x._version if x is not None else 0)

    def _output_of_layer(self, z: torch.Tensor) -> _LayerOutput | None:
        """The record of the layer whose output z is, unchanged since (not changed in place), else None."""
        record = self._outputs.get(id(z))
        return record if record is not None and record.output() is z and z._version == record.version else None

    def _batch_norm(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = named_arguments(_BATCH_NORM, args, kwargs, _BATCH_NORM_DEFAULTS)
        z = bound.get("input")
        if not _path(z):
            return func(*args, **kwargs)
        if bound.get("training") or bound.get("running_mean") is None:
            raise ParameterError(f"{self.method} needs batch norm in eval mode with running statistics{self._where()}; call model.eval()")
        compute = partial(func, *args, **kwargs)
        record = self._output_of_layer(z)
        merging = self.merge_batch_norm and record is not None and record.batch_norm is None  # (not after a batch norm)
        if merging:
            assert record is not None
            x, layer, rule = record.input, record.layer, record.rule
            self.merged += 1
        else:
            name, rule = self._rule("batch_norm", False, z)
            self.layers += 1
        if gradient_form(rule):  # LRP-0 of the batch norm (merged or alone): the plain call's gradient
            out = compute()
            self._record_output(out, z, None, rule, batch_norm=bound)  # (for an activation after it)
            return out
        scale = _batch_norm_scale(bound)
        shift = -bound["running_mean"] * scale + (bound["bias"] if bound.get("bias") is not None else 0.0)
        if merging:
            assert layer is not None and x is not None and record is not None  # a layer that ran its rule
            merged = layer.merged_with_batch_norm(scale, shift)
            out = _Relevance.apply(x, _Step(self, merged, rule, record.mask, self.forwards), compute)
            self._record_output(out, x, merged, rule, record.mask)
            return out
        return _Relevance.apply(z, _Step(self, Layer.scale_shift(scale, shift, name), rule, forward=self.forwards), compute)

    def _pool(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.get("input")
        if not _path(x):
            return func(*args, **kwargs)
        name, rule = self._rule("avg_pool", False, x)
        self.layers += 1
        if gradient_form(rule):
            return func(*args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "input"}
        return _Relevance.apply(x, _Step(self, Layer(func, None, None, tuple(args[1:]), rest, name=name, kind="avg_pool"),
                                        rule, forward=self.forwards), partial(func, *args, **kwargs))

    def _activation(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        if not _path(x):
            return func(*args, **kwargs)
        reader = RELU_FAMILY.get(func)
        if reader is not None:
            unit, inplace = reader(args, kwargs)
            relu = unit.low == 0.0
            plain = relu and unit.high is None  # ReLU: y / x is its derivative, the identity rule its gradient
            zero_at_zero = unit.low <= 0.0 and (unit.high is None or unit.high >= 0.0)
        else:
            inplace, relu, plain = is_inplace(func, args, kwargs), False, False
            zero_at_zero = func in ZERO_AT_ZERO
        call = partial(func, *args, **kwargs)
        out = self._fused_activation(x, call) if zero_at_zero and not inplace else None
        if out is None and not plain and not inplace:
            out = self._after_plain_batch_norm(x, call)
        if out is None:
            out = call() if plain else _Pass.apply(x, call, inplace)
        if relu:
            self._nonnegative[id(out)] = (weakref.ref(out), out._version)
        return out

    def _fused_activation(self, z: torch.Tensor, call: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``call()``, an activation y = f(z) with f(0) = 0, as one rule node with the layer whose output
        z is, when that layer ran as a rule (not plainly), else None. The identity rule gives the
        layer's output the activation's relevance, R_z = R_y = y * c (f(0) = 0: the same as
        z * (c y / z), 0 at z = 0), so the layer's rule starts from y * c: no ratio y / z is computed
        or kept, and nothing runs for the activation in the backward pass. The layer's own node is
        then left out of the backward pass unless z is used elsewhere too (each node then applies
        the rule to its share of the relevance; rules are linear in it)."""
        record = self._output_of_layer(z)
        if record is None or record.layer is None or record.input is None:
            return None
        pre = z.detach().clone() if self.copy_outputs else z.detach()
        step = _Step(self, record.layer, record.rule, record.mask, self.forwards,
                     pre_activation=pre, pre_version=pre._version)
        return _Relevance.apply(record.input, step, call)  # type: ignore[no-any-return]

    def _after_plain_batch_norm(self, x: torch.Tensor, call: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``call()``, an activation of a batch norm's output x, as one :class:`_Pass` node with that
        batch norm when it ran plainly (LRP-0), else None: the identity rule's ratio is scaled by
        the batch norm's factor once in the forward pass, and the relevance reaches the batch norm's
        input in one product (ReLU keeps its own backward: its ratio is its derivative)."""
        record = self._output_of_layer(x)
        if record is None or record.batch_norm is None or record.input is None or record.input._version != record.input_version:
            return None  # (an input changed in place since the batch norm read it: the relevance must not reach the change)
        return _Pass.apply(x.detach(), call, False, record.input, _batch_norm_scale(record.batch_norm))  # type: ignore[no-any-return]

    def _known_nonnegative(self, x: torch.Tensor) -> bool:
        """Whether x is a ReLU's output (or its zero padding) in this forward pass, unchanged since
        (an in-place call would have raised its version counter)."""
        known = self._nonnegative.get(id(x))
        return known is not None and known[0]() is x and x._version == known[1]

    # ------------------------------------------------------------ padding seen by z^B
    def _record_pad(self, result: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = named_arguments(("input", "pad", "mode", "value"), args, kwargs, {"mode": "constant", "value": None})
        source = bound.get("input")
        if isinstance(result, torch.Tensor) and isinstance(source, torch.Tensor) and bound.get("mode", "constant") == "constant":
            self._pads[id(result)] = (weakref.ref(result), partial(F.pad, pad=bound["pad"], mode="constant", value=0.0),
                                      source.shape)
            if self._known_nonnegative(source) and not bound.get("value"):  # zeros added to a ReLU's output
                self._nonnegative[id(result)] = (weakref.ref(result), result._version)

    def _pad_mask(self, x: torch.Tensor, rule: Rule) -> torch.Tensor | None:
        """For z^B: 1 on the input's own values, 0 on zero padding added just before this layer (z^B
        bounds hold only where there is an input). None for other rules."""
        record = self._pads.get(id(x))
        if not isinstance(rule, ZBox) or record is None or record[0]() is not x:
            return None
        _, pad, shape = record
        with torch.no_grad():
            return pad(torch.ones(shape, dtype=x.dtype, device=x.device))
