"""Every architecture in the facts table loads through load_model and satisfies the identities.

Random tiny configs with the toy WordPiece tokenizer: the architecture facts under test concern
the model (embedding layer, token types, position ids), not the tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizerFast

import salience
from salience.models.arch import ARCHITECTURES
from toy import write_vocab

SHAPE = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
         "max_position_embeddings": 40, "num_labels": 3}
EXTRA = {
    "distilbert": {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32},
    "albert": {"embedding_size": 8},
    "electra": {"embedding_size": 16},
    "deberta-v2": {"type_vocab_size": 0},
    "roberta": {"pad_token_id": 0},
    "xlm-roberta": {"pad_token_id": 0},
    "camembert": {"pad_token_id": 0},
    "mpnet": {"pad_token_id": 0},
}
TYPES = sorted(t for t in ARCHITECTURES if t not in ("modernbert",))


@pytest.mark.parametrize("model_type", TYPES)
def test_architecture_round_trip(model_type, tmp_path):
    torch.manual_seed(0)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(tmp_path)), do_lower_case=True)
    config = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, **SHAPE, **EXTRA.get(model_type, {}))
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    adapter = salience.load_model(str(tmp_path))
    adapter.model.double()
    assert adapter.embedding_layer is adapter.model.get_submodule(ARCHITECTURES[model_type].word_embeddings)
    text = "the film was good and the plot was dull"  # no [UNK]: id 1 is padding to MPNet's position ids
    ig = salience.explain(adapter, text, method="ig", output="logit", steps=64)
    assert abs(ig.delta) < 1e-3 * max(1.0, abs(ig.output_value - ig.baseline_value))
    sig = salience.explain(adapter, text, method="sig", output="logit")
    loo = salience.explain(adapter, text, method="occlusion", output="logit")
    np.testing.assert_allclose(sig.scores, loo.scores, atol=1e-10)
    pair = salience.explain(adapter, ("the film was good", "it is dull"), method="kernel_shap", output="logit")
    assert pair.scores.sum() == pytest.approx(pair.output_value - pair.baseline_value, abs=1e-9)
