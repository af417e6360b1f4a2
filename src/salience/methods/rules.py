"""Backward rules: run a model's forward pass unchanged while making the backward pass of chosen
operations follow a rule instead of their derivative (guided backpropagation, deconvnet; later the
propagation rules of LRP).

Mechanism: a :class:`torch.overrides.TorchFunctionMode` (:class:`RuleMode`) is active only inside a
``with`` block. While it is, every call of a handled torch function made from Python is routed to
its handler, which computes the same output (it calls the original function) through a small
:class:`torch.autograd.Function` whose backward applies the rule. Intercepting functions rather
than modules means that nothing is attached to the model and nothing on it changes:

- ``nn.ReLU`` and ``nn.ReLU6`` modules, ``F.relu`` / ``F.relu6`` / ``F.hardtanh(min_val=0)``
  called inside ``forward()``, ``torch.relu`` and ``Tensor.relu`` are all seen (``nn.ReLU6``
  calls ``F.hardtanh(x, 0, 6)``);
- in-place forms (``nn.ReLU(inplace=True)``, ``Tensor.relu_``, ``F.hardtanh_``) stay in place
  (``ctx.mark_dirty``), so models that rely on the aliasing behave as without the rule;
- a module called twice in one forward makes two calls, each with its own saved output;
- leaving the block pops the mode on every path, exceptions included: no hook, flag or mode is
  left behind (there is nothing else to restore).

Not seen: code that does not go through these Python functions (TorchScript modules, custom C++
or CUDA kernels, ``torch.compile``-d graphs) and ReLUs written another way (``x.clamp(min=0)``,
``torch.maximum(x, 0)``, ``x * (x > 0)``). Such a unit keeps its ordinary derivative.
:attr:`RuleMode.applied` counts the handled calls that were on a gradient path, so a method can
refuse a model where its rule changed nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

# (func, args, kwargs) -> the result, or PASS to run func unchanged
Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
PASS = object()


class RuleMode(TorchFunctionMode):
    """Route calls of the torch functions in ``handlers`` to their handler while the mode is active
    (``with RuleMode(handlers) as mode: ...``). ``applied``: how many calls a handler took (a call
    it passed back with :data:`PASS`, e.g. one off any gradient path, is not counted)."""

    def __init__(self, handlers: Mapping[Callable[..., Any], Handler]) -> None:
        super().__init__()
        self.handlers = dict(handlers)
        self.applied = 0

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is not None:
            result = handler(func, args, kwargs)
            if result is not PASS:
                self.applied += 1
                return result
        return func(*args, **kwargs)


# ------------------------------------------------------------------ the ReLU family
@dataclass(frozen=True)
class Clamp:
    """A ReLU-family unit y = min(max(x, low), high): ReLU (0, None), ReLU6 (0, 6), Hardtanh(0, m).
    Its derivative is 1 where low < x < high (equivalently low < y < high) and 0 elsewhere."""

    low: float = 0.0
    high: float | None = None

    def passed(self, grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``grad`` where the unit passes its input through (low < y < high, read from the output y
        alone), 0 elsewhere: autograd's own fused kernels for ReLU and Hardtanh (one pass over the
        tensor, not a mask built in four)."""
        if self.high is None:
            return torch.ops.aten.threshold_backward(grad, output, self.low)
        return torch.ops.aten.hardtanh_backward(grad, output, self.low, self.high)


# (incoming gradient dL/dy, the unit's output y, the unit) -> the gradient sent to its input
ClampRule = Callable[[torch.Tensor, torch.Tensor, Clamp], torch.Tensor]


def gradient_rule(grad: torch.Tensor, output: torch.Tensor, unit: Clamp) -> torch.Tensor:
    """The ordinary derivative: grad where the unit is active, else 0 (what autograd computes)."""
    return unit.passed(grad, output)


def guided_rule(grad: torch.Tensor, output: torch.Tensor, unit: Clamp) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015): only positive incoming gradient, and only
    where the unit was active in the forward pass (x > 0; for ReLU6 also x < 6)."""
    return unit.passed(grad.clamp(min=0), output)


def deconvnet_rule(grad: torch.Tensor, output: torch.Tensor, unit: Clamp) -> torch.Tensor:
    """Deconvnet (Zeiler & Fergus 2014): only positive incoming gradient, whatever the forward
    input was (the unit's upper bound is ignored too)."""
    return grad.clamp(min=0)


class _ClampWithRule(torch.autograd.Function):
    """Runs the original call (same kernel, same output, in place when it was) and saves its
    output; the backward applies the rule. First order only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: Callable[[], torch.Tensor], unit: Clamp, rule: ClampRule,
                inplace: bool) -> torch.Tensor:
        output = call()
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(output)
        ctx.unit, ctx.rule = unit, rule
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (output,) = ctx.saved_tensors
        return ctx.rule(grad, output, ctx.unit), None, None, None, None


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Clamp, bool]:  # F.relu(input, inplace=False)
    return Clamp(), bool(_argument(args, kwargs, 1, "inplace", False))


def _relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Clamp, bool]:  # F.relu6(input, inplace=False)
    return Clamp(0.0, 6.0), bool(_argument(args, kwargs, 1, "inplace", False))


def _hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Clamp, bool]:  # F.hardtanh(input, min, max, inplace)
    low = float(_argument(args, kwargs, 1, "min_val", -1.0))
    high = float(_argument(args, kwargs, 2, "max_val", 1.0))
    return Clamp(low, high), bool(_argument(args, kwargs, 3, "inplace", False))


def _fixed(unit: Clamp, inplace: bool) -> Callable[[tuple[Any, ...], dict[str, Any]], tuple[Clamp, bool]]:
    return lambda _args, _kwargs: (unit, inplace)


# each ReLU-family torch function -> how to read its unit and whether it works in place
RELU_FAMILY: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], tuple[Clamp, bool]]] = {
    F.relu: _relu,
    torch.relu: _fixed(Clamp(), False),
    torch.Tensor.relu: _fixed(Clamp(), False),
    torch.relu_: _fixed(Clamp(), True),  # also F.relu_
    torch.Tensor.relu_: _fixed(Clamp(), True),
    F.relu6: _relu6,
    torch._C._nn.relu6: _fixed(Clamp(0.0, 6.0), False),
    torch._C._nn.relu6_: _fixed(Clamp(0.0, 6.0), True),
    F.hardtanh: _hardtanh,  # nn.ReLU6 and nn.Hardtanh modules
    torch._C._nn.hardtanh: _hardtanh,
    torch._C._nn.hardtanh_: lambda args, kwargs: (_hardtanh(args, kwargs)[0], True),  # also F.hardtanh_
}


def _clamp_handler(rule: ClampRule, read: Callable[[tuple[Any, ...], dict[str, Any]], tuple[Clamp, bool]]) -> Handler:
    def handle(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        unit, inplace = read(args, kwargs)
        if unit.low != 0.0 or not isinstance(x, torch.Tensor) or not (torch.is_grad_enabled() and x.requires_grad):
            return PASS  # a Hardtanh that is not a clipped ReLU, or a call off every gradient path
        return _ClampWithRule.apply(x, partial(func, *args, **kwargs), unit, rule, inplace)

    return handle


def relu_handlers(rule: ClampRule) -> dict[Callable[..., Any], Handler]:
    """Handlers applying ``rule`` to every ReLU-family function (ReLU, ReLU6, Hardtanh with
    ``min_val=0``; functional, tensor-method, module and in-place forms). Other Hardtanh calls keep
    their derivative and are not counted."""
    return {func: _clamp_handler(rule, read) for func, read in RELU_FAMILY.items()}


def relu_rules(rule: ClampRule) -> RuleMode:
    """``with relu_rules(guided_rule) as mode:`` -- every ReLU-family unit of the forward passes run
    inside back-propagates by ``rule``; ``mode.applied`` counts those on a gradient path."""
    return RuleMode(relu_handlers(rule))
