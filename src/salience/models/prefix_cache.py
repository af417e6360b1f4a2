"""Reusing the key/value cache of a causal LM's unchanged prefix.

In a causal model the hidden states at positions < i depend on tokens < i only, so a row whose
first replaced token is at position i has the same keys and values as the unperturbed input at
every position before i. Occlusion of token i (and exact SIG, and any replacement of tokens) can
then run positions i..L-1 only, on top of the unperturbed input's cache: the rows' logits are
the same as those of full forward passes (up to the rounding of differently shaped matmuls).

Rows are sorted by their first changed position and run in chunks; a chunk starts at its
earliest changed position. The work saved is counted in token positions
(:attr:`PassCounter.cached_positions`): (rows of the chunk) x (positions taken from the cache).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn


def first_changed(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Index of the first position where each row (B, L) differs from ``reference`` (L,); L for
    a row equal to it."""
    differs = rows != reference[None].to(rows.device)
    return torch.where(differs.any(dim=1), differs.int().argmax(dim=1), rows.shape[1])


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache (``cache`` in transformers 5.x,
    ``past_key_values`` before), or None when it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def returned_cache(output: Any) -> Any:
    """The cache a forward call returned (``cache`` or ``past_key_values``), or None."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def can_reuse(cache: Any) -> bool:
    """Whether ``cache`` can be copied, cut to a prefix and repeated over rows."""
    return cache is not None and hasattr(cache, "crop") and hasattr(cache, "batch_repeat_interleave") \
        and hasattr(cache, "get_seq_length")


def prefix_of(cache: Any, keep: int, rows: int) -> Any:
    """A copy of ``cache`` holding its first ``keep`` positions, repeated for ``rows`` rows (the
    original is left as it is)."""
    copied = copy.deepcopy(cache)
    drop = copied.get_seq_length() - keep
    if drop > 0:
        copied.crop(-drop)  # transformers 5 crops by a negative count of positions to remove
    copied.batch_repeat_interleave(rows)
    return copied
