"""Gradients of several targets from one forward pass (models/passes.py ``shared_forward``): every
generated token of a causal LM is explained from one forward row per input row, the backward
vmapped over the targets, and the result equals one explanation per target.

Tolerance 1e-12: both sides run the same float64 operations (norms patched to float64, see
tests/models/test_contrast.py); only the batching of the backward differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from models.test_contrast import float64_llama
from salience.models.passes import gradients_of_outputs, one_target_per_backward
from tiny_lm import build_tokenizer

PROMPT = "the capital of france is"
CONTINUATION = " paris is a big city"  # 5 generated tokens: 5 targets
TOL = 1e-12
pytestmark = pytest.mark.filterwarnings("ignore:integrated_gradients. completeness delta")  # 4 steps: not the point here


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(float64_llama(), build_tokenizer(), name="tiny-llama")


@pytest.mark.parametrize("method, params, forward_rows", [("saliency", {"abs": False}, 1),
                                                          ("input_x_gradient", {}, 1),
                                                          ("integrated_gradients", {"steps": 4}, 4 + 2)])
def test_all_targets_from_one_forward_equal_one_run_per_target(lm, method, params, forward_rows):
    together = salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION, **params)
    alone = np.stack([salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION, target=[t], **params).scores[0]
                      for t in range(5)])
    np.testing.assert_allclose(together.scores, alone, rtol=0, atol=TOL, equal_nan=True)
    # one forward row per input row (IG: its 4 path points, plus the input and the baseline), 5 backward rows each
    assert together.cost.forward_passes == forward_rows
    assert together.cost.backward_passes == 5 * (forward_rows - 2 if method == "integrated_gradients" else forward_rows)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_chunking_of_rows_and_target_groups_changes_nothing(lm, batch_size):
    # batch_size 1: one row and one target per backward; 3: target groups of 3 (5 = 3 + 2), the forward graph kept
    # between them; 64: everything at once
    reference = salience.explain(lm, PROMPT, method="integrated_gradients", continuation=CONTINUATION, steps=4, batch_size=1000)
    chunked = salience.explain(lm, PROMPT, method="integrated_gradients", continuation=CONTINUATION, steps=4, batch_size=batch_size)
    np.testing.assert_allclose(chunked.scores, reference.scores, rtol=0, atol=TOL, equal_nan=True)


def test_gradients_of_outputs_is_the_jacobian_per_row():
    torch.manual_seed(0)
    inputs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 5, dtype=torch.float64)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda x: torch.tanh(x @ weights), inputs[b].detach())
                            for b in range(3)])  # (3, 5, 4)
    for group in (1, 2, 5):
        values = torch.tanh(inputs @ weights)  # (3 rows, 5 targets); row b depends on inputs[b] only
        got = gradients_of_outputs(values, inputs, group)
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    # one plain backward per target (AttnLRP's way: its rules trace each backward), the graph kept
    starts: list[int] = []
    values = torch.tanh(inputs @ weights)
    with one_target_per_backward(lambda: starts.append(len(starts))):
        got = gradients_of_outputs(values, inputs, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    assert starts == [0, 1, 2, 3, 4]  # called before each of the 5 targets' backward


@pytest.mark.parametrize("target_span", [None, [(0, 2), (2, 5)], [(0, 3), (1, 4)]])
def test_output_head_run_backward_once_when_targets_read_disjoint_positions(lm, monkeypatch, target_span):
    # tokens and non-overlapping spans read disjoint positions: the head's backward is shared (models/head_split.py);
    # overlapping spans fall back to the vmapped backward through the head. Both equal one run per target.
    from salience.models import causal_lm

    used = []
    original = causal_lm.per_target_gradients
    monkeypatch.setattr(causal_lm, "per_target_gradients", lambda *a, **k: used.append(1) or original(*a, **k))
    options = {} if target_span is None else {"target_span": target_span, "output": "log_probability"}
    together = salience.explain(lm, PROMPT, method="input_x_gradient", continuation=CONTINUATION, **options)
    count = len(together.targets)
    one_by_one = [{"target": [t]} for t in range(count)] if target_span is None else \
        [{"target_span": [span], "output": "log_probability"} for span in target_span]
    alone = np.stack([salience.explain(lm, PROMPT, method="input_x_gradient", continuation=CONTINUATION, **single).scores[0]
                      for single in one_by_one])
    np.testing.assert_allclose(together.scores, alone, rtol=0, atol=TOL, equal_nan=True)
    assert bool(used) == (target_span != [(0, 3), (1, 4)])
