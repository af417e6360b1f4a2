"""DeepLIFT's Rescale rule as a :class:`torch.overrides.TorchFunctionMode` (see
:mod:`salience.methods.rules` for the mechanism): while :class:`RescaleMode` is active every torch
function called from Python passes through it, so nothing is attached to the model.

Two passes run inside one mode:

1. the *reference pass* (no gradients): each nonlinear unit's input and output on the reference rows
   are recorded, in call order;
2. the *input pass* (forward + backward): the k-th nonlinear call of every forward meets the k-th
   recorded reference call; its backward sends ``g * (y - y_ref) / (x - x_ref)`` (Rescale) to its
   input instead of ``g * f'(x)``; where ``|x - x_ref| < eps`` the ordinary derivative is used (as
   Captum). Max pooling uses Captum's rule (the output change split between the input's and the
   reference's maxima). Every other function on the gradient path must be linear (affine) in the
   input: a whitelist (:func:`salience.methods.rules.is_linear_call`: convolutions, linear layers,
   sums, reshapes, pooling by averages, batch norm and dropout in eval mode, products with at most
   one input-dependent factor, ...). Anything else
   (softmax, layer norm, a product of two input-dependent tensors, an unknown function) is refused
   with a one-line error naming it: DeepLIFT would be silently wrong there. An elementwise module
   (:func:`salience.methods.rules.is_activation_unit`: transformers' activations written out in
   torch functions, or a class declaring ``salience_elementwise = True``) is one unit, its own
   calls run without gradients; a custom ``torch.autograd.Function`` elsewhere on the path is
   refused (:func:`salience.methods.rules.custom_functions`).

Rows: each backward row of the input pass has one reference row (``reference_of_row``); forwards
are matched to rows in order (each forward takes the next ``B`` rows, B its batch size), so any
chunking of the rows works. Not seen: code that does not go through Python torch functions
(TorchScript, compiled graphs); such a model is refused only if a mismatch shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from salience.errors import ParameterError
from salience.methods.rules import (
    ELEMENTWISE,
    PRODUCTS,
    QUOTIENTS,
    ModuleHookedMode,
    bound_arguments,
    check_unit_output,
    custom_function_refusal,
    custom_functions,
    function_name,
    input_dependent,
    is_activation_unit,
    is_inplace,
    is_linear_call,
    on_path,
)

# ------------------------------------------------------------------ what the mode knows
_MAX_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
SAME_UNITS = "the model's forward pass must run the same nonlinear units for the input and the reference"
HANDLED_UNITS = "ReLU, ReLU6, Hardtanh, LeakyReLU, ELU, SELU, CELU, GELU, SiLU, Mish, Sigmoid, Tanh, Softplus, " \
                "Hardswish, Hardsigmoid, LogSigmoid, Softsign, Tanhshrink, max pooling"



# ------------------------------------------------------------------ the rules' backward passes
Rebuild = Callable[[torch.Tensor], tuple[tuple[Any, ...], dict[str, Any]]]


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Rebuild]:
    """The unit's input tensor and a function putting another tensor in its place."""
    if args:
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    key = "input" if "input" in kwargs else "self"
    return kwargs[key], lambda t: (args, {**kwargs, key: t})


class _Rescale(torch.autograd.Function):
    """y = f(x) (the original call, in place when it was); backward: g m with the multiplier
    m = (y - y_ref) / (x - x_ref), or the ordinary derivative f'(x) where |x - x_ref| < eps. m is
    computed once, in the forward pass (while x and y are fresh in cache), so the backward is one
    product and keeps one tensor instead of four."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor], x_ref: torch.Tensor,
                y_ref: torch.Tensor, eps: float, inplace: bool) -> torch.Tensor:
        before = x.detach().clone() if inplace else x.detach()
        y = call(x)
        if inplace:
            ctx.mark_dirty(x)
        delta = before - x_ref
        multiplier = torch.sub(y.detach(), y_ref).div_(delta)
        small = delta.abs_() < eps
        if bool(small.any()):  # (elementwise units: the derivative is the gradient of the sum)
            with torch.enable_grad():
                leaf = before.detach().requires_grad_(True)
                (local,) = torch.autograd.grad(call(leaf.clone() if inplace else leaf).sum(), leaf)
            multiplier = torch.where(small, local, multiplier)
        ctx.save_for_backward(multiplier)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (multiplier,) = ctx.saved_tensors
        return grad * multiplier, None, None, None, None, None


class _MaxPool(torch.autograd.Function):
    """Max pooling with Captum's DeepLIFT rule: with M = max(y, y_ref), g (M - y_ref) goes to the
    input's maxima and g (y - M) to the reference's maxima (positions summed), divided by
    x - x_ref; the ordinary gradient where |x - x_ref| < eps. Windows that overlap add their shares
    (Captum's unpooling keeps one of them)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                dims: int, x_ref: torch.Tensor, y_ref: torch.Tensor, i_ref: torch.Tensor, eps: float) -> torch.Tensor:
        y, indices = pool(x)
        ctx.save_for_backward(x.detach(), y, indices, x_ref, y_ref, i_ref)
        ctx.dims, ctx.eps = dims, eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, y, indices, x_ref, y_ref, i_ref = ctx.saved_tensors
        lead = x.shape[:-ctx.dims]

        def unpool(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
            flat = torch.zeros((*lead, x.shape[-ctx.dims:].numel()), dtype=grad.dtype, device=grad.device)
            return flat.scatter_add_(-1, where.expand_as(values).reshape(*lead, -1), values.reshape(*lead, -1)).reshape(x.shape)

        top = torch.maximum(y, y_ref)
        shares = unpool(grad * (top - y_ref), indices) + unpool(grad * (y - top), i_ref)
        delta = x - x_ref
        small = delta.abs() < ctx.eps
        result = torch.where(small, unpool(grad, indices), shares / torch.where(small, torch.ones_like(delta), delta))
        return result, None, None, None, None, None, None


# ------------------------------------------------------------------ the mode
@dataclass
class _Recorded:
    """One nonlinear call of the reference pass: the function, its input and output (rows first)
    and, for max pooling, the argmax indices."""

    func: Callable[..., Any]
    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor | None = None


class RescaleMode(ModuleHookedMode):
    """``with RescaleMode(eps) as mode:`` run the reference rows' forward pass (recorded), then
    :meth:`begin_inputs` with each backward row's reference index, then the input rows' forward +
    backward: the backward follows DeepLIFT's Rescale rule. ``units``: nonlinear calls per forward."""

    def __init__(self, eps: float = 1e-10, method: str = "deeplift") -> None:
        super().__init__()
        self.eps, self.method = eps, method
        self.recorded: list[_Recorded] = []
        self.n_references = 0
        self.reference_of_row: torch.Tensor | None = None
        self.calls = 0  # nonlinear calls of the input pass
        self.offset = 0  # rows of the input pass whose forward has finished
        self.batch = 0
        self.rows: torch.Tensor | None = None
        self.refusal = ""  # the first function on the gradient path without a rule
        self._depth = 0  # modules running now
        self._paused = False  # a unit's own forward run again for its derivative (see _end_unit)
        # an elementwise module running now as one unit (rules.is_activation_unit): it, its input, the input's version
        self._module_unit: tuple[nn.Module, torch.Tensor, int] | None = None
        # a call on the gradient path ran without gradients in this input forward (inside a custom
        # autograd Function's forward, or a no_grad block): the graph is checked when the forward ends
        self._untracked = False

    @property
    def units(self) -> int:
        return len(self.recorded)

    def begin_inputs(self, reference_of_row: torch.Tensor, n_references: int) -> None:
        """Switch from recording the reference pass to applying the rule; row i of the input pass
        (in the order of its forward calls) is compared with reference row ``reference_of_row[i]``."""
        self.reference_of_row, self.n_references = reference_of_row.long().cpu(), n_references
        for i, call in enumerate(self.recorded):
            if call.x.shape[0] != n_references:
                raise ParameterError(f"{self.method} needs each nonlinear unit to keep the batch as its first dimension; "
                                     f"unit {i + 1} ({function_name(call.func)}) works on shape {tuple(call.x.shape)} "
                                     f"for {n_references} reference rows")

    def finish(self) -> None:
        """Check that every input row met its reference in every nonlinear unit."""
        assert self.reference_of_row is not None
        if self.refusal:
            raise ParameterError(self.refusal)
        if self.units and (self.offset != len(self.reference_of_row) or self.calls % self.units):
            raise ParameterError(f"{self.method}: the input pass made {self.calls} nonlinear calls over {self.offset} rows, "
                                 f"not {self.units} per forward over {len(self.reference_of_row)} rows; " + SAME_UNITS)

    # -------------------------------------------------------------- modules
    def _push(self, module: nn.Module, args: Any) -> None:
        if self._paused:
            return
        self._depth += 1
        x = args[0] if isinstance(args, tuple) and args else None
        if self._module_unit is None and isinstance(x, torch.Tensor) and is_activation_unit(module):
            self._module_unit = (module, x, x._version)

    def _pop(self, module: nn.Module, _args: Any, output: Any) -> Any:
        if self._paused:
            return None
        self._depth -= 1
        if self._depth == 0 and self._untracked:
            self._untracked = False
            found = custom_functions(output)
            if found:
                self.refusal = self.refusal or custom_function_refusal(self.method, found[0])
        if self._module_unit is not None and self._module_unit[0] is module:
            return self._end_unit(output)
        return None

    def _end_unit(self, output: Any) -> Any:
        """An elementwise module's output as one Rescale unit (its calls ran as plain calls without
        gradients): recorded on the reference pass, given the Rescale rule on the input pass (the
        derivative, where |x - x_ref| < eps, from the module's own forward and backward). None
        (unchanged) when its forward raised or the unit is off the gradient path."""
        module, x, version = self._module_unit  # type: ignore[misc]
        self._module_unit = None
        if output is None:
            return None
        check_unit_output(self.method, module, x, version, output, "the Rescale rule")
        if self.reference_of_row is None:
            self.recorded.append(_Recorded(type(module), x.detach().clone(), output.detach().clone()))
            return None
        x_ref, y_ref, _ = self._reference(type(module), x, with_indices=False)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return None

        def call(t: torch.Tensor) -> torch.Tensor:
            if t is x:
                return output  # type: ignore[no-any-return]
            before, self._paused = self._paused, True
            try:
                return module.forward(t)  # type: ignore[no-any-return]
            finally:
                self._paused = before

        with torch._C.DisableTorchFunction():  # (the rule's own calls: no unit, no refusal)
            return _Rescale.apply(x, call, x_ref, y_ref, self.eps, False)

    # -------------------------------------------------------------- dispatch
    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self._module_unit is not None:  # inside an elementwise module: one unit (see _end_unit)
            with torch.no_grad():
                return func(*args, **kwargs)
        if not torch.is_grad_enabled() and self.reference_of_row is not None and self._depth and not self._untracked \
                and input_dependent((args, kwargs)):
            self._untracked = True  # (a custom Function's forward runs its calls so: checked in _pop)
        if func in ELEMENTWISE or func in _MAX_POOLS:
            return self._unit(func, args, kwargs)
        result = func(*args, **kwargs)
        if self.reference_of_row is not None and torch.is_grad_enabled() and on_path(result) \
                and not is_linear_call(func, args, kwargs):
            # raised after the pass (:meth:`finish`): a TypeError inside a Tensor operator would become NotImplemented
            why = "a product of two input-dependent tensors" if func in PRODUCTS or func in QUOTIENTS else \
                "nonlinear or not known to be linear"
            self.refusal = self.refusal or (
                f"{self.method} has no rule for {function_name(func)} on the gradient path ({why}); it handles "
                f"{HANDLED_UNITS} between linear layers (transformers' softmax and layer norm are refused)")
        return result

    # -------------------------------------------------------------- nonlinear units
    def _unit(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, rebuild = _split(args, kwargs)
        dims = _MAX_POOLS.get(func)
        if dims is not None and bound_arguments(func, args, kwargs).get("return_indices", False):
            raise ParameterError(f"{self.method} cannot follow a max pooling that returns its indices")
        if dims is not None:
            def pool(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                a, k = rebuild(t)
                return func(*a, **{**k, "return_indices": True})  # type: ignore[no-any-return]

            if self.reference_of_row is None:  # reference pass: record
                y, indices = pool(x)
                self.recorded.append(_Recorded(func, x.detach().clone(), y.detach().clone(), indices))
                return y
            x_ref, y_ref, i_ref = self._reference(func, x, with_indices=True)
            if not (torch.is_grad_enabled() and x.requires_grad):
                return pool(x)[0]
            return _MaxPool.apply(x, pool, dims, x_ref, y_ref, i_ref, self.eps)

        def call(t: torch.Tensor) -> torch.Tensor:
            a, k = rebuild(t)
            return func(*a, **k)  # type: ignore[no-any-return]

        inplace = is_inplace(func, args, kwargs)
        if self.reference_of_row is None:
            before = x.detach().clone()
            y = call(x)
            if y.shape != before.shape:
                raise ParameterError(f"{self.method}: {function_name(func)} changed the shape {tuple(before.shape)} -> "
                                     f"{tuple(y.shape)}; the Rescale rule needs an elementwise unit")
            self.recorded.append(_Recorded(func, before, y.detach().clone()))
            return y
        x_ref, y_ref, _ = self._reference(func, x, with_indices=False)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return call(x)
        return _Rescale.apply(x, call, x_ref, y_ref, self.eps, inplace)

    def _reference(self, func: Callable[..., Any], x: torch.Tensor, *, with_indices: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The recorded reference input, output (and indices) of this call, one row per row of x."""
        assert self.reference_of_row is not None
        if not self.units:
            raise ParameterError(f"{self.method}: {function_name(func)} ran on the input but not on the reference")
        k = self.calls % self.units
        recorded = self.recorded[k]
        if recorded.func is not func or tuple(recorded.x.shape[1:]) != tuple(x.shape[1:]):
            raise ParameterError(f"{self.method}: nonlinear call {k + 1} differs between the reference pass "
                                 f"({function_name(recorded.func)}, {tuple(recorded.x.shape[1:])}) and the input pass "
                                 f"({function_name(func)}, {tuple(x.shape[1:])}); {SAME_UNITS}")
        if k == 0:
            self.batch = x.shape[0]
            self.rows = self.reference_of_row[self.offset:self.offset + self.batch]
            if len(self.rows) != self.batch:
                raise ParameterError(f"{self.method}: the input pass ran more nonlinear calls than the reference pass; {SAME_UNITS}")
        if x.shape[0] != self.batch:
            raise ParameterError(f"{self.method}: nonlinear call {k + 1} ({function_name(func)}) has {x.shape[0]} rows in a "
                                 f"forward of {self.batch}; each unit must keep the batch as its first dimension")
        self.calls += 1
        if k == self.units - 1:
            self.offset += self.batch
        assert self.rows is not None
        rows = self.rows.to(recorded.x.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.expand(x.shape[0], *t.shape[1:]) if self.n_references == 1 else t[rows]

        indices = pick(recorded.indices) if with_indices and recorded.indices is not None else None
        return pick(recorded.x).to(x.dtype), pick(recorded.y).to(x.dtype), indices
