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

The second half holds the function tables shared by the propagation methods (DeepLIFT's
:mod:`salience.methods.deeplift_rules`, LRP's :mod:`salience.methods.lrp_mode`, AttnLRP's
:mod:`salience.methods.attnlrp_rules`): which torch functions are elementwise units, which are
linear in their input-dependent tensors (:func:`is_linear_call`), readable names of torch functions
for errors, and small helpers on a call's arguments.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from salience.errors import ParameterError

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


# ------------------------------------------------------------------ which torch functions are which
# (shared by the propagation methods: DeepLIFT's RescaleMode, LRP's LRPMode, AttnLRP's rules)
# elementwise units y = f(x) (DeepLIFT's Rescale rule, LRP's identity rule)
_ELEMENTWISE_NAMES = ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "elu", "elu_", "selu", "celu", "leaky_relu",
                      "leaky_relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus", "gelu", "silu", "mish",
                      "hardswish", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink")
# linear (affine) in every tensor argument
_LINEAR_NAMES = (
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_", "subtract",
    "neg", "__neg__", "negative", "__pos__", "positive", "sum", "mean", "cumsum", "cat", "concat", "concatenate",
    "stack", "hstack", "vstack", "reshape", "view", "view_as", "reshape_as", "flatten", "unflatten", "permute",
    "transpose", "transpose_", "swapaxes", "movedim", "t", "contiguous", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_",
    "expand", "expand_as", "broadcast_to", "repeat", "tile", "__getitem__", "gather", "index_select", "narrow", "select",
    "split", "chunk", "unbind", "tensor_split", "roll", "flip", "clone", "copy_", "to", "type", "type_as", "float", "double", "half",
    "requires_grad_", "detach", "pad", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "unfold", "fold", "where", "masked_fill", "diagonal",
)
# linear when at most one tensor argument depends on the input (weights are frozen while scoring)
_PRODUCT_NAMES = ("mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply", "matmul", "__matmul__", "__rmatmul__",
                  "mm", "bmm", "mv", "dot", "outer", "einsum", "addmm", "baddbmm", "addmv", "linear", "bilinear",
                  "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
# linear when the divisor does not depend on the input
_QUOTIENT_NAMES = ("div", "__truediv__", "__itruediv__", "div_", "divide", "true_divide")
# linear in eval mode only (argument ``training`` False)
_EVAL_ONLY_NAMES = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                    "batch_norm")


def _functions(names: Iterable[str]) -> dict[Callable[..., Any], str]:
    """Every torch function, ``torch.nn.functional`` function or Tensor method of these names -> name."""
    found: dict[Callable[..., Any], str] = {}
    for name in names:
        for owner, prefix in ((torch, "torch."), (F, "torch.nn.functional."), (torch.Tensor, "Tensor."),
                              (torch._C._nn, "torch._C._nn.")):
            func = getattr(owner, name, None)
            if callable(func):
                found.setdefault(func, prefix + name)
    return found


ELEMENTWISE = _functions(_ELEMENTWISE_NAMES)
LINEAR = _functions(_LINEAR_NAMES)
PRODUCTS = _functions(_PRODUCT_NAMES)
QUOTIENTS = _functions(_QUOTIENT_NAMES)
EVAL_ONLY = _functions(_EVAL_ONLY_NAMES)


def function_name(func: Callable[..., Any]) -> str:
    """A readable name of a torch function as a mode sees it (``torch.nn.functional.layer_norm``)."""
    for table in (ELEMENTWISE, LINEAR, PRODUCTS, QUOTIENTS, EVAL_ONLY):
        if func in table:
            return table[func]
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{module}.{name}" if module and not name.startswith(module) else name


def tensors_in(values: Any) -> Iterable[torch.Tensor]:
    """Every tensor in ``values`` (nested lists, tuples and dicts)."""
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (list, tuple)):
        for value in values:
            yield from tensors_in(value)
    elif isinstance(values, dict):
        for value in values.values():
            yield from tensors_in(value)


def on_path(values: Any) -> bool:
    """Whether any tensor in ``values`` requires a gradient (is on the gradient path)."""
    return any(t.requires_grad for t in tensors_in(values))


@lru_cache(maxsize=1024)
def _signature(func: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def named_arguments(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                    defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A call's arguments by name, for a function whose parameter ``names`` are known (in order):
    ``defaults``, then the positional arguments, then the keywords. For the hot path's functions
    (batch norm, padding, layer norm, attention) instead of :func:`bound_arguments`, whose
    signature binding costs about 10 us a call."""
    return {**(defaults or {}), **dict(zip(names, args, strict=False)), **kwargs}


def bound_arguments(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                    defaults: bool = False) -> dict[str, Any]:
    """The call's arguments by name, with the parameters' defaults when ``defaults`` (empty when the
    signature cannot be read, e.g. a builtin). Each function's signature is read once (reading it
    costs more than many a tensor operation on the rules' hot path)."""
    try:
        signature = _signature(func)
    except TypeError:  # an unhashable callable
        signature = _signature.__wrapped__(func)
    if signature is None:
        return {}
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {}
    if defaults:
        bound.apply_defaults()
    return dict(bound.arguments)


_PROPERTY_READ = type(torch.Tensor.shape.__get__)  # how a mode sees x.shape: Tensor.shape.__get__, a method-wrapper


def _reads_property(func: Callable[..., Any]) -> bool:
    """Whether a call reads a tensor property: not a tensor (shape, dtype), the tensor or a view of
    it (.T, .mT, .H, .real: linear), or a tensor off the gradient path (.data, .grad)."""
    return type(func) is _PROPERTY_READ and type(getattr(func, "__self__", None)) is types.GetSetDescriptorType


def is_linear_call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call is linear in its input-dependent tensors: a linear function, a product or
    quotient with at most one input-dependent factor (none in the divisor), dropout in eval mode,
    a property read (``x.mT``)."""
    if func in LINEAR or _reads_property(func):
        return True
    if func in PRODUCTS:
        return sum(t.requires_grad for t in tensors_in((args, kwargs))) <= 1
    if func in QUOTIENTS:
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        return not on_path(divisor)
    if func in EVAL_ONLY:
        if "training" in kwargs:  # (how F.dropout passes it on: no binding needed)
            return kwargs["training"] is False
        bound = bound_arguments(func, args, kwargs)
        return bound.get("training", True) is False
    return False


def is_inplace(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call writes its result into its input (``relu_``, ``inplace=True``)."""
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or bool(bound_arguments(func, args, kwargs).get("inplace", False))


# ------------------------------------------------------------------ elementwise modules and custom Functions
# a module class that sets this to True declares its forward an elementwise function of its first
# argument (same shape out, the input left unchanged): the propagation methods run it as one unit
ELEMENTWISE_FLAG = "salience_elementwise"
CUSTOM_FUNCTION_HINT = (f"if it is an elementwise activation inside a module (a binarized network's sign with a "
                        f"straight-through estimator, a memory-saving swish), set {ELEMENTWISE_FLAG} = True on that "
                        "module's class and it runs as one elementwise unit")


def is_activation_unit(module: nn.Module) -> bool:
    """Whether a module runs as one elementwise unit in the propagation modes (its own calls without
    gradients, its output given the method's rule for an elementwise activation):

    - a class declaring ``salience_elementwise = True`` (:data:`ELEMENTWISE_FLAG`): e.g. an
      activation computed by a custom ``torch.autograd.Function``, whose inside the modes cannot see;
    - one of transformers' activations (``transformers.activations``) written out in torch functions
      that the rules would otherwise meet one by one (NewGELUActivation: ``torch.pow``, ``tanh``;
      QuickGELUActivation, FastGELUActivation, ...). The thin wrappers of one activation the rules
      know (GELUActivation calling F.gelu, GELUTanh, MishActivation, SiLUActivation,
      LinearActivation) are left to them: the same rule, without the unit's cost."""
    cls = type(module)
    if getattr(cls, ELEMENTWISE_FLAG, False) is True:
        return True
    if cls.__module__ != "transformers.activations":
        return False
    act = getattr(module, "act", None)
    if act is not None:
        function = act.func if isinstance(act, partial) else act
        return function not in RELU_FAMILY and function not in ELEMENTWISE
    return cls.__name__ not in ("SiLUActivation", "LinearActivation")


def custom_function_refusal(method: str, name: str, where: str = "") -> str:
    """The one-line refusal of the custom ``torch.autograd.Function`` ``name`` found on a propagation
    method's path (see :func:`custom_functions`)."""
    return (f"{method} cannot follow the custom torch.autograd.Function {name} on the relevance path{where}: the "
            f"rules cannot see inside it, and its backward is not {method}'s rule; {CUSTOM_FUNCTION_HINT}")


def check_unit_output(method: str, module: nn.Module, x: torch.Tensor, version: int, output: Any, rule: str,
                      where: str = "") -> None:
    """Refuse an elementwise unit (:func:`is_activation_unit`) whose call on ``x`` (at version
    ``version`` when it began) did not return a tensor of x's shape, or changed x in place: ``rule``,
    the method's rule for an elementwise activation, would be wrong there."""
    if not isinstance(output, torch.Tensor) or output.shape != x.shape or x._version != version:
        raise ParameterError(f"{method}: the activation module {type(module).__name__}{where} did not return a tensor "
                             f"of its input's shape with its input unchanged; {rule} needs an elementwise function")


def input_dependent(values: Any) -> bool:
    """Whether a tensor in ``values`` that is not a parameter requires a gradient."""
    return any(t.requires_grad and not isinstance(t, nn.Parameter) for t in tensors_in(values))


def custom_functions(outputs: Any) -> list[str]:
    """The names of the custom ``torch.autograd.Function`` classes (Salience's own rules left out)
    in the autograd graph behind the tensors of ``outputs``, in the order found: a propagation
    mode sees the torch calls inside such a Function's forward without gradients, and its backward
    is its own, not the method's rule."""
    stack = [t.grad_fn for t in tensors_in(outputs) if t.grad_fn is not None]
    seen: set[int] = set()
    found: dict[str, None] = {}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and not cls.__module__.startswith("salience.methods"):
            found[cls.__qualname__] = None
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return list(found)


class ModuleHookedMode(TorchFunctionMode):
    """A :class:`TorchFunctionMode` that also sees every module call while it is active: a global
    forward pre-hook calls :meth:`_push` and a forward hook :meth:`_pop` (also when the forward
    raised, with output None; what it returns, unless None, replaces the output). The hooks are
    removed on leaving, on every path."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Any] = []

    def _push(self, module: nn.Module, args: Any) -> None:
        """A module's forward begins."""

    def _pop(self, module: nn.Module, args: Any, output: Any) -> Any:
        """A module's forward ended."""
        return None

    def __enter__(self) -> Self:
        super().__enter__()
        try:
            self._hooks = [register_module_forward_pre_hook(self._push),
                           register_module_forward_hook(self._pop, always_call=True)]
        except BaseException:
            super().__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        super().__exit__(exc_type, exc, traceback)
