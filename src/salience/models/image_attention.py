"""Attention probabilities of an image transformer built on torch's ``nn.MultiheadAttention`` (a ViT
as torchvision writes it, or ``nn.TransformerEncoder``), and their gradients, for the image adapter.

Every ``nn.MultiheadAttention`` call is asked for its per-head weights (``need_weights=True,
average_attn_weights=False``: torch then computes them explicitly and its output from them, so
the output may differ from a fused call by rounding) and each call's (N, heads, T, T) weights are
kept in call order: layer l is the l-th call. Only self-attention over the same tokens is read.
Tokens are the input's patch grid after its leading class / register tokens
(:func:`salience.models.layers.token_layout`); a token's score becomes the score of every pixel of
its patch (nearest-neighbour upsampling to the input grid). Hooks are removed on exit, errors
included.

torch returns the weights as a view taken after its output was computed from them: no gradient
reaches that view, so :func:`used_weights` gives the tensor the output was computed from (the
view's base, the same values).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from salience.errors import ModelOutputError, ParameterError
from salience.models.layers import MAX_EXTRA_TOKENS, token_layout

_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
              "is_causal")  # nn.MultiheadAttention.forward's, in order


@contextmanager
def recorded_attention(net: nn.Module, name: str) -> Iterator[list[torch.Tensor]]:
    """Inside, every ``nn.MultiheadAttention`` call of ``net`` returns and appends its per-head
    weights (N, heads, T, T), in the graph when gradients are on."""
    modules = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]
    if not modules:
        raise ParameterError(f"{name} has no nn.MultiheadAttention: attention methods work on text classifiers, "
                             "causal LMs and vision transformers built on it")
    seen: list[torch.Tensor] = []

    def ask(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {**dict(zip(_ARGUMENTS, args)), **kwargs, "need_weights": True, "average_attn_weights": False}

    def read(_module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, torch.Tensor) or weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else None
            raise ModelOutputError(f"{name}: an nn.MultiheadAttention call returned attention weights of shape {shape}, "
                                   "not (N, heads, T, T) over the same tokens (attention methods read self-attention)")
        seen.append(weights)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(ask, with_kwargs=True),
                                            m.register_forward_hook(read, with_kwargs=True))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def called(seen: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    """The recorded weights, or a one-line error when no attention module ran (a fused fast path,
    such as nn.TransformerEncoderLayer's without gradients, calls none)."""
    if not seen:
        raise ModelOutputError(f"{name}'s nn.MultiheadAttention modules did not run in its forward pass (a fused "
                               "fast path?), so no attention weights were recorded")
    return seen


def used_weights(weights: torch.Tensor) -> torch.Tensor:
    """The tensor ``weights`` (a view torch returns) was taken from, which the attention's output was
    computed from: where gradients of the weights are read."""
    base = weights._base
    if base is None:
        return weights
    if base.numel() != weights.numel():
        raise ModelOutputError(f"attention weights of shape {tuple(weights.shape)} are a view of a tensor of "
                               f"{base.numel()} values: not the weights the attention used")
    return base


def patch_layout(tokens: int, grid: tuple[int, int], name: str) -> tuple[int, int, int]:
    """(extra, gh, gw) of ``tokens`` attention tokens over an input ``grid``, or a one-line error."""
    layout = token_layout(tokens, grid)
    if layout is None:
        raise ParameterError(f"{name}'s attention runs over {tokens} tokens: not a grid of patches of the "
                             f"{grid[0]}x{grid[1]} input after at most {MAX_EXTRA_TOKENS} class/register tokens")
    return layout


def query_rows(tokens: int, grid: tuple[int, int], name: str) -> list[int]:
    """The attention rows a classification reads: the first token (the class token) when leading
    tokens precede the patches, else every patch token (a head on the mean of the tokens)."""
    extra, _, _ = patch_layout(tokens, grid, name)
    return [0] if extra else list(range(tokens))


def to_pixels(scores: torch.Tensor, grid: tuple[int, int], name: str) -> torch.Tensor:
    """Token scores (T, tokens) as pixel scores (T, H * W): each pixel takes its patch's score
    (class / register tokens left out)."""
    extra, gh, gw = patch_layout(scores.shape[1], grid, name)
    patches = scores[:, extra:].reshape(scores.shape[0], 1, gh, gw)
    return F.interpolate(patches, size=grid, mode="nearest").reshape(scores.shape[0], -1)
