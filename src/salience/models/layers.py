"""Generic torch helpers for methods that read an inner layer (CAM): find the layer (by dotted name,
as a module, or automatically), capture its output and the gradient of an output w.r.t. it, edit
it, and view it as a spatial map (N, K, h, w). Every hook lives inside a context manager that
removes it on every path, exceptions included.

A layer output is *spatial* when it is a 4-D convolutional map (N, K, h, w) with h x w > 1, or 3-D
tokens (N, L, D) of a vision transformer that form a grid of patches after a few leading class or
register tokens (:func:`token_layout`); tokens become a map with their D channels first.

A layer is named by its dotted module name, optionally with suffixes: ``":input"`` reads the
module's (first) input instead of its output (e.g. ``"_avg_pooling:input"``: the activated map a
global pooling receives), ``":nhwc"`` declares a channels-last 4-D output (N, H, W, C) such as a
Swin stage's. A 4-D output that reads as a grid of the input's shape only when taken as channels
last is refused without ``":nhwc"`` (it would be read wrongly without error).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from salience.errors import ModelOutputError, ParameterError

MAX_EXTRA_TOKENS = 8  # leading class / distillation / register tokens allowed before the patch grid
POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d)
LISTED = 12  # candidate layers named in an error message (those nearest the output)


class LayerMaps(NamedTuple):
    """A layer read on N rows: ``activations`` (N, K, h, w); ``gradients`` (N, T, K, h, w) of each
    target's output w.r.t. them, or None; ``outputs`` (N, T) the explained outputs; ``layer`` the
    layer's dotted name; ``grid`` (H, W) the input grid the maps cover (positions row-major)."""

    activations: torch.Tensor
    gradients: torch.Tensor | None
    outputs: torch.Tensor
    layer: str
    grid: tuple[int, int]


# ------------------------------------------------------------------ geometry
def token_layout(length: int, grid: tuple[int, int]) -> tuple[int, int, int] | None:
    """(extra, gh, gw): ``length`` tokens = ``extra`` leading class/register tokens + a gh x gw grid of
    patches, row-major; None if there is none. The grid has the input's aspect ratio (a square for
    a square input) and whole patches (gh divides H, gw divides W): the largest such grid with at
    most ``length`` tokens, if it leaves 0 <= extra <= :data:`MAX_EXTRA_TOKENS` and has 2 x 2 patches
    or more. Whole patches rule out false grids: 27 tokens of a 16 x 16 input are not 5 x 5 + 2."""
    height, width = grid
    divisor = math.gcd(height, width)
    step_h, step_w = height // divisor, width // divisor  # the grid is (m step_h) x (m step_w)
    m = math.isqrt(max(length, 0) // (step_h * step_w))
    while m >= 1 and (height % (m * step_h) or width % (m * step_w)):
        m -= 1
    gh, gw = m * step_h, m * step_w
    if m < 1 or gh * gw < 4 or length - gh * gw > MAX_EXTRA_TOKENS:
        return None
    return length - gh * gw, gh, gw


def is_spatial(value: Any, grid: tuple[int, int]) -> bool:
    """Whether ``value`` is a map (N, K, h, w) with h x w > 1 or patch tokens (see :func:`token_layout`)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    if value.dim() == 4:
        return value.shape[2] * value.shape[3] > 1
    return value.dim() == 3 and token_layout(value.shape[1], grid) is not None


def as_spatial(value: torch.Tensor, grid: tuple[int, int], name: str) -> torch.Tensor:
    """A layer output (or its gradient) as (N, K, h, w): a 4-D map as it is (permuted from (N, H, W, C)
    for a ``":nhwc"`` layer ``name``); tokens (N, L, D) without their leading extra tokens, reshaped
    row-major to the patch grid, channels first."""
    value = check_layout(value, grid, parse_layer(name))
    if value.dim() == 4 and value.shape[2] * value.shape[3] > 1:
        return value
    layout = token_layout(value.shape[1], grid) if value.dim() == 3 else None
    if layout is None:
        shape = tuple(value.shape)
        if value.dim() == 3:
            raise ParameterError(f"layer {name!r} gives {shape[1]} tokens {shape}: not a grid of patches for a {grid[0]}x{grid[1]} "
                                 f"input after at most {MAX_EXTRA_TOKENS} leading class/register tokens")
        raise ParameterError(f"layer {name!r} gives an output of shape {shape}: not a spatial map (N, K, h, w) "
                             "nor patch tokens (N, L, D); choose a convolutional or transformer layer")
    extra, gh, gw = layout
    return value[:, extra:].reshape(value.shape[0], gh, gw, value.shape[2]).permute(0, 3, 1, 2)


def zero_channels(value: torch.Tensor, channels: torch.Tensor, grid: tuple[int, int], name: str) -> torch.Tensor:
    """``value`` (layer ``name``'s output, N rows) with channel ``channels[i]`` zeroed in row i, at
    every spatial position (for tokens: every patch token; class/register tokens are kept)."""
    keep = torch.ones_like(value)
    rows = torch.arange(value.shape[0], device=value.device)
    picked = channels.to(value.device)
    if value.dim() == 4 and parse_layer(name).channels_last:
        keep[rows, :, :, picked] = 0
    elif value.dim() == 4:
        keep[rows, picked] = 0
    else:
        extra = token_layout(value.shape[1], grid)[0]  # type: ignore[index]  # checked by as_spatial first
        keep[:, extra:][rows, :, picked] = 0
    return value * keep


# ------------------------------------------------------------------ naming a layer
POINTS = ("input",)  # ":input": the module's first input instead of its output
LAYOUTS = ("nhwc",)  # ":nhwc": a channels-last 4-D output


class LayerSpec(NamedTuple):
    """A parsed layer name: the module's dotted name, whether its input is read, and whether its
    4-D value is channels-last."""

    module: str
    reads_input: bool = False
    channels_last: bool = False

    def __str__(self) -> str:
        return self.module + (":input" if self.reads_input else "") + (":nhwc" if self.channels_last else "")


def parse_layer(spec: str) -> LayerSpec:
    """``"name[:input][:nhwc]"`` -> :class:`LayerSpec` (ParameterError for an unknown suffix)."""
    module, *suffixes = spec.split(":")
    unknown = [x for x in suffixes if x not in POINTS + LAYOUTS]
    if unknown or len(set(suffixes)) < len(suffixes):
        raise ParameterError(f"layer {spec!r}: unknown or repeated suffix {':'.join(unknown or suffixes)!r}; "
                             "a layer is NAME, NAME:input (the module's input), NAME:nhwc (channels-last output) or NAME:input:nhwc")
    return LayerSpec(module, "input" in suffixes, "nhwc" in suffixes)


def channels_last_only(shape: tuple[int, ...], grid: tuple[int, int]) -> bool:
    """Whether a 4-D shape (N, A, B, C) is a grid of the input's aspect ratio with whole cells only
    when read channels-last ((A, B) is; (B, C) is not): a likely (N, H, W, C) output."""
    def fits(h: int, w: int) -> bool:
        return h * grid[1] == w * grid[0] and grid[0] % h == 0 and grid[1] % w == 0
    return len(shape) == 4 and fits(shape[1], shape[2]) and not fits(shape[2], shape[3])


def check_layout(value: torch.Tensor, grid: tuple[int, int], spec: LayerSpec) -> torch.Tensor:
    """A 4-D layer value as (N, K, h, w): a ``":nhwc"`` layer permuted; an undeclared value that only
    reads as a grid channels-last refused."""
    if value.dim() != 4:
        return value
    if spec.channels_last:
        return value.permute(0, 3, 1, 2)
    if channels_last_only(tuple(value.shape), grid):
        raise ParameterError(f"layer {str(spec)!r} gives {tuple(value.shape)}, which looks channels-last (N, H, W, C) for a "
                             f"{grid[0]}x{grid[1]} input; give layer='{spec.module}:nhwc' if it is (or another layer)")
    return value


# ------------------------------------------------------------------ finding a layer
def module_name(net: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``net`` (ParameterError if it is not part of it)."""
    for name, candidate in net.named_modules():
        if candidate is module and name:
            return name
    raise ParameterError(f"the given layer ({type(module).__name__}) is not a submodule of {type(net).__name__}")


def get_layer(net: nn.Module, layer: str | nn.Module, listing: Callable[[], str]) -> tuple[str, nn.Module]:
    """(dotted name, module) of ``layer`` (a name such as ``"features.28"``, an int for a child of a
    Sequential, or the module itself);
    an unknown name raises ParameterError naming the spatial layers ``listing()`` describes."""
    if isinstance(layer, nn.Module):
        return module_name(net, layer), layer
    if isinstance(layer, int) and not isinstance(layer, bool):
        layer = str(layer)  # a child of an nn.Sequential (the CLI reads --param layer=4 as a number)
    if not isinstance(layer, str) or not layer:
        raise ParameterError(f"layer must be a dotted module name or a torch module, got {layer!r}")
    spec = parse_layer(layer)
    modules = dict(net.named_modules())
    if spec.module not in modules:
        raise ParameterError(f"no layer {spec.module!r} in {type(net).__name__}; {listing()}")
    return str(spec), modules[spec.module]


def scripted(module: nn.Module) -> bool:
    """A TorchScript module: hooks cannot be attached to it."""
    return isinstance(module, torch.jit.ScriptModule)


@dataclass
class Record:
    """One module seen during a probe: how often it ran, when its first call finished, its output."""

    name: str
    module: nn.Module
    calls: int = 0
    finished: int = -1
    output: Any = field(default=None, repr=False)
    input: Any = field(default=None, repr=False)  # the first positional input of its first call


@contextmanager
def recording(net: nn.Module) -> Iterator[list[Record]]:
    """Record every submodule's first output and call count during the forward passes run inside."""
    records = [Record(name, module) for name, module in net.named_modules() if name and not scripted(module)]
    clock = [0]

    def hook_for(record: Record) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            record.calls += 1
            if record.calls == 1:
                record.finished, record.output = clock[0], output
                record.input = _inputs[0] if _inputs else None
            clock[0] += 1
        return hook

    handles = [record.module.register_forward_hook(hook_for(record)) for record in records]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def spatial_layers(records: list[Record], grid: tuple[int, int]) -> list[Record]:
    """The records that ran once with a spatial output (pooling layers excluded), in forward order."""
    found = [r for r in records if r.calls == 1 and is_spatial(r.output, grid) and not isinstance(r.module, POOLING)]
    return sorted(found, key=lambda r: r.finished)


def describe(records: list[Record], grid: tuple[int, int]) -> str:
    """A one-line list of the spatial layers, those nearest the output last."""
    names = [r.name for r in spatial_layers(records, grid)]
    if not names:
        return "the model has no layer with a spatial output (a 4-D map or a grid of patch tokens)"
    shown = names[-LISTED:]
    more = f" (and {len(names) - len(shown)} earlier)" if len(names) > len(shown) else ""
    return f"layers with spatial outputs, nearest the output last{more}: {', '.join(shown)}"


class Choice(NamedTuple):
    """The automatic layer and whether finding it took a backward pass."""

    name: str
    backward: bool


def needs_gradients(records: list[Record], grid: tuple[int, int]) -> bool:
    """Whether :func:`choose_layer` needs the graph: the last spatial output is patch tokens."""
    found = spatial_layers(records, grid)
    return bool(found) and found[-1].output.dim() == 3


def choose_layer(records: list[Record], value: torch.Tensor, grid: tuple[int, int], model_name: str) -> Choice:
    """The automatic CAM layer among ``records`` of one forward pass that computed ``value`` (the
    explained output; with its graph when :func:`needs_gradients`).

    CNNs (the last spatial layer is a 4-D map): the last module, in forward order, with a 4-D
    spatial output, that is not a pooling layer and runs once per pass; of modules giving the same
    output the outermost (it finishes last): a whole block rather than its inner activation. If a
    global pooling module (output of one position) follows it and receives another map of that
    shape (an activation called as a function, or a shared activation module, sits between them:
    EfficientNet's ``_bn1`` -> shared ``_swish`` -> ``_avg_pooling``), the pooling's input is
    chosen instead (``"<pooling>:input"``): the activated map the classifier reads.

    Vision transformers (the last spatial layer gives patch tokens): among the token outputs of the
    model's width D (the most common one), the last whose patch tokens the explained output still
    depends on (a non-zero gradient; one backward pass). In a pre-norm block the class token reads
    the patch tokens only through the last block's attention, so this is that block's first norm
    (the layer pytorch-grad-cam's documentation uses); in a post-norm block it is the previous
    block's output. Later token outputs have zero patch-token gradients (CAM would be all zero).
    """
    found = spatial_layers(records, grid)
    if not records:
        raise ParameterError(f"{model_name} has no submodule that takes hooks (TorchScript modules take none); "
                             "CAM methods need a model written as plain torch modules")
    if not found:
        raise ParameterError(f"no layer of {model_name} gives a spatial output (a 4-D map or a grid of patch tokens): "
                             "CAM methods need a convolutional or vision-transformer model")
    maps = [r for r in found if r.output.dim() == 4]
    tokens = [r for r in found if r.output.dim() == 3]
    if not needs_gradients(records, grid):
        last = maps[-1]
        _check_no_tokens_after(last, records, grid)
        if channels_last_only(tuple(last.output.shape), grid):
            raise ParameterError(f"the last spatial layer of {model_name}, {last.name!r}, gives {tuple(last.output.shape)}, which looks "
                                 f"channels-last (N, H, W, C); give layer='{last.name}:nhwc' if it is (or another layer)")
        pooling = _global_pooling_after(last, records)
        if pooling is not None and not _same_tensor(pooling.input, last.output):
            return Choice(f"{pooling.name}:input", False)
        return Choice(last.name, False)
    width = Counter(int(r.output.shape[2]) for r in tokens).most_common(1)[0][0]
    candidates = [r for r in tokens if r.output.shape[2] == width and r.output.requires_grad]
    gradients = torch.autograd.grad(value, [r.output for r in candidates], allow_unused=True) if candidates else ()
    for record, gradient in reversed(list(zip(candidates, gradients))):
        extra = token_layout(record.output.shape[1], grid)[0]  # type: ignore[index]
        if gradient is not None and bool(gradient[:, extra:].ne(0).any()):
            return Choice(record.name, True)
    raise ParameterError(f"the output of {model_name} depends on no patch tokens of its token layers; give layer=...")


def _global_pooling_after(last: Record, records: list[Record]) -> Record | None:
    """The first pooling module after ``last`` that runs once and pools a map of ``last``'s shape to
    one position, if any."""
    for r in sorted(records, key=lambda r: r.finished):
        value = r.input
        if (r.finished > last.finished and r.calls == 1 and isinstance(r.module, POOLING) and isinstance(value, torch.Tensor)
                and value.shape == last.output.shape and isinstance(r.output, torch.Tensor) and r.output[0, 0].numel() == 1):
            return r
    return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _check_no_tokens_after(last: Record, records: list[Record], grid: tuple[int, int]) -> None:
    """Refuse a map followed by tokens of its channel width that form no grid (a vision transformer
    whose token count cannot be read as patches): its patch embedding is no explanation."""
    channels, area = last.output.shape[1], last.output.shape[2] * last.output.shape[3]
    for r in records:
        value = r.output
        if (r.finished > last.finished and isinstance(value, torch.Tensor) and value.dim() == 3
                and value.shape[2] == channels and value.shape[1] > area):
            raise ParameterError(f"layer {r.name!r} gives {value.shape[1]} tokens after the {area} patches of {last.name!r}: not a "
                                 f"grid of patches after at most {MAX_EXTRA_TOKENS} leading class/register tokens; give layer=...")


# ------------------------------------------------------------------ capturing a layer
@dataclass
class Captured:
    """What :func:`capture` saw: the layer output of the last forward pass (a leaf requiring grad
    when gradients were asked for: differentiate w.r.t. it)."""

    name: str
    value: torch.Tensor | None = None
    calls: int = 0


@contextmanager
def capture(module: nn.Module, name: str, *, grad: bool,
            edit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[Captured]:
    """Capture ``module``'s output (its first input for a ``":input"`` layer ``name``) in each forward
    pass run inside (one call per pass; reset ``calls`` between passes), after applying ``edit`` to
    it when given.

    The captured tensor is a copy, so in-place operations after the layer (an
    ``nn.ReLU(inplace=True)``) cannot change it. With ``grad`` it is a leaf that requires grad and
    the model continues from a copy of it: d output / d layer comes from
    ``torch.autograd.grad(output, captured.value)``, and the backward pass stops at the layer (the
    layers before it need no graph). The hook is removed on every path."""
    seen = Captured(name)
    reads_input = parse_layer(name).reads_input

    def pre_hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        if not inputs:
            raise ParameterError(f"layer {name!r}: the module is called without a positional input to read")
        return (hook(module, (), inputs[0]), *inputs[1:])

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        seen.calls += 1
        if seen.calls > 1:
            raise ParameterError(f"layer {name!r} runs {seen.calls} times in one forward pass (a shared module); "
                                 "CAM needs a layer that runs once: choose another")
        if not isinstance(output, torch.Tensor):
            raise ParameterError(f"layer {name!r} returns a {type(output).__name__}, not a tensor; choose another layer")
        value = edit(output) if edit is not None else output
        seen.value = value.detach().clone().requires_grad_(grad)
        return seen.value.clone() if grad else value

    if scripted(module):
        raise ParameterError(f"layer {name!r} is a TorchScript module, which takes no hooks; give the model as plain torch code")
    handle = module.register_forward_pre_hook(pre_hook) if reads_input else module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def captured_value(seen: Captured) -> torch.Tensor:
    """The captured tensor, or ModelOutputError if the layer did not run in the forward pass."""
    if seen.value is None:
        raise ModelOutputError(f"layer {seen.name!r} did not run in the model's forward pass")
    return seen.value
