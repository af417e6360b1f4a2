"""Every architecture in the facts table loads through load_model, attributes at the right layer
and satisfies the identities.

Random tiny configs with the toy WordPiece tokenizer: the architecture facts under test concern
the model (embedding layer, token types, position ids), not the tokenizer.

The layer is checked without Salience's facts table: the word-embedding module is found through
Hugging Face's own attribute names (``model.base_model.embeddings.word_embeddings``); changing its
output must change the logits (it is on the path), and input x gradient and integrated gradients
must equal Captum's layer methods on that module, which attribute to its output before position
(and token-type) embeddings are added. Hooking the whole embedding block instead would differ.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizerFast

import salience
from oracles import require
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
    text = "the film was good and the plot was dull"  # no [UNK]: id 1 is padding to MPNet's position ids
    _check_attributed_layer(adapter, text)
    ig = salience.explain(adapter, text, method="ig", output="logit", steps=64)
    assert abs(ig.delta) < 1e-3 * max(1.0, abs(ig.output_value - ig.baseline_value))
    sig = salience.explain(adapter, text, method="sig", output="logit")
    loo = salience.explain(adapter, text, method="occlusion", output="logit")
    np.testing.assert_allclose(sig.scores, loo.scores, atol=1e-10)
    pair = salience.explain(adapter, ("the film was good", "it is dull"), method="kernel_shap", output="logit")
    assert pair.scores.sum() == pytest.approx(pair.output_value - pair.baseline_value, abs=1e-9)


def _check_attributed_layer(adapter, text: str) -> None:
    captum_attr = require("captum.attr")
    model = adapter.model
    words = model.base_model.embeddings.word_embeddings  # by Hugging Face's names, not Salience's table
    enc = adapter.tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"].bool()
    types = enc["token_type_ids"] if "token_type_ids" in inspect.signature(model.forward).parameters else None

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        extra = {} if types is None else {"token_type_ids": types.expand(input_ids.shape[0], -1)}
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra).logits

    # the module's output is on the path to the logits: adding 1 to one dimension of it changes them
    with torch.no_grad():
        clean = logits(ids)
        handle = words.register_forward_hook(lambda _m, _i, out: out + torch.eye(out.shape[1], out.shape[2])[2])
        try:
            shifted = logits(ids)
        finally:
            handle.remove()
    assert (shifted - clean).abs().max() > 1e-6  # random tiny models: logit changes are ~1e-3 or more

    target = int(clean[0].argmax())
    ixg = salience.explain(adapter, text, method="input_x_gradient", output="logit", target=target, level="token")
    reference = captum_attr.LayerGradientXActivation(logits, words).attribute(ids, target=target)[0].sum(-1)
    # float64 on both sides, the same gradient: round-off only
    np.testing.assert_allclose(ixg.token_scores, reference.detach().numpy(), rtol=1e-9, atol=1e-12)

    steps = 32
    ig = salience.explain(adapter, text, method="ig", output="logit", target=target, level="token", steps=steps,
                          rule="gausslegendre", baseline="pad")
    baseline = torch.where(special, ids, adapter.tokenizer.pad_token_id)
    reference = captum_attr.LayerIntegratedGradients(logits, words).attribute(
        ids, baselines=baseline, target=target, n_steps=steps, method="gausslegendre")[0].sum(-1).detach().numpy()
    # Captum keeps its Gauss-Legendre weights in float32 (~6e-8 relative each): 1e-6 of the top score
    np.testing.assert_allclose(ig.token_scores, reference, rtol=0, atol=1e-6 * np.abs(reference).max())


def gpt2_classifier(folder, *, pad_in_config: bool = True) -> salience.TextClassifier:
    """A tiny GPT-2 sequence classifier (it reads its last non-padding token) with a WordPiece tokenizer
    that has [PAD] and [UNK] but no [MASK]."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(folder)), do_lower_case=True, mask_token=None)
    assert tokenizer.mask_token_id is None
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=40, num_labels=2,
                        initializer_range=0.5, pad_token_id=tokenizer.pad_token_id if pad_in_config else None)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return salience.load_model(str(folder))


def test_a_decoder_classifier_defaults_to_a_baseline_its_tokenizer_has_and_that_is_not_padding(tmp_path):
    """No [MASK]; [PAD] is the padding token the head skips when it looks for the last token, so a
    perturbation replacing the last token by it would move what the head reads: the default is the
    next baseline, [UNK] (recorded in params, equal to giving it), and 'pad' is refused for
    perturbation methods (gradient methods replace embeddings, not ids: allowed)."""
    adapter = gpt2_classifier(tmp_path)
    assert adapter.reads_last_token and adapter.baselines == ("unk", "zero", "delete")
    for method in ("occlusion", "sig"):
        default = salience.explain(adapter, "the film was good", method=method, output="logit")
        given = salience.explain(adapter, "the film was good", method=method, output="logit", baseline="unk")
        assert default.params["baseline"] == "unk"
        np.testing.assert_allclose(default.scores, given.scores, rtol=0, atol=1e-12)
    with pytest.raises(salience.ParameterError, match="'pad' is .* padding token, and its head reads the last non-padding"):
        salience.explain(adapter, "the film was good", method="occlusion", baseline="pad")
    assert salience.explain(adapter, "the film was good", method="ig", baseline="pad").params["baseline"] == "pad"
    # the hazard refused: the last token replaced by [PAD] makes the head read the token before it
    ids = adapter.encode("the film was good").input_ids[None]
    padded = ids.clone()
    padded[0, -1] = adapter.tokenizer.pad_token_id
    with torch.no_grad():
        assert torch.allclose(adapter.model(padded).logits, adapter.model(ids[:, :-1]).logits, atol=1e-6)


def test_a_decoder_classifier_without_pad_token_id_is_refused_in_batches(tmp_path):
    adapter = gpt2_classifier(tmp_path, pad_in_config=False)
    with pytest.raises(salience.ParameterError, match="no pad_token_id, so transformers runs one row at a time"):
        salience.explain(adapter, "the film was good", method="occlusion")
    assert salience.explain(adapter, "the film was good", method="occlusion", batch_size=1).scores.shape == (4,)
