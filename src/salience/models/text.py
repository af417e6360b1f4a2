"""Adapter for Hugging Face sequence classifiers (BERT, DistilBERT, RoBERTa, DeBERTa, ...).

Features are words or tokens of the input text. A *word* is a run of letters and digits (with
inner apostrophes) or a single punctuation mark, found by a regular expression on the text the
user gave, so word boundaries are the same for every tokenizer; each non-special token belongs to
the word its character span starts in. Gradient methods attribute at the output of the
word-embedding layer (before position embeddings are added).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from salience.core.features import Feature
from salience.core.target import Prediction, Target, prediction_from_logits, read_outputs
from salience.errors import InputError, ParameterError
from salience.models.arch import ARCHITECTURES
from salience.models.attention_access import AttentionAccess
from salience.models.base import Encoded
from salience.models.passes import check_finite, frozen_parameters
from salience.models.tokens import TokenAdapter, words_of


class TextClassifier(AttentionAccess, TokenAdapter):
    """Wraps a Hugging Face ``*ForSequenceClassification`` model and its (fast) tokenizer.

    ``max_length`` defaults to the tokenizer's limit (capped by the model's position embeddings).
    """

    kind = "text classifier"
    default_output = "log_odds"  # log(p / (1 - p)): unlike p, it does not saturate near 0 and 1

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str | None = None, max_length: int | None = None) -> None:
        super().__init__(model, tokenizer, name=name)
        config = getattr(model, "config", None)
        id2label = getattr(config, "id2label", None) or {}
        num_labels = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
        self.labels: list[str] = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
        self.max_length = max_length or self._model_limit()
        self.uses_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.reads_last_token = reads_last_token(model)
        self.padding_id: int | None = getattr(config, "pad_token_id", None)
        if self.reads_last_token:  # a token baseline equal to the padding token is no default (see check_baseline)
            self.baselines = tuple(b for b in self.baselines if not self._is_padding(b))

    def _is_padding(self, baseline: str) -> bool:
        """Whether ``baseline`` names a token whose id is the model's padding token."""
        token = self.named_token_id(baseline)
        return token is not None and self.padding_id is not None and token == int(self.padding_id)

    def check_baseline(self, baseline: str, *, perturbation: bool) -> str:
        """As :meth:`TokenAdapter.check_baseline`; a classifier that reads its last non-padding token
        (GPT-2, Llama, ...) also refuses, for perturbation methods, a token baseline equal to its
        padding token: the rows carry the token ids, and a replaced last token would move the
        position the head reads (gradient methods replace embeddings, not ids: allowed)."""
        if perturbation and self.reads_last_token and self._is_padding(baseline):
            others = ", ".join(b for b in self.baselines if b != baseline)
            raise ParameterError(f"baseline {baseline!r} is {self.name}'s padding token, and its head reads the last "
                                 f"non-padding token: a replaced last token would move what it reads; use {others}")
        return super().check_baseline(baseline, perturbation=perturbation)

    def _call_model(self, **kwargs: torch.Tensor | int) -> Any:
        rows = next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[0]
        if rows > 1 and self.reads_last_token and self.padding_id is None:
            raise ParameterError(f"{self.name} reads its last non-padding token but its config has no pad_token_id, "
                                 "so transformers runs one row at a time only: set model.config.pad_token_id (e.g. to "
                                 "the tokenizer's pad or eos id), or pass batch_size=1")
        return super()._call_model(**kwargs)

    # --------------------------------------------------------------- encoding
    def encode(self, inputs: str | tuple[str, str], *, truncate: bool = False) -> Encoded:
        """Tokenise one text or text pair; raises :class:`InputError` for empty or over-long input
        unless ``truncate`` (then the longest text is cut and ``Encoded.truncated`` is set)."""
        texts = _check_texts(inputs)
        full = self.tokenizer(*texts, add_special_tokens=True)
        truncated = len(full["input_ids"]) > self.max_length
        if truncated and not truncate:
            raise InputError(
                f"the input has {len(full['input_ids'])} tokens, over the model's limit of {self.max_length}; "
                "pass truncate=True (CLI: --truncate) to cut it"
            )
        enc = self.tokenizer(*texts, return_offsets_mapping=True, truncation=truncated, max_length=self.max_length)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        types = torch.tensor(enc["token_type_ids"], dtype=torch.long) if "token_type_ids" in enc and self.uses_token_types else None
        sequence = enc.sequence_ids(0)
        special = torch.tensor([s is None for s in sequence])
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]  # type: ignore[misc]
        tokens = enc.tokens()
        token_features = [
            Feature(tokens[t], offsets[t][0], offsets[t][1], sequence[t] or 0, (t,))
            for t in range(len(tokens))
            if sequence[t] is not None
        ]
        words = [w for segment, text in enumerate(texts) for w in words_of(text, segment, offsets, sequence)]
        if not words:
            raise InputError("the input has no words the tokenizer keeps")
        return Encoded(
            input=inputs if isinstance(inputs, str) else (texts[0], texts[1]),
            input_ids=ids,
            token_type_ids=types,
            tokens=tokens,
            special=special,
            words=words,
            token_features=token_features,
            truncated=truncated,
        )

    # ---------------------------------------------------------------- running
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return check_finite(self._call_model(**kwargs).logits)

    def _outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                 kept: torch.Tensor | None, targets: Sequence[Target]) -> torch.Tensor:
        return read_outputs(self._logits(input_ids, attention_mask, token_type_ids), list(targets))

    def predict(self, encoded: Encoded) -> Prediction:
        """The model's prediction on the unperturbed input (one forward pass)."""
        with torch.no_grad():
            logits = self._logits(encoded.input_ids[None], torch.ones(1, encoded.length, dtype=torch.long), _row(encoded.token_type_ids))
        return self._prediction(logits[0])

    def _prediction(self, logits: torch.Tensor) -> Prediction:
        return prediction_from_logits(logits, self.labels)

    def predict_with_input_gradient(self, encoded: Encoded, resolve: Callable[[Prediction], Target]
                                    ) -> tuple[Prediction, Target, torch.Tensor, torch.Tensor]:
        """Prediction, the one target ``resolve`` picks from it, the target's output at the input and
        its gradient w.r.t. the word embeddings (L, D), all from one forward + backward pass (what
        ``predict`` and then ``score_inputs`` at the input would give with two forward passes)."""
        x, _ = self.input_and_baseline(encoded, "zero")
        chunk = x[None].to(self.device, self.dtype).detach().requires_grad_(True)
        ones = torch.ones(1, encoded.length, dtype=torch.long)
        with frozen_parameters(self.model), self._replaced_embeddings(chunk), torch.enable_grad():
            logits = self._logits(encoded.input_ids[None], ones, _row(encoded.token_type_ids))
            prediction = self._prediction(logits[0])
            target = resolve(prediction)
            value = read_outputs(logits, [target])[:, 0]
            (gradient,) = torch.autograd.grad(value.sum(), chunk)
            self.counter.backward_passes += 1
        return prediction, target, value.detach()[0], gradient[0].detach()

    # --------------------------------------------------------------- attention
    def attention_query_rows(self, encoded: Encoded, targets: Sequence[Target]) -> list[list[int]]:
        """Every target reads the first token's ([CLS]) attention row: the classifier head reads it."""
        return [[0] for _ in targets]


def reads_last_token(model: nn.Module) -> bool:
    """Whether a sequence classifier classifies from its last non-padding token, as transformers'
    classifiers built on decoders do (GPT-2, Llama, Mistral, ...): judged by its model type having a
    causal-LM class and no encoder facts in :mod:`salience.models.arch` (BERT-like ones pool [CLS])."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type not in ARCHITECTURES and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _row(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor[None]


def _check_texts(inputs: str | tuple[str, str]) -> tuple[str, ...]:
    texts: tuple[Any, ...] = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    if len(texts) not in (1, 2) or not all(isinstance(t, str) for t in texts):
        raise InputError("an input must be a text or a pair of texts (premise, hypothesis)")
    for position, text in enumerate(texts):
        if not text.strip():
            which = "the text" if len(texts) == 1 else ("the first text" if position == 0 else "the second text")
            raise InputError(f"{which} is empty")
    return texts
