"""The model-size ladder for sentiment: MiniLM cut to 2, 4 and 6 layers, and SmolLM2-135M with a head.

* ``zoo:minilm-l{2,4,6}-sentiment``: all-MiniLM-L6-v2 cut to its first k encoder layers
  (:func:`cut_to_layers`), then fine-tuned *in full* (embeddings, the k layers, pooler and a new
  classifier) on the ``"train"`` split of
  :func:`salience.datasets.movie_snippets.split_movie_snippets` (epoch chosen on ``"validation"``,
  ``"test"`` held out). ``scripts/train_size_ladder.py minilm`` writes their float32 weights
  (62-91 MB each) to ``cache_dir()/ladder/`` with a JSON training record. The 6-layer model, the
  zoo's default text classifier, also ships in the package, packed by ``... pack --layers 6`` as
  an int8 difference from all-MiniLM-L6-v2 (16 MB, :mod:`salience.zoo.weight_delta`); the 2- and
  4-layer models load from the cache, and :func:`build_minilm_ladder` raises a one-line
  :class:`ModelLoadError` naming the training command while they are missing.
* ``zoo:smollm2-sentiment-head``: SmolLM2-135M-Instruct (``zoo:smollm2-135m``) with its body
  frozen and a linear head (2 x 576, no bias) on the final (normed) hidden state of the *last*
  token of the text, i.e. a ``LlamaForSequenceClassification`` (the last token is the only one
  that has read the whole text in a causal LM). Trained by ``scripts/train_size_ladder.py
  smollm2-head`` on the same split; the head is small and ships as
  ``smollm2_sentiment_head.safetensors`` (+ ``.json`` record).

Labels of all four: 0 = ``negative``, 1 = ``positive``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from salience.assets import cache_dir, minilm_base_path
from salience.errors import ModelLoadError, ParameterError
from salience.zoo.minilm_sentiment import ID2LABEL, LABEL2ID, build_base_classifier, minilm_base_state

LADDER_LAYERS = (2, 4, 6)
TRAIN_SCRIPT = "scripts/train_size_ladder.py"
HEAD_WEIGHTS_PATH = Path(__file__).with_name("smollm2_sentiment_head.safetensors")
HEAD_METADATA_PATH = Path(__file__).with_name("smollm2_sentiment_head.json")


def ladder_dir() -> Path:
    """Where the trained ladder MiniLMs are written and read: ``cache_dir()/ladder``."""
    return cache_dir() / "ladder"


def ladder_weights_path(layers: int) -> Path:
    """The float32 safetensors file of the k-layer model (every parameter, fine-tuned in full)."""
    return ladder_dir() / f"minilm_l{layers}_sentiment.safetensors"


def ladder_metadata_path(layers: int) -> Path:
    """The JSON training record (accuracies, hyper-parameters, command) of the k-layer model."""
    return ladder_dir() / f"minilm_l{layers}_sentiment.json"


def _check_layers(layers: int) -> None:
    if layers not in LADDER_LAYERS:
        raise ParameterError(f"the MiniLM ladder has {', '.join(map(str, LADDER_LAYERS))} layers, not {layers}")


def cut_to_layers(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """Keep the first ``layers`` encoder layers of a BERT-style model (in place; returns it).

    Works on a ``BertModel`` or a model holding one as ``.bert`` (``BertForSequenceClassification``):
    the encoder's ``layer`` list is truncated and ``config.num_hidden_layers`` updated, so the cut
    model's last hidden state equals the full model's ``hidden_states[layers]`` (the output of
    layer ``layers - 1``) and the pooler then reads it.

    Raises:
        ParameterError: ``layers`` is not between 1 and the model's number of layers.
    """
    body = getattr(model, "bert", model)
    encoder = getattr(body, "encoder", None)
    if encoder is None or not isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        raise ParameterError(f"cannot cut {type(model).__name__}: it has no BERT encoder layer list")
    total = len(encoder.layer)
    if not 1 <= layers <= total:
        raise ParameterError(f"cannot cut a {total}-layer model to {layers} layers")
    encoder.layer = nn.ModuleList(list(encoder.layer)[:layers])
    model.config.num_hidden_layers = layers
    if body is not model:
        body.config.num_hidden_layers = layers
    return model


def build_cut_base(layers: int) -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """All-MiniLM-L6-v2 cut to its first ``layers`` layers, with a random classifier (from torch's
    global RNG: seed it). The starting point of the training script."""
    _check_layers(layers)
    model, tokenizer = build_base_classifier()
    return cut_to_layers(model, layers), tokenizer


def shipped_delta_path(layers: int) -> Path:
    """Where the k-layer model ships inside the package as an int8 difference from all-MiniLM-L6-v2
    (:mod:`salience.zoo.weight_delta`); only the 6-layer model (the zoo default) ships."""
    return Path(__file__).with_name(f"minilm_l{layers}_sentiment.safetensors")


def shipped_metadata_path(layers: int) -> Path:
    """The training record of a shipped rung, with the packing check (accuracy of the rebuilt weights)."""
    return Path(__file__).with_name(f"minilm_l{layers}_sentiment.json")


def build_minilm_ladder(layers: int) -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """Load ``zoo:minilm-l{layers}-sentiment`` (eval mode) and the MiniLM tokenizer.

    A rung that ships in the package (the 6-layer model) is rebuilt from its int8 weight
    difference and the all-MiniLM-L6-v2 asset; the others are read from the training script's
    float32 output in the user's cache.

    Raises:
        ParameterError: ``layers`` is not 2, 4 or 6.
        ModelLoadError: the weights have not been built on this machine (the message names the
            command that builds them) or do not fit the model.
        AssetMissingError: the MiniLM package is not installed.
    """
    from salience.zoo.weight_delta import decode_delta

    _check_layers(layers)
    shipped = shipped_delta_path(layers)
    if shipped.is_file():
        base = minilm_base_state()
        record = json.loads(shipped_metadata_path(layers).read_text(encoding="utf-8"))
        checksums = record.get("shipped", {}).get("base_checksums")
        return _ladder_classifier(layers, decode_delta(load_file(shipped), base, checksums), shipped.name)
    return build_cached_ladder(layers)


def build_cached_ladder(layers: int) -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """Load the k-layer model from the training script's float32 weights in the cache (what
    ``scripts/train_size_ladder.py minilm`` wrote; the shipped 6-layer model is packed from it).

    Raises:
        ModelLoadError: the weights are not built on this machine (the message names the command).
    """
    _check_layers(layers)
    path = ladder_weights_path(layers)
    if not path.is_file():
        raise ModelLoadError(f"zoo:minilm-l{layers}-sentiment is not built on this machine (no {path}): "
                             f"run `python {TRAIN_SCRIPT} minilm --layers {layers}` (about 10-30 min on 2 cores)")
    return _ladder_classifier(layers, load_file(path), path.name)


def _ladder_classifier(layers: int, state: dict[str, torch.Tensor],
                       source: str) -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    from transformers import AutoTokenizer

    base = minilm_base_path()
    config = BertConfig.from_pretrained(base, num_labels=2, id2label=dict(ID2LABEL), label2id=dict(LABEL2ID),
                                        num_hidden_layers=layers, local_files_only=True)
    model = BertForSequenceClassification(config)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{source} does not fit a {layers}-layer MiniLM classifier "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.eval()
    return model, AutoTokenizer.from_pretrained(base, use_fast=True, local_files_only=True)


def lm_head_classifier(lm: PreTrainedModel, weight: torch.Tensor, *, pad_token_id: int) -> PreTrainedModel:
    """A ``*ForSequenceClassification`` sharing the body of causal LM ``lm`` (not copied), with the
    linear head ``weight`` (C, H), no bias, on the final hidden state of the last non-pad token.

    Class logits: ``weight @ h_last`` where ``h_last`` is the body's output (after its final norm)
    at the last position whose id is not ``pad_token_id`` (padding on either side is skipped).
    Labels are ``negative``/``positive`` when C = 2.

    Raises:
        ParameterError: ``weight`` is not (C, hidden size).
    """
    hidden = lm.config.hidden_size
    if weight.ndim != 2 or weight.shape[1] != hidden:
        raise ParameterError(f"the head weight must be (classes, {hidden}), not {tuple(weight.shape)}")
    config = copy.deepcopy(lm.config)
    config.num_labels = weight.shape[0]
    if weight.shape[0] == 2:
        config.id2label, config.label2id = dict(ID2LABEL), dict(LABEL2ID)
    config.pad_token_id = pad_token_id
    config.architectures = [lm.config.architectures[0].replace("ForCausalLM", "ForSequenceClassification")] \
        if lm.config.architectures else None
    with torch.device("meta"):  # no 135 M-parameter random init: the body is the LM's own
        classifier = AutoModelForSequenceClassification.from_config(config)
    prefix = classifier.base_model_prefix
    setattr(classifier, prefix, getattr(lm, prefix))
    dtype = next(lm.parameters()).dtype
    score = nn.Linear(hidden, weight.shape[0], bias=False, dtype=dtype, device=weight.device)
    with torch.no_grad():
        score.weight.copy_(weight)
    classifier.score = score
    leftover = [n for n, p in classifier.named_parameters() if p.is_meta]
    if leftover:
        raise ModelLoadError(f"the head classifier kept uninitialised parameters: {leftover[:3]}")
    classifier.eval()
    return classifier


def load_head_metadata() -> dict[str, Any]:
    """The training record of ``zoo:smollm2-sentiment-head`` (accuracies, hyper-parameters, ...)."""
    return json.loads(HEAD_METADATA_PATH.read_text(encoding="utf-8"))


def build_smollm2_sentiment_head() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``zoo:smollm2-sentiment-head``: SmolLM2-135M-Instruct's frozen body + the shipped head.

    Raises:
        ModelLoadError: the head file is missing (run ``scripts/train_size_ladder.py smollm2-head``).
        AssetMissingError: SmolLM2 is not installed.
    """
    from salience.zoo.smollm2 import build_smollm2

    if not HEAD_WEIGHTS_PATH.is_file():
        raise ModelLoadError(f"zoo head weights missing: {HEAD_WEIGHTS_PATH} (run `python {TRAIN_SCRIPT} smollm2-head`)")
    lm, tokenizer = build_smollm2()
    weight = load_file(HEAD_WEIGHTS_PATH)["score.weight"]
    return lm_head_classifier(lm, weight.to(next(lm.parameters()).dtype), pad_token_id=tokenizer.pad_token_id), tokenizer
