"""The one place that splits work into chunks and loops over them.

Methods describe *what* to evaluate (N rows); :func:`map_batches` evaluates it in chunks whose size
comes from :func:`choose_batch_size` (a user's ``batch_size``, a memory budget, or the default) and
concatenates the results, so every method batches the same way. Rows of different lengths (words
deleted) are cut into length buckets by :func:`length_chunks` and run by :func:`map_chunks`.

Chunk sizes are work budgets in positions per chunk (rows x positions per row): tokens for token
models (:data:`TOKENS`), pixels for images (:data:`PIXELS`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from salience.errors import ParameterError

T = TypeVar("T", torch.Tensor, tuple[torch.Tensor, ...])

# Default work per chunk, in tokens (rows x sequence length). Measured on 2 CPU cores with
# BERT-shaped models (benchmarks/): throughput is flat above these sizes, and they keep the
# activations of a BERT-base chunk well under 1 GB.
FORWARD_TOKENS_PER_CHUNK = 4096
BACKWARD_TOKENS_PER_CHUNK = 2048
MAX_ROWS_PER_CHUNK = 256
# Fixed cost of one model call in tokens of work (per-call overhead and small-batch inefficiency:
# on 2 CPU cores a 1-row call of 32 tokens costs about as much as 4-8 rows in a large batch).
CALL_COST_TOKENS = 128
# Default work per chunk for images, in pixels (rows x height x width): 8 rows of 224 x 224.
# Measured with EfficientNet-Lite0 (float32, CPU, 1 thread, best of repeats): forward
# 69-83 ms per row at 1-8 rows per call, 108 at 16; forward + backward 165-198 ms per row at 1-8,
# 185 at 16, 268 at 32. Larger chunks only cost memory (a backward row keeps about 85 MiB).
FORWARD_PIXELS_PER_CHUNK = 8 * 224 * 224
BACKWARD_PIXELS_PER_CHUNK = 8 * 224 * 224

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(value: int | str) -> int:
    """``"2GB"``, ``"512MiB"`` or a byte count -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ParameterError(f"cannot read memory size {value!r}; write it like '2GB' or '512MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class WorkBudget:
    """Default work per chunk in positions (rows x positions per row), without and with gradients."""

    forward: int
    backward: int


TOKENS = WorkBudget(FORWARD_TOKENS_PER_CHUNK, BACKWARD_TOKENS_PER_CHUNK)
PIXELS = WorkBudget(FORWARD_PIXELS_PER_CHUNK, BACKWARD_PIXELS_PER_CHUNK)


# Share of an accelerator's free memory that a method's default chunks may take (activations of one
# chunk): the CPU budgets above make 8-row image chunks, which leave a GPU idle (EfficientNet-Lite0
# on an H200: 0.65 ms per forward row at 8 rows a call, 0.105 ms at 128; benchmarks/RESULTS-image-methods-gpu.md).
ACCELERATOR_MEMORY_SHARE = 0.5


def default_memory_budget(device: torch.device | str | None) -> int | None:
    """Bytes a default chunk may use on ``device``: half of a CUDA device's free memory (measured
    when called), None on a CPU (the work budgets above apply there)."""
    if device is None or torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * ACCELERATOR_MEMORY_SHARE)


def choose_batch_size(
    seq_len: int,
    *,
    backward: bool,
    batch_size: int | None = None,
    max_memory: int | str | None = None,
    bytes_per_row: int | None = None,
    budget: WorkBudget = TOKENS,
) -> int:
    """Rows per chunk for inputs of ``seq_len`` positions (tokens, or pixels with ``budget=PIXELS``).

    An explicit ``batch_size`` wins. With ``max_memory`` and the model's estimated activation bytes
    per row (``bytes_per_row``, see the adapter), the chunk fits the budget. Otherwise the work
    ``budget`` per chunk is used (smaller when gradients are needed).
    """
    if batch_size is not None:
        if batch_size < 1:
            raise ParameterError(f"batch_size must be at least 1, got {batch_size}")
        return batch_size
    seq_len = max(seq_len, 1)
    if max_memory is not None and bytes_per_row:
        return max(1, min(MAX_ROWS_PER_CHUNK, parse_memory(max_memory) // bytes_per_row))
    positions = budget.backward if backward else budget.forward
    return max(1, min(MAX_ROWS_PER_CHUNK, positions // seq_len))


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def map_batches(fn: Callable[[slice], T], n: int, size: int) -> T:
    """Evaluate ``fn`` on chunks of ``range(n)`` and concatenate the results along dim 0.

    ``fn`` returns a tensor or a tuple of tensors, each with one row per index of its slice.
    """
    if n == 0:
        raise ValueError("map_batches needs at least one row")
    return map_chunks(fn, list(chunks(n, size)))


def length_chunks(lengths: Sequence[int], *, max_tokens: int, max_rows: int = MAX_ROWS_PER_CHUNK,
                  call_cost: int = CALL_COST_TOKENS) -> list[slice]:
    """Consecutive chunks of rows sorted by ``lengths`` (ascending), each run padded to its longest row.

    Minimises padded tokens + ``call_cost`` per chunk (dynamic programming over cut points), with at
    most ``max_rows`` rows and ``rows x longest <= max_tokens`` tokens per chunk (a single row
    always fits). Rows of equal length give the fewest, fullest chunks.
    """
    widths = np.asarray(lengths, dtype=np.int64)
    n = len(widths)
    if n and np.any(np.diff(widths) < 0):
        raise ValueError("length_chunks needs lengths sorted ascending")
    best = np.zeros(n + 1)  # best[j]: least cost of rows [0, j)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        width = max(int(widths[j - 1]), 1)
        rows = max(1, min(max_rows, max_tokens // width, j))
        starts = np.arange(j - rows, j)
        costs = best[starts] + (j - starts) * width + call_cost
        pick = int(np.argmin(costs))
        best[j], cut[j] = costs[pick], starts[pick]
    pieces = []
    j = n
    while j > 0:
        pieces.append(slice(int(cut[j]), j))
        j = int(cut[j])
    return pieces[::-1]


def map_chunks(fn: Callable[[slice], T], pieces: list[slice]) -> T:
    """Like :func:`map_batches`, over given consecutive ``pieces`` (e.g. from :func:`length_chunks`)."""
    if not pieces:
        raise ValueError("map_chunks needs at least one chunk")
    parts = [fn(piece) for piece in pieces]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))  # type: ignore[return-value]
    return torch.cat(parts)  # type: ignore[arg-type]
