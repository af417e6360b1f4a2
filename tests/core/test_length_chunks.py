"""Length buckets for rows of different lengths: a partition of the sorted rows that respects the
caps and minimises padded tokens + a fixed cost per call (checked against brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from salience.core.batching import length_chunks


def _cost(lengths: list[int], pieces: list[slice], call_cost: int) -> int:
    return sum((p.stop - p.start) * lengths[p.stop - 1] + call_cost for p in pieces)


def _feasible(lengths: list[int], pieces: list[slice], max_tokens: int, max_rows: int) -> bool:
    return all(p.stop - p.start == 1 or ((p.stop - p.start) <= max_rows and (p.stop - p.start) * lengths[p.stop - 1] <= max_tokens)
               for p in pieces)


def _brute_force(lengths: list[int], max_tokens: int, max_rows: int, call_cost: int) -> int:
    n = len(lengths)
    best = None
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        pieces = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        if _feasible(lengths, pieces, max_tokens, max_rows):
            cost = _cost(lengths, pieces, call_cost)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(1, 40, size=int(rng.integers(1, 11))).tolist())
    max_tokens, max_rows, call_cost = int(rng.integers(20, 200)), int(rng.integers(1, 8)), int(rng.integers(0, 60))
    pieces = length_chunks(lengths, max_tokens=max_tokens, max_rows=max_rows, call_cost=call_cost)
    assert [p.start for p in pieces][0] == 0 and pieces[-1].stop == len(lengths)
    assert all(a.stop == b.start for a, b in zip(pieces[:-1], pieces[1:]))  # consecutive, nothing lost or repeated
    assert _feasible(lengths, pieces, max_tokens, max_rows)
    assert _cost(lengths, pieces, call_cost) == _brute_force(lengths, max_tokens, max_rows, call_cost)


def test_equal_lengths_give_the_fewest_fullest_chunks():
    pieces = length_chunks([32] * 300, max_tokens=4096, max_rows=256)
    assert len(pieces) == 3  # ceil(300 / (4096 // 32)); every split into 3 chunks pads nothing


def test_short_rows_are_not_padded_to_long_ones():
    pieces = length_chunks([4] * 100 + [64] * 10, max_tokens=4096, max_rows=256, call_cost=128)
    assert slice(0, 100) in pieces  # 100 short rows in one call rather than padded to 64 tokens


def test_unsorted_lengths_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        length_chunks([3, 1], max_tokens=100)
