"""Zero-shot text classification through an NLI model (the hypothesis-template approach).

For candidate labels l_1..l_C, the text is paired with the hypothesis ``template.format(l)``;
the score of label l is the NLI model's entailment logit on that pair, and the label
probabilities are the softmax of those logits over the candidates (as the Hugging Face
zero-shot pipeline does with ``multi_label=False``). Every evaluation therefore costs C model
rows. Features are the words of the text only; the hypotheses are never perturbed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from salience.core.features import Feature, FeatureSet
from salience.core.target import Prediction, Target, prediction_from_logits, read_outputs
from salience.errors import ParameterError
from salience.models.base import Encoded
from salience.models.passes import as_targets
from salience.models.text import TextClassifier

DEFAULT_TEMPLATE = "This example is {}."


class ZeroShotClassifier:
    """Classify a text into user-chosen ``labels`` with an NLI :class:`TextClassifier`."""

    kind = "text classifier"
    default_output = "log_odds"  # log(p / (1 - p)): unlike p, it does not saturate near 0 and 1

    def __init__(self, nli: TextClassifier, labels: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
                 entailment_label: str | None = None) -> None:
        if len(labels) < 2:
            raise ParameterError("zero-shot classification needs at least two candidate labels")
        if "{}" not in template:
            raise ParameterError(f"the hypothesis template {template!r} has no '{{}}' for the label")
        lowered = [label.lower() for label in nli.labels]
        wanted = (entailment_label or "entailment").lower()
        if wanted not in lowered:
            raise ParameterError(f"the NLI model's labels ({', '.join(nli.labels)}) have no {wanted!r} class")
        self.nli = nli
        self.labels = list(labels)
        self.template = template
        self.entailment = Target(lowered.index(wanted), nli.labels[lowered.index(wanted)], "logit")
        self.name = f"{nli.name} (zero-shot: {', '.join(self.labels)})"
        self.counter = nli.counter
        self.max_length = nli.max_length
        self.baselines = nli.baselines

    def bytes_per_row(self, seq_len: int, *, backward: bool) -> int:
        return self.nli.bytes_per_row(seq_len, backward=backward)

    def encode(self, inputs: str | tuple[str, str], *, truncate: bool = False) -> Encoded:
        """Encode the text alone (its features) and, in ``extras["pairs"]``, the text paired with each
        hypothesis, hypothesis tokens marked special so that no method perturbs them."""
        if not isinstance(inputs, str):
            raise ParameterError("zero-shot classification explains a single text, not a pair")
        encoded = self.nli.encode(inputs, truncate=truncate)
        pairs = []
        for label in self.labels:
            pair = self.nli.encode((encoded.input if isinstance(encoded.input, str) else inputs, self.template.format(label)),
                                   truncate=truncate)
            text_tokens = {t for w in pair.words if w.segment == 0 for t in w.tokens}
            first = {t for w in encoded.words for t in w.tokens}
            if text_tokens != first or not torch.equal(pair.input_ids[: encoded.length - 1], encoded.input_ids[:-1]):
                raise ParameterError("the text's tokens are not a prefix of its pair with the hypothesis; "
                                     "this tokenizer is not supported for zero-shot explanations")
            special = torch.ones_like(pair.special)
            special[list(text_tokens)] = False
            pairs.append(dataclasses.replace(pair, special=special))
        encoded.extras["pairs"] = pairs
        return encoded

    def _pairs(self, encoded: Encoded) -> list[Encoded]:
        return encoded.extras["pairs"]  # type: ignore[return-value]

    def predict(self, encoded: Encoded) -> Prediction:
        keep = torch.ones(1, len(encoded.words), dtype=torch.bool)
        logits = self._label_logits(encoded, keep, encoded.words, "mask", None)
        return prediction_from_logits(logits[0], self.labels)

    def _label_logits(self, encoded: Encoded, keep: torch.Tensor, features: Sequence[Feature], baseline: str,
                      batch_size: int | None) -> torch.Tensor:
        columns = [self.nli.score_perturbed(pair, keep, features, baseline, self.entailment, batch_size) for pair in self._pairs(encoded)]
        return torch.stack(columns, dim=1)  # (B, C) entailment logits

    def features(self, encoded: Encoded, level: str, **options: Any) -> FeatureSet:
        return self.nli.features(encoded, level, **options)

    def available(self, encoded: Encoded, targets: Sequence[Target], features: FeatureSet) -> np.ndarray:
        return np.ones((len(targets), len(features)), dtype=bool)

    def check_baseline(self, baseline: str, *, perturbation: bool) -> str:
        return self.nli.check_baseline(baseline, perturbation=perturbation)

    def score_perturbed(self, encoded: Encoded, keep: torch.Tensor, features: Sequence[Feature], baseline: str,
                        target: Target | Sequence[Target], batch_size: int | None = None) -> torch.Tensor:
        targets, single = as_targets(target)
        values = read_outputs(self._label_logits(encoded, keep, features, baseline, batch_size), targets)
        return values[:, 0] if single else values

    def input_and_baseline(self, encoded: Encoded, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nli.input_and_baseline(encoded, baseline)

    def score_inputs(self, encoded: Encoded, rows: torch.Tensor, target: Target | Sequence[Target], *, grad: bool,
                     batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings (N, L, D) are completed with each hypothesis' embeddings; the gradient of
        each target's output combines the per-label gradients by the chain rule through the softmax."""
        targets, single = as_targets(target)
        length = encoded.length - 1  # the text's tokens, without its final separator
        logits, grads = [], []
        for pair in self._pairs(encoded):
            with torch.no_grad():
                tail = self.nli.embedding_layer(pair.input_ids[length:][None].to(rows.device))[0]
            full = torch.cat([rows[:, :length], tail.expand(rows.shape[0], -1, -1).to(rows)], dim=1)
            values, gradient = self.nli.score_inputs(pair, full, self.entailment, grad=grad, batch_size=batch_size)
            logits.append(values)
            if gradient is not None:
                grads.append(gradient[:, :length])
        z = torch.stack(logits, dim=1).double()  # (N, C)
        out = read_outputs(z, targets)  # (N, T)
        gradient = None
        if grad:
            coefficients = torch.stack([_output_jacobian(z, t) for t in targets], dim=1)  # (N, T, C): d out_t / d z_c
            combined = sum(coefficients[:, :, i, None, None].to(g) * g[:, None] for i, g in enumerate(grads))
            gradient = torch.zeros(rows.shape[0], len(targets), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
            gradient[:, :, :length] = combined  # the final separator is special: never moved
        if single:
            return out[:, 0], None if gradient is None else gradient[:, 0]
        return out, gradient

    def attention_maps(self, encoded: Encoded) -> torch.Tensor:
        """Attention on the text alone (no hypothesis), (layers, heads, T, T)."""
        return self.nli.attention_maps(encoded)

    def attention_query_rows(self, encoded: Encoded, targets: Sequence[Target]) -> list[list[int]]:
        """The first token's row, as the NLI classifier's (attention on the text alone ignores the labels)."""
        return self.nli.attention_query_rows(encoded, targets)


def _output_jacobian(z: torch.Tensor, target: Target) -> torch.Tensor:
    """d output / d z for the label logits z (N, C)."""
    one_hot = torch.zeros_like(z)
    one_hot[:, target.index] = 1.0
    if target.output == "logit":
        return one_hot
    probs = torch.softmax(z, dim=-1)
    if target.output == "log_probability":
        return one_hot - probs
    if target.output == "log_odds":  # z_t - logsumexp over the other labels
        others = torch.softmax(z.masked_fill(one_hot.bool(), -torch.inf), dim=-1)
        return one_hot - others
    return probs[:, target.index, None] * (one_hot - probs)
