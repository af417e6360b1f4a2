"""``zoo:minilm-sentiment``: all-MiniLM-L6-v2 fine-tuned for binary movie-review sentiment.

A ``BertForSequenceClassification`` (labels ``negative``/``positive``) whose embeddings and first
five encoder layers are the unchanged all-MiniLM-L6-v2 weights; the last encoder layer, the pooler
and the classifier were trained by ``scripts/train_zoo_minilm.py`` on the ``"train"`` split of
:func:`salience.datasets.movie_snippets.split_movie_snippets` and ship as
``minilm_sentiment.safetensors`` (only the trained parameters). ``minilm_sentiment.json`` records
the training run and its accuracies; the ``"test"`` split was held out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, PreTrainedTokenizerBase

from salience.assets import minilm_base_path
from salience.errors import ModelLoadError

WEIGHTS_PATH = Path(__file__).with_name("minilm_sentiment.safetensors")
METADATA_PATH = Path(__file__).with_name("minilm_sentiment.json")
ID2LABEL = {0: "negative", 1: "positive"}
LABEL2ID = {label: i for i, label in ID2LABEL.items()}
MAX_LENGTH = 128  # the length the model was trained with (longer inputs were truncated)


def load_metadata() -> dict[str, Any]:
    """Return the training record shipped next to the weights (accuracies, hyper-parameters, ...)."""
    return json.loads(METADATA_PATH.read_text(encoding="utf-8"))


def minilm_base_state() -> dict[str, torch.Tensor]:
    """All-MiniLM-L6-v2's parameters named as in ``BertForSequenceClassification`` (``bert.`` +
    the asset's name; the ``position_ids`` buffer left out).

    Raises:
        AssetMissingError: the MiniLM package is not installed.
    """
    return {f"bert.{name}": tensor for name, tensor in load_file(minilm_base_path() / "model.safetensors").items()
            if name != "embeddings.position_ids"}  # a buffer, not a parameter


def build_base_classifier() -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """Build the classifier from the MiniLM base only: pretrained encoder and pooler, random head.

    The head is initialised from torch's global RNG (seed it for reproducibility). Used by the
    training script; users want :func:`build_minilm_sentiment`.

    Raises:
        AssetMissingError: the MiniLM package is not installed.
        ModelLoadError: the base weights do not fit the expected architecture.
    """
    base = minilm_base_path()
    config = BertConfig.from_pretrained(
        base, num_labels=2, id2label=dict(ID2LABEL), label2id=dict(LABEL2ID), local_files_only=True
    )
    model = BertForSequenceClassification(config)
    result = model.load_state_dict(minilm_base_state(), strict=False)
    missing = sorted(set(result.missing_keys) - {"classifier.weight", "classifier.bias"})
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"MiniLM base weights do not match BertForSequenceClassification "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    tokenizer = AutoTokenizer.from_pretrained(base, use_fast=True, local_files_only=True)
    return model, tokenizer


def build_minilm_sentiment() -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """Load ``zoo:minilm-sentiment``: the model in eval mode and its (fast) tokenizer.

    Loads the MiniLM base from :func:`salience.assets.minilm_base_path`, then overlays the shipped
    trained parameters; every shipped tensor must name an existing parameter of the same shape.
    Labels: 0 = ``negative``, 1 = ``positive``.

    Raises:
        AssetMissingError: the MiniLM package is not installed.
        ModelLoadError: the shipped weights are missing or do not fit the model.
    """
    model, tokenizer = build_base_classifier()
    if not WEIGHTS_PATH.is_file():
        raise ModelLoadError(f"zoo weights missing: {WEIGHTS_PATH} (run scripts/train_zoo_minilm.py)")
    shipped = load_file(WEIGHTS_PATH)
    state = model.state_dict()
    for name, tensor in shipped.items():
        if name not in state:
            raise ModelLoadError(f"zoo weights name an unknown parameter: {name}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"zoo weight {name} has shape {tuple(tensor.shape)}, model expects {tuple(state[name].shape)}"
            )
    with torch.no_grad():
        model.load_state_dict(shipped, strict=False)
    model.eval()
    return model, tokenizer
