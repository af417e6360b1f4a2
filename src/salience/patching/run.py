"""Activation patching and its gradient estimate, attribution patching (AtP), between a clean and a
corrupted input of the same token length.

The metric m is the explained output of one target on the clean input (see
:func:`attribution_patching`). A component is an activation a: the residual stream after layer l at
position p (the block's output, (D,)), or the output of attention head h of layer l at every
position (its slice of the output projection's input, (P, head_dim)). Patching a component
replaces its clean value by a_clean + scale (a_corrupt - a_clean) in an otherwise clean run.

- ``method="exact"`` (activation patching): m(clean run with the component patched) - m(clean),
  one forward row per component, all batched (rows patched each at their own component).
- ``method="atp"`` (Nanda 2023; Kramár et al. 2024, "AtP*"): the first-order estimate
  scale (a_corrupt - a_clean) . dm/da, the gradient taken on the clean run: one clean forward +
  backward (under ``backward_mode()`` when given, e.g. a relevance rule's modified gradient) and
  one corrupted forward, for every component at once. Exact where m is linear in a; the error is
  O(scale^2).
- ``method="relp"`` (relevance patching, Jafari et al. 2025): AtP with dm/da replaced by the LRP
  propagation coefficient of a, i.e. the gradient of the backward pass run inside AttnLRP's
  :class:`salience.methods.lrp_mode.LRPMode` (``transformer=True``; composite ``"epsilon"`` with
  ``eps`` by default): scale (a_corrupt - a_clean) . c_LRP(a). Same cost as AtP. The metric must be
  a logit or logit difference (the rules stop at the logits).

Both are in units of the metric: > 0 where patching the component raises m (towards the corrupted
run's value when m(corrupted) > m(clean)). Head scores are summed over positions (the head is
patched at every position at once); residual scores are per (layer, position).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from salience.core.target import Target, check_output, resolve_target
from salience.errors import InputError, ModelOutputError, ParameterError, indefinite
from salience.models.components import Components, model_components
from salience.patching.result import PatchingResult

KINDS = ("residual", "heads")
METHODS = ("atp", "exact", "relp")
NOTES = {"atp": "attribution patching: scale (a_corrupt - a_clean) . dm/da at the clean run (first-order estimate)",
         "relp": "relevance patching: scale (a_corrupt - a_clean) . (AttnLRP's modified gradient of m at a, clean run)",
         "exact": "activation patching: m(clean run, component patched) - m(clean run)"}
BackwardMode = Callable[[], AbstractContextManager[Any]]


@dataclass
class _Seen:
    """Activations of one forward pass (row 0): per layer the block output (P, D) and the heads'
    concatenated outputs (P, H d); with gradients, dm/d of each."""

    residual: list[torch.Tensor | None]
    heads: list[torch.Tensor | None]
    residual_grad: list[torch.Tensor | None] = field(default_factory=list)
    heads_grad: list[torch.Tensor | None] = field(default_factory=list)


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _store(slots: list[torch.Tensor | None], index: int) -> Callable[[torch.Tensor], None]:
    def hook(gradient: torch.Tensor) -> None:
        slots[index] = gradient.detach()[0]
    return hook


@contextmanager
def _recording(parts: Components, *, grad: bool) -> Iterator[_Seen]:
    """Record each block's output and each projection's input (row 0) in the forward pass inside;
    with ``grad`` also their gradients when a backward pass reaches them. Hooks removed on exit."""
    count = len(parts.layers)
    seen = _Seen([None] * count, [None] * count, [None] * count, [None] * count)

    def keep(values: list[torch.Tensor | None], grads: list[torch.Tensor | None], index: int, value: torch.Tensor) -> None:
        values[index] = value.detach()[0]
        if grad and value.requires_grad:
            value.register_hook(_store(grads, index))

    handles = []
    for index, (layer, projection) in enumerate(zip(parts.layers, parts.projections)):
        handles.append(layer.register_forward_hook(
            lambda _m, _i, output, index=index: keep(seen.residual, seen.residual_grad, index, _tensor(output))))
        handles.append(projection.register_forward_pre_hook(
            lambda _m, inputs, index=index: keep(seen.heads, seen.heads_grad, index, inputs[0])))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Plan:
    """Row i of the exact run patches component (kind[i], layer[i], index[i]): kind 0 the residual
    stream at position index, kind 1 head index at every position."""

    kind: torch.Tensor
    layer: torch.Tensor
    index: torch.Tensor


@contextmanager
def _patching(net: nn.Module, parts: Components, plan: _Plan, corrupt: _Seen, scale: float) -> Iterator[dict[str, int]]:
    """Inside, the rows of successive model calls (counted from 0 across calls, in the order the
    adapter sends them) are patched as ``plan`` says, towards the corrupted activations; yields the
    running count (``"offset"``: rows seen so far)."""
    state = {"offset": 0, "rows": 0}
    heads = parts.heads

    def rows_for(kind: int, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = state["offset"]
        state["rows"] = batch
        window = slice(start, start + batch)
        mine = (plan.kind[window] == kind) & (plan.layer[window] == layer)
        local = mine.nonzero()[:, 0]
        return local, plan.index[window][local]

    def patch_residual(layer: int, output: Any) -> Any:
        value = _tensor(output)
        rows, positions = rows_for(0, layer, value.shape[0])
        if len(rows):
            rows, positions = rows.to(value.device), positions.to(value.device)
            target = corrupt.residual[layer].to(value)[positions]  # type: ignore[union-attr]
            value = value.clone()
            value[rows, positions] += scale * (target - value[rows, positions])
        return (value, *output[1:]) if isinstance(output, tuple) else value

    def patch_heads(layer: int, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        value = inputs[0]
        rows, chosen = rows_for(1, layer, value.shape[0])
        if not len(rows):
            return inputs
        batch, length, width = value.shape
        rows, chosen = rows.to(value.device), chosen.to(value.device)
        split = value.clone().view(batch, length, heads, width // heads)
        target = corrupt.heads[layer].to(value).view(length, heads, width // heads)[:, chosen].transpose(0, 1)  # type: ignore[union-attr]
        split[rows, :, chosen] += scale * (target - split[rows, :, chosen])
        return (split.view(batch, length, width), *inputs[1:])

    def advance(*_: Any) -> None:
        state["offset"] += state["rows"]
        state["rows"] = 0

    handles = [net.register_forward_hook(advance)]
    for index, (layer, projection) in enumerate(zip(parts.layers, parts.projections)):
        handles.append(layer.register_forward_hook(lambda _m, _i, output, index=index: patch_residual(index, output)))
        handles.append(projection.register_forward_pre_hook(lambda _m, inputs, index=index: patch_heads(index, inputs)))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def _encode_pair(model: Any, clean: Any, corrupted: Any, options: dict[str, Any]) -> tuple[Any, Any]:
    if "continuation" in getattr(model, "encode_options", ()) and options.get("continuation") is None:
        raise ParameterError("give continuation=... (the token whose output is the metric) for a generative model; "
                             "patching compares one fixed target, not two generations")
    encoded = model.encode(clean, **options), model.encode(corrupted, **options)
    lengths = [e.length for e in encoded]
    if lengths[0] != lengths[1]:
        raise InputError(f"the clean input has {lengths[0]} tokens and the corrupted one {lengths[1]}; patching pairs "
                         "their positions, so both must tokenise to the same length")
    return encoded


def _target(model: Any, encoded: Any, target: Any, output: str) -> Target:
    resolver = getattr(model, "resolve_targets", None)
    if callable(resolver):
        targets = list(resolver(encoded, None, target, output))
    else:
        targets = [resolve_target(target, model.labels, model.predict(encoded), output)]
    if len(targets) != 1:
        raise ParameterError(f"the metric is one output, but the input gives {len(targets)} targets; "
                             "give a one-token continuation, or target=<index> of the token to use")
    return targets[0]


def _components(kinds: Sequence[str] | str) -> tuple[str, ...]:
    chosen = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise ParameterError(f"unknown component kind {unknown[0] if unknown else 'none'!r}; choose from {', '.join(KINDS)}")
    return chosen


def attribution_patching(model: Any, clean: Any, corrupted: Any, *, target: Any = None, output: str | None = None,
                         components: Sequence[str] | str = KINDS, method: str = "atp", scale: float = 1.0,
                         backward_mode: BackwardMode | None = None, batch_size: int | None = None,
                         eps: float = 0.0, composite: Any = "epsilon", **encode_options: Any) -> PatchingResult:
    """Score the components of ``model`` (residual stream per layer x position, attention heads per
    layer x head) by how much patching each from the ``corrupted`` run into the ``clean`` run changes
    the metric: estimated by AtP (``method="atp"``) or measured (``"exact"``); see the module docstring.

    ``clean`` and ``corrupted`` are inputs of the model (prompts, texts) that tokenise to the same
    length; ``encode_options`` are passed to ``model.encode`` for both (a causal LM needs
    ``continuation=" Paris"``, the target token, and may take ``contrast=" Rome"``, a foil). The
    metric is the explained output of the one target (``target`` picks it as ``explain`` does):
    ``output`` defaults to ``"logit"`` with a contrast (the logit difference token - foil at the
    position predicting it), else the model's ``default_output`` or ``"log_probability"`` (a causal
    LM's log p of the token; a classifier's class log-odds). ``scale`` (0, 1] patches part-way
    (a_clean + scale (a_corrupt - a_clean)). ``backward_mode`` (AtP only): a factory of a context
    manager entered around the clean forward + backward pass. ``method="relp"``: AtP whose backward
    runs under ``LRPMode(composite, eps=eps, transformer=True)`` (``eps``, ``composite``: AttnLRP's;
    ``backward_mode`` must then be left out); its metric must be a logit."""
    kinds = _components(components)
    if method not in METHODS:
        raise ParameterError(f"unknown patching method {method!r}; choose 'atp' (estimate), 'relp' (LRP estimate) "
                             "or 'exact' (activation patching)")
    if not 0 < scale <= 1:
        raise ParameterError(f"scale must be in (0, 1], got {scale}")
    net, model_type = getattr(model, "model", None), getattr(model, "model_type", None)
    if not isinstance(net, nn.Module):
        what = getattr(model, "kind", type(model).__name__)
        raise ParameterError(f"patching needs a transformer model adapter (a text classifier or causal LM), not {indefinite(what)}")
    parts = model_components(net, model_type)
    chosen = output or ("logit" if encode_options.get("contrast") is not None else getattr(model, "default_output", "log_probability"))
    clean_encoded, corrupt_encoded = _encode_pair(model, clean, corrupted, encode_options)
    goal = _target(model, clean_encoded, target, check_output(chosen))
    if method == "relp":
        backward_mode = _relevance_mode(goal, backward_mode, eps, composite)
    before, started = dict(vars(model.counter)), time.perf_counter()
    x_clean, _ = model.input_and_baseline(clean_encoded, "zero")
    x_corrupt, _ = model.input_and_baseline(corrupt_encoded, "zero")
    with _recording(parts, grad=False) as corrupt, torch.no_grad():
        corrupt_value, _ = model.score_inputs(corrupt_encoded, x_corrupt[None], goal, grad=False)
    _check_head_width(net, parts, corrupt)
    if method in ("atp", "relp"):
        with _recording(parts, grad=True) as seen, (backward_mode() if backward_mode is not None else nullcontext()):
            clean_value, _ = model.score_inputs(clean_encoded, x_clean[None], goal, grad=True)
        residual, heads = _estimate(seen, corrupt, parts.heads, scale)
    else:
        with _recording(parts, grad=False) as seen, torch.no_grad():
            clean_value, _ = model.score_inputs(clean_encoded, x_clean[None], goal, grad=False)
        residual, heads = _exact(model, net, parts, clean_encoded, x_clean, goal, corrupt, scale, float(clean_value[0]), batch_size,
                                 kinds)
    cost = {k: v - before.get(k, 0) for k, v in vars(model.counter).items()}
    cost["seconds"] = time.perf_counter() - started
    return PatchingResult(
        method=method, model=str(model.name), metric=f"{goal.output} of {goal.label!r}", scale=scale,
        clean_metric=float(clean_value[0]), corrupted_metric=float(corrupt_value[0]),
        tokens=list(clean_encoded.tokens), corrupted_tokens=list(corrupt_encoded.tokens), layers=parts.layer_names,
        residual=residual if "residual" in kinds else None, heads=heads if "heads" in kinds else None, cost=cost,
        method_note=NOTES[method])


def _relevance_mode(goal: Target, backward_mode: BackwardMode | None, eps: float, composite: Any) -> BackwardMode:
    """RelP's backward mode: AttnLRP's rules (LRPMode with ``transformer=True``)."""
    from salience.methods.deeplift import check_logit_targets
    from salience.methods.lrp_composites import parse_composite
    from salience.methods.lrp_mode import LRPMode

    if backward_mode is not None:
        raise ParameterError("method='relp' sets its own backward mode (AttnLRP's rules); leave backward_mode out")
    if eps < 0:
        raise ParameterError(f"relp: eps must be >= 0, got {eps}")
    check_logit_targets([goal], "relp")
    rules = parse_composite(composite)
    if rules.uses("zbox"):
        raise ParameterError("relp: the z^B rule needs bounded inputs; token embeddings have none (use epsilon or gamma)")
    return lambda: LRPMode(rules, eps=eps, stabiliser=0.0, transformer=True, method="relp")  # attnlrp's defaults


def _check_head_width(net: nn.Module, parts: Components, seen: _Seen) -> None:
    """The located head projections take heads x head_dim values per position (head_dim: the config's
    ``head_dim``, else hidden_size / heads), as the concatenated heads' outputs do; anything else
    (a projection that is not the attention's output) is refused before the heads are split."""
    config = getattr(net, "config", None)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // parts.heads
    for name, value in zip(parts.layer_names, seen.heads, strict=True):
        if value is None or value.shape[-1] != parts.heads * head_dim:
            width = "nothing" if value is None else f"{value.shape[-1]} values per position"
            raise ParameterError(f"the head projection of {name} took {width}, not {parts.heads} heads x {head_dim}: "
                                 "patching cannot split it into heads")


def _estimate(seen: _Seen, corrupt: _Seen, heads: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """AtP: scale (a_corrupt - a_clean) . dm/da per residual (layer, position) and per (layer, head)."""
    residual, per_head = [], []
    for layer in range(len(seen.residual)):
        values = [seen.residual[layer], corrupt.residual[layer], seen.heads[layer], corrupt.heads[layer]]
        if any(v is None for v in values):
            raise ParameterError(f"layer {layer} did not run in the model's forward pass")
        clean_r, corrupt_r, clean_h, corrupt_h = values
        grad_r = seen.residual_grad[layer] if seen.residual_grad[layer] is not None else torch.zeros_like(clean_r)
        grad_h = seen.heads_grad[layer] if seen.heads_grad[layer] is not None else torch.zeros_like(clean_h)
        residual.append(((corrupt_r - clean_r).double() * grad_r.double()).sum(-1))  # type: ignore[operator]
        product = (corrupt_h - clean_h).double() * grad_h.double()  # type: ignore[operator]
        per_head.append(product.view(product.shape[0], heads, -1).sum((0, 2)))
    return scale * torch.stack(residual).cpu().numpy(), scale * torch.stack(per_head).cpu().numpy()


def _exact(model: Any, net: nn.Module, parts: Components, encoded: Any, x: torch.Tensor, goal: Target, corrupt: _Seen,
           scale: float, clean_value: float, batch_size: int | None, kinds: tuple[str, ...]
           ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Activation patching: one row per component of ``kinds`` (every layer's every position, then
    every layer's every head), each patched alone; m(row) - m(clean)."""
    layers, length, heads = len(parts.layers), encoded.length, parts.heads
    residual_rows = torch.cartesian_prod(torch.arange(layers), torch.arange(length))[:layers * length * ("residual" in kinds)]
    head_rows = torch.cartesian_prod(torch.arange(layers), torch.arange(heads))[:layers * heads * ("heads" in kinds)]
    plan = _Plan(kind=torch.cat([torch.zeros(len(residual_rows), dtype=torch.long), torch.ones(len(head_rows), dtype=torch.long)]),
                 layer=torch.cat([residual_rows[:, 0], head_rows[:, 0]]), index=torch.cat([residual_rows[:, 1], head_rows[:, 1]]))
    rows = x[None].expand(len(plan.kind), *x.shape)
    with _patching(net, parts, plan, corrupt, scale) as state, torch.no_grad():
        values, _ = model.score_inputs(encoded, rows, goal, grad=False, batch_size=batch_size)
    if state["offset"] != len(rows):  # the plan assumes the rows reach the model once each, in order
        raise ModelOutputError(f"{len(rows)} patched rows were sent but the model saw {state['offset']}; "
                               "this adapter batches rows in a way exact patching cannot follow")
    change = values.double().cpu().numpy() - clean_value
    split = len(residual_rows)
    return (change[:split].reshape(layers, length) if split else None,
            change[split:].reshape(layers, heads) if len(head_rows) else None)
