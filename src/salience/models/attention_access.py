"""Attention probabilities of a Hugging Face transformer, and their gradients, for token adapters.

:class:`AttentionAccess` gives a token adapter (text classifier, causal LM) two capabilities:

- ``attention_maps(encoded)``: the attention probabilities (layers, heads, P, P) of one forward pass
  on the unperturbed input (row i = query position i, column j = key position j; each row sums to 1).
- ``attention_gradients(encoded, targets, combine)``: for every target t, the attention
  probabilities A_l and the gradients dy_t/dA_l of the target's output at the unperturbed input,
  from one forward pass and one backward row per target (vmapped over groups of targets).
  ``combine(maps, grads)`` reduces one group's layers to one row per target, so that
  (targets x layers x heads x P x P) gradients are never held at once.

Both read ``output_attentions`` from the model's own outputs (no architecture table): a forward
pre-hook on the model asks for them and a forward hook reads them. Attention kernels that return no probabilities (SDPA, flash, flex) are
switched to eager attention for the call and restored afterwards, errors included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from salience.core.batching import choose_batch_size
from salience.core.target import Target
from salience.errors import ModelOutputError
from salience.models.base import Encoded
from salience.models.passes import frozen_parameters

FUSED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")  # kernels returning no probabilities
# (maps, grads): one chunk's L attention maps (B, H, P, P) and dy/dA of each row's target -> (B, ...)
Combine = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` computes attention eagerly (it returns probabilities); a fused kernel is
    restored on exit, errors included. Other implementations (eager, a registered custom one) stay."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    switch = callable(setter) and previous in FUSED
    if switch:
        setter("eager")  # type: ignore[misc]
    try:
        yield
    finally:
        if switch:
            setter(previous)  # type: ignore[misc]


@contextmanager
def recorded_attentions(model: nn.Module, name: str) -> Iterator[list[list[torch.Tensor]]]:
    """Every call of ``model`` inside returns its attention probabilities (``output_attentions``);
    each call appends its list of L maps (B, H, P, P) (in the graph when gradients are on). Hooks
    removed on exit."""
    calls: list[list[torch.Tensor]] = []

    def ask(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, "output_attentions": True}

    def read(_module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
        maps = getattr(output, "attentions", None)
        if not maps or any(not isinstance(m, torch.Tensor) for m in maps):
            raise ModelOutputError(f"{name} returned no attention probabilities (output_attentions); "
                                   "attention methods need a model whose attention layers return them")
        calls.append(list(maps))

    handles = [model.register_forward_pre_hook(ask, with_kwargs=True), model.register_forward_hook(read, with_kwargs=True)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _unused_maps(name: str) -> ModelOutputError:
    return ModelOutputError(f"{name} returned attention probabilities that its output is not computed from (no gradient "
                            "reaches them: a fused attention kernel not switched to eager?); gradient-weighted attention "
                            "needs the maps the model uses")


class AttentionAccess:
    """Mixin for token adapters (it uses their ``model``, ``name``, ``counter``, ``embedding_layer``,
    ``_call_model``, ``_outputs``, ``_replaced_embeddings`` and ``input_and_baseline``); see the
    module docstring."""

    model: nn.Module
    name: str

    def attention_maps(self, encoded: Encoded) -> torch.Tensor:
        """Attention probabilities (layers, heads, P, P) on the unperturbed input, float64 on the CPU
        (one forward pass, counted)."""
        kwargs: dict[str, torch.Tensor] = {"input_ids": encoded.input_ids[None]}
        if encoded.token_type_ids is not None:
            kwargs["token_type_ids"] = encoded.token_type_ids[None]
        with eager_attention(self.model), recorded_attentions(self.model, self.name) as calls, torch.no_grad():
            self._call_model(**kwargs)  # type: ignore[attr-defined]
        return torch.stack([m[0] for m in calls[0]]).double().cpu()

    def attention_gradients(self, encoded: Encoded, targets: Sequence[Target], combine: Combine,
                            batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``combine(maps, grads)`` for groups of targets, concatenated in the targets' order: (T, ...);
        and every target's output (T,). One forward pass on the unperturbed input (the word
        embeddings are the leaf, parameters frozen) reads every target's output; the backward runs
        once per target, vmapped over groups of targets (``is_grads_batched``; ``batch_size`` or the
        memory-based chunk size per group), the forward graph kept between groups."""
        x, _ = self.input_and_baseline(encoded, "zero")  # type: ignore[attr-defined]
        leaf = x[None].to(x.device).detach().requires_grad_(True)
        length, types = encoded.length, encoded.token_type_ids
        group = choose_batch_size(length, backward=True, batch_size=batch_size)
        results: list[torch.Tensor] = []
        with (eager_attention(self.model), recorded_attentions(self.model, self.name) as calls, frozen_parameters(self.model),
              self._replaced_embeddings(leaf), torch.enable_grad()):  # type: ignore[attr-defined]
            values = self._outputs(encoded.input_ids[None], torch.ones(1, length, dtype=torch.long),  # type: ignore[attr-defined]
                                   None if types is None else types[None], None, list(targets))[0]  # (T,)
            maps = calls[0]
            if not all(m.requires_grad for m in maps):
                raise _unused_maps(self.name)
            count = values.shape[0]
            for start in range(0, count, group):
                stop = min(count, start + group)
                picks = torch.zeros(stop - start, count, dtype=values.dtype, device=values.device)
                picks[torch.arange(stop - start), torch.arange(start, stop)] = 1
                grads = torch.autograd.grad(values, maps, grad_outputs=picks, is_grads_batched=True,
                                            retain_graph=stop < count, allow_unused=True)
                if any(g is None for g in grads):  # (zeros would read as "no relevancy" and say nothing of why)
                    raise _unused_maps(self.name)
                grads = [g[:, 0] for g in grads]
                results.append(combine([m.detach().expand(stop - start, *m.shape[1:]) for m in maps], grads))
        self.counter.backward_passes += count  # type: ignore[attr-defined]
        return torch.cat(results), values.detach()
