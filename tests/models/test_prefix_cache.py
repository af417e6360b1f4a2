"""Replacement rows of a causal LM run over the key/value cache of their unchanged prefix
(models/prefix_cache.py): the outputs equal full forward passes, the rows counted stay within
occlusion's bound, and the positions taken from the cache are counted.

Tolerance 1e-12: the tiny Llama computes in float64 (norms patched, see
tests/models/test_contrast.py); a cached prefix gives the same keys and values, and only the
shapes of the matmuls differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import salience
from models.test_contrast import float64_llama
from salience.core.explanation import Explanation
from salience.models.prefix_cache import first_changed
from salience.render.layout import describe
from tiny_lm import VOCAB, build_tokenizer

PROMPT = "the capital of france is"
CONTINUATION = " paris is a big city"
TOL = 1e-12


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(float64_llama(), build_tokenizer(), name="tiny-llama")


def explain(lm: salience.CausalLM, reuse: bool, method: str, **params: object) -> Explanation:
    lm.reuses_prefix = reuse
    try:
        return salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION, baseline="unk", **params)
    finally:
        lm.reuses_prefix = True


@pytest.mark.parametrize("method, params", [("occlusion", {}), ("kernel_shap", {"n_samples": 32}), ("lime", {"n_samples": 32})])
@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_cached_prefix_gives_the_outputs_of_full_passes(lm, method, params, batch_size):
    cached = explain(lm, True, method, batch_size=batch_size, **params)
    full = explain(lm, False, method, batch_size=batch_size, **params)
    np.testing.assert_allclose(cached.scores, full.scores, rtol=0, atol=TOL, equal_nan=True)
    assert cached.cost.forward_passes <= full.cost.forward_passes
    assert full.cost.cached_positions == 0


def test_occlusion_rows_and_saved_positions(lm):
    # one row per token replaced, each run from its own position when chunks hold one row, plus the input's row
    e = explain(lm, True, "occlusion", batch_size=1)
    encoded = lm.encode(PROMPT, continuation=CONTINUATION)
    movable = [i for i in range(encoded.length) if not bool(encoded.special[i])]
    assert e.cost.forward_passes == len(movable) + 1 <= encoded.length + 1  # prompt + generated + 1 at most
    assert e.cost.cached_positions == sum(movable)  # row i reuses positions 0..i-1
    assert f"({sum(movable)} token positions from a cache)" in describe(e)


def test_cost_with_cached_positions_round_trips_and_old_json_loads(lm):
    e = explain(lm, True, "occlusion", batch_size=1)
    again = Explanation.from_json(e.to_json())
    assert again.cost == e.cost and again.cost.cached_positions > 0
    data = e.to_dict()
    del data["cost"]["cached_positions"]  # written before the field existed
    assert Explanation.from_dict(data).cost.cached_positions == 0


def test_first_changed_position():
    reference = torch.tensor([5, 6, 7, 8])
    rows = torch.tensor([[5, 6, 7, 8], [0, 6, 7, 8], [5, 6, 0, 0]])
    assert first_changed(rows, reference).tolist() == [4, 0, 2]


# families whose attention or cache differ from Llama's: learned absolute positions (GPT-2, OPT, whose
# positions come from the attention mask), ALiBi (Bloom), partial rotary (GPT-NeoX), parallel blocks (Falcon)
FAMILIES = {
    "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 32},
    "opt": {"ffn_dim": 32, "word_embed_proj_dim": 16},
    "bloom": {"n_layer": 2, "n_head": 4},
    "gpt_neox": {},
    "falcon": {},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_prefix_equals_full_passes_in_other_families(family):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                  **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config).double().eval()
    other = salience.CausalLM(model, build_tokenizer(), name=f"tiny-{family}")
    cached = explain(other, True, "occlusion", batch_size=3)
    full = explain(other, False, "occlusion", batch_size=3)
    assert cached.cost.cached_positions > 0
    np.testing.assert_allclose(cached.scores, full.scores, rtol=0, atol=TOL, equal_nan=True)
