"""How every adapter runs rows through its model: targets as output columns, one backward row per
(row, target) pair (from one forward pass of the row where the adapter offers it), parameters
frozen while input gradients are taken, outputs checked finite."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from salience.core.batching import map_batches
from salience.core.target import Target
from salience.errors import ModelOutputError

# (rows (B, ...), which (B,) or None) -> without ``which``: every target's output (B, T) and an empty
# tensor; with it: row b's output for target ``which[b]`` (B,) and its gradient w.r.t. the row (B, ...)
RowPass = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
# (rows (B, ...), group) -> every target's output (B, T) and its gradient w.r.t. the row (B, T, ...),
# from ONE forward pass of the B rows; the backward runs vmapped over at most ``group`` targets at once
SharedForwardPass = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# set by one_target_per_backward: called before each target's own backward pass
_ONE_TARGET_PER_BACKWARD: ContextVar[Callable[[], None] | None] = ContextVar("one_target_per_backward", default=None)


@contextmanager
def one_target_per_backward(before_each: Callable[[], None]) -> Iterator[None]:
    """Inside: a shared forward pass's targets run backward one after the other (the graph kept
    between them) instead of vmapped together, ``before_each()`` called before each target's
    backward. For backward rules that cannot run under vmap or that record each backward pass (LRP's
    trace): the same count of backward rows, from one forward pass."""
    token = _ONE_TARGET_PER_BACKWARD.set(before_each)
    try:
        yield
    finally:
        _ONE_TARGET_PER_BACKWARD.reset(token)


def as_targets(target: Target | Sequence[Target]) -> tuple[list[Target], bool]:
    """The targets as a list, and whether a single :class:`Target` was given (results squeezed)."""
    if isinstance(target, Target):
        return [target], True
    return list(target), False


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` on every parameter, restoring each flag on exit (errors too).
    The flags are set with torch functions disabled: under a mode such as LRP's, each call would
    otherwise be dispatched to it (hundreds of calls for a transformer, none of them its business)."""
    with torch._C.DisableTorchFunction():
        saved = [(p, p.requires_grad) for p in model.parameters()]
        for parameter, _ in saved:
            parameter.requires_grad_(False)
    try:
        yield
    finally:
        with torch._C.DisableTorchFunction():
            for parameter, flag in saved:
                parameter.requires_grad_(flag)


def check_finite(values: torch.Tensor) -> torch.Tensor:
    """``values`` (B, ...) unchanged, or :class:`ModelOutputError` naming how many rows hold NaN/inf."""
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=-1).sum())
        raise ModelOutputError(f"the model returned NaN or infinite scores for {bad} of {values.shape[0]} inputs")
    return values


def score_rows(model: nn.Module, run: RowPass, rows: torch.Tensor, n_targets: int, size: int, *,
               grad: bool, single: bool = False, paired: bool = False,
               shared_forward: SharedForwardPass | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs (N, T) of ``rows`` (N, ...) in chunks of ``size`` rows; with ``grad`` also the
    gradients (N, T, ...). Without gradients one pass serves every target; with them each
    (row, target) pair is one backward row, so a chunk holds ``size`` such pairs. With several
    targets and a ``shared_forward`` pass, a row's forward pass is run once for all its targets
    (size // T rows per chunk, at least one) instead of once per pair. ``single`` (one
    :class:`Target` was given, see :func:`as_targets`): (N,) and (N, ...) instead. ``paired``:
    row i is read for target i only (T = N): (N,) and (N, ...), one backward row per row."""
    n, k = rows.shape[0], n_targets
    if paired:
        return _score_pairs(model, run, rows, size, grad=grad)
    if not grad:
        values = map_batches(lambda chunk: run(rows[chunk], None)[0], n, size)
        return (values[:, 0] if single else values), None
    if shared_forward is not None and k > 1:
        with frozen_parameters(model):
            return map_batches(lambda chunk: shared_forward(rows[chunk], max(1, size)), n, max(1, size // k))
    which = torch.arange(n * k) % k  # row i of the expanded batch explains target i % k

    def backward(chunk: slice) -> tuple[torch.Tensor, torch.Tensor]:
        source = rows[chunk] if k == 1 else rows[torch.arange(chunk.start, chunk.stop) // k]
        return run(source, which[chunk])

    with frozen_parameters(model):
        values, gradients = map_batches(backward, n * k, max(1, size))
    values, gradients = values.reshape(n, k), gradients.reshape(n, k, *rows.shape[1:])
    return (values[:, 0], gradients[:, 0]) if single else (values, gradients)


def _score_pairs(model: nn.Module, run: RowPass, rows: torch.Tensor, size: int, *,
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row i's output for target i (N,), and with ``grad`` its gradient w.r.t. row i (N, ...)."""
    n = rows.shape[0]
    which = torch.arange(n)
    if not grad:
        def forward(chunk: slice) -> torch.Tensor:
            outputs = run(rows[chunk], None)[0]
            return outputs.gather(1, which[chunk, None].to(outputs.device))[:, 0]  # outputs on the model's device

        return map_batches(forward, n, size), None
    with frozen_parameters(model):
        values, gradients = map_batches(lambda chunk: run(rows[chunk], which[chunk]), n, max(1, size))
    return values, gradients


def gradients_of_outputs(values: torch.Tensor, inputs: torch.Tensor, group: int) -> torch.Tensor:
    """d values[:, t] / d inputs for every target t: (B, T, ...) from outputs ``values`` (B, T) of a
    forward pass over ``inputs`` (B, ...), by :func:`grouped_backward` with one-hot cotangents. Row
    b's outputs depend on row b only, so one-hot cotangents per target give each row's own gradient."""
    def one_hot(start: int, stop: int) -> torch.Tensor:
        picks = torch.zeros(stop - start, *values.shape, dtype=values.dtype, device=values.device)
        picks[torch.arange(stop - start), :, torch.arange(start, stop)] = 1
        return picks

    return grouped_backward(values, inputs, values.shape[1], group, one_hot)


def grouped_backward(outputs: torch.Tensor, inputs: torch.Tensor, count: int, group: int,
                     cotangents: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Gradients (B, count, ...) w.r.t. ``inputs`` (B, ...) of ``count`` targets read from
    ``outputs``: the backward is vmapped (``is_grads_batched``) over at most ``group`` targets at a
    time, ``cotangents(start, stop)`` giving the targets' cotangents (stop - start, *outputs.shape),
    the forward graph kept between groups: ``count`` backward rows for one forward pass. Inside
    :func:`one_target_per_backward`: one plain backward per target instead."""
    before_each = _ONE_TARGET_PER_BACKWARD.get()
    if before_each is not None:
        rows = []
        for index in range(count):
            before_each()
            (row,) = torch.autograd.grad(outputs, inputs, grad_outputs=cotangents(index, index + 1)[0],
                                         retain_graph=index < count - 1)
            rows.append(row)
        return torch.stack(rows, dim=1)
    parts = []
    for start in range(0, count, group):
        stop = min(count, start + group)
        (part,) = torch.autograd.grad(outputs, inputs, grad_outputs=cotangents(start, stop), is_grads_batched=True,
                                      retain_graph=stop < count)
        parts.append(part)  # (G, B, ...)
    return torch.cat(parts).transpose(0, 1)
