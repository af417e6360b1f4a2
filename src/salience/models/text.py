"""Adapter for Hugging Face sequence classifiers (BERT, DistilBERT, RoBERTa, DeBERTa, ...).

Features are words or tokens of the input text. A *word* is a run of letters and digits (with
inner apostrophes) or a single punctuation mark, found by a regular expression on the text the
user gave, so word boundaries are the same for every tokenizer; each non-special token belongs to
the word its character span starts in. Gradient methods attribute at the output of the
word-embedding layer (before position embeddings are added).
"""

from __future__ import annotations

import bisect
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from salience.core.batching import MAX_ROWS_PER_CHUNK, choose_batch_size, length_chunks, map_batches, map_chunks
from salience.core.explanation import Feature
from salience.core.target import Prediction, Target, read_output
from salience.errors import InputError, ModelOutputError, ParameterError
from salience.models.arch import word_embedding_module
from salience.models.base import Encoded

WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
BASELINE_TOKENS = {"mask": "mask_token_id", "pad": "pad_token_id", "unk": "unk_token_id"}


@dataclass
class PassCounter:
    """Rows sent through the model since creation (one batch of 16 rows = 16 passes)."""

    forward_passes: int = 0
    backward_passes: int = 0
    model_calls: int = 0


class TextClassifier:
    """Wraps a Hugging Face ``*ForSequenceClassification`` model and its (fast) tokenizer.

    The model is put in eval mode. Parameters' ``requires_grad`` flags are switched off only while
    a gradient is taken and restored afterwards; hooks exist only inside the call that needs them.
    ``max_length`` defaults to the tokenizer's limit (capped by the model's position embeddings).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str | None = None, max_length: int | None = None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ParameterError("Salience needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True")
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        self.model_type: str | None = getattr(config, "model_type", None)
        self.name = name or str(getattr(config, "_name_or_path", "") or type(model).__name__)
        id2label = getattr(config, "id2label", None) or {}
        num_labels = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
        self.labels: list[str] = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
        self.max_length = max_length or self._model_limit()
        self.embedding_layer = word_embedding_module(model, self.model_type)
        self.uses_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.counter = PassCounter()

    # ------------------------------------------------------------------ facts
    def _model_limit(self) -> int:
        limits = [int(self.tokenizer.model_max_length)] if self.tokenizer.model_max_length < 10**6 else []
        positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        return min(limits) if limits else 512

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_layer.weight.dtype  # type: ignore[union-attr,return-value]

    def bytes_per_row(self, seq_len: int, *, backward: bool) -> int:
        """Estimated activation memory (bytes) of one input row of ``seq_len`` tokens, for ``max_memory``.

        A gradient pass keeps, per layer and token, about 8 hidden-sized and 2 intermediate-sized
        values for the backward pass (gradients are freed layer by layer); eager attention also
        keeps 2 maps of heads x T x T per layer (SDPA kernels do not). A forward pass without
        gradients holds about two layers' worth at a time. A 25 % margin is added. Measured on
        BERT-base (SDPA, float32, CPU): 270 MiB per 512-token row with backward, estimate 360 MiB.
        """
        config = self.model.config  # type: ignore[union-attr]
        hidden = int(getattr(config, "hidden_size", 768))
        layers = int(getattr(config, "num_hidden_layers", 12))
        heads = int(getattr(config, "num_attention_heads", 12))
        intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
        eager = getattr(config, "_attn_implementation", "eager") not in ("sdpa", "flash_attention_2", "flex_attention")
        width = torch.finfo(self.dtype).bits // 8
        per_layer = seq_len * (8 * hidden + 2 * intermediate) + (2 * heads * seq_len * seq_len if eager else 0)
        return int(1.25 * width * per_layer * (layers if backward else 2))

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
        words = [w for segment, text in enumerate(texts) for w in _words(text, segment, offsets, sequence)]
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

    def baseline_token_id(self, baseline: str) -> int:
        """Token id replacing features for a named baseline ("mask", "pad", "unk") or a text that is
        exactly one token."""
        attribute = BASELINE_TOKENS.get(baseline)
        token_id = getattr(self.tokenizer, attribute, None) if attribute else None
        if token_id is not None:
            return int(token_id)
        if attribute:
            raise ParameterError(f"the tokenizer of {self.name} has no {baseline} token; choose another baseline")
        ids = self.tokenizer(baseline, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ParameterError(
                f"unknown baseline {baseline!r}: use mask, pad, unk, zero, delete (perturbation only) "
                "or a text that is one token"
            )
        return int(ids[0])

    # ---------------------------------------------------------------- running
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids.to(self.device)
        logits = self.model(**kwargs).logits
        self.counter.forward_passes += int(input_ids.shape[0])
        self.counter.model_calls += 1
        if not torch.isfinite(logits).all():
            bad = int((~torch.isfinite(logits)).any(dim=-1).sum())
            raise ModelOutputError(f"the model returned NaN or infinite scores for {bad} of {logits.shape[0]} inputs")
        return logits

    def predict(self, encoded: Encoded) -> Prediction:
        """The model's prediction on the unperturbed input (one forward pass)."""
        with torch.no_grad():
            logits = self._logits(encoded.input_ids[None], torch.ones(1, encoded.length, dtype=torch.long), _row(encoded.token_type_ids))
        return self._prediction(logits[0])

    def _prediction(self, logits: torch.Tensor) -> Prediction:
        probs = torch.softmax(logits.detach().double(), dim=-1)
        index = int(probs.argmax())
        return Prediction(index, self.labels[index], tuple(float(p) for p in probs))

    def predict_with_input_gradient(self, encoded: Encoded, resolve: Callable[[Prediction], Target]
                                    ) -> tuple[Prediction, Target, float, torch.Tensor]:
        """Prediction, the target ``resolve`` picks from it, the target's output at the input and its
        gradient w.r.t. the word embeddings (T, D), all from one forward + backward pass (what
        ``predict`` and then ``score_embeddings`` at the input would give with two forward passes)."""
        picked: list[tuple[Prediction, Target]] = []

        def predicted_target_output(logits: torch.Tensor) -> torch.Tensor:
            prediction = self._prediction(logits[0])
            picked.append((prediction, resolve(prediction)))
            return read_output(logits, picked[0][1])

        x, _ = self.embedding_path_ends(encoded, "zero")
        with _frozen_parameters(self.model):
            values, gradient = self._embedding_pass(encoded, x[None], predicted_target_output, grad=True)
        (prediction, target), = picked
        return prediction, target, float(values[0]), gradient[0]

    def score_perturbed(self, encoded: Encoded, keep: torch.Tensor, features: list[Feature], baseline: str,
                        target: Target, batch_size: int | None = None) -> torch.Tensor:
        """Explained output (B,) for each row of ``keep`` (B, F): features not kept are replaced by the
        ``baseline`` token or, with ``baseline="delete"``, removed from the sequence."""
        n_rows, length = keep.shape[0], encoded.length
        membership = torch.zeros(len(features), length)
        for index, feature in enumerate(features):
            membership[index, list(feature.tokens)] = 1.0
        removed = ((~keep).float() @ membership) > 0  # (B, T)
        ids = encoded.input_ids.expand(n_rows, length)
        types = None if encoded.token_type_ids is None else encoded.token_type_ids.expand(n_rows, length)
        if baseline == "delete":
            order = torch.argsort(removed.int(), dim=1, stable=True)  # kept tokens first, in order
            lengths = (~removed).sum(dim=1)
            ids = ids.gather(1, order)
            types = None if types is None else types.gather(1, order)
            mask = (torch.arange(length)[None] < lengths[:, None]).long()
            ids = torch.where(mask.bool(), ids, self.baseline_token_id("pad"))
        else:
            ids = torch.where(removed, self.baseline_token_id(baseline), ids)
            mask = torch.ones(n_rows, length, dtype=torch.long)
        size = choose_batch_size(length, backward=False, batch_size=batch_size)
        # bucket by length: rows sorted by kept length, cut into chunks trimmed to their longest row
        kept = mask.sum(dim=1)
        order = torch.argsort(kept, stable=True)
        ids, mask = ids[order], mask[order]
        types = None if types is None else types[order]
        pieces = length_chunks(kept[order].tolist(), max_tokens=size * length,
                               max_rows=size if batch_size is not None else MAX_ROWS_PER_CHUNK)

        def run(rows: slice) -> torch.Tensor:
            width = max(1, int(mask[rows].sum(dim=1).max()))  # a chunk of rows with every token deleted keeps one column
            chunk_types = None if types is None else types[rows, :width]
            return read_output(self._logits(ids[rows, :width], mask[rows, :width], chunk_types), target).double().cpu()

        with torch.no_grad():
            values = map_chunks(run, pieces)
        return torch.empty_like(values).index_copy_(0, order, values)

    # --------------------------------------------------------------- gradients
    def embedding_path_ends(self, encoded: Encoded, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings (T, D) of the input and of its baseline: non-special tokens replaced by the
        baseline token's embedding, or by zeros for ``baseline="zero"``."""
        with torch.no_grad():
            x = self.embedding_layer(encoded.input_ids[None].to(self.device))[0].detach()
            if baseline == "zero":
                reference = torch.zeros_like(x)
            else:
                if baseline == "delete":
                    raise ParameterError("baseline 'delete' exists for perturbation methods only; use mask, pad, unk or zero")
                token = torch.tensor([[self.baseline_token_id(baseline)]], device=self.device)
                reference = self.embedding_layer(token)[0, 0].expand_as(x)
            movable = (~encoded.special).to(self.device)[:, None]
            x0 = torch.where(movable, reference, x)
        return x, x0

    def score_embeddings(self, encoded: Encoded, embeds: torch.Tensor, target: Target, *, grad: bool,
                         batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs (N,) for word-embedding rows (N, T, D) and, when ``grad``, d output / d embeds."""
        size = choose_batch_size(encoded.length, backward=grad, batch_size=batch_size)

        def run(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            return self._embedding_pass(encoded, embeds[rows], lambda logits: read_output(logits, target), grad=grad)

        with _frozen_parameters(self.model):
            values, gradients = map_batches(run, embeds.shape[0], size)
        return values, (gradients if grad else None)

    def _embedding_pass(self, encoded: Encoded, embeds: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor], *,
                        grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call on word-embedding rows (B, T, D): ``output(logits)`` (B,) and, when ``grad``,
        its gradient w.r.t. the rows (else an empty tensor). Parameters must be frozen by the caller."""
        chunk = embeds.to(self.device, self.dtype).detach().requires_grad_(grad)
        count, length, types = chunk.shape[0], encoded.length, encoded.token_type_ids
        with self._replaced_embeddings(chunk), torch.set_grad_enabled(grad):
            logits = self._logits(encoded.input_ids.expand(count, length), torch.ones(count, length, dtype=torch.long),
                                  None if types is None else types.expand(count, length))
            values = output(logits)
            if not grad:
                return values.detach(), torch.empty(0)
            (gradient,) = torch.autograd.grad(values.sum(), chunk)
            self.counter.backward_passes += count
        return values.detach(), gradient.detach()

    @contextmanager
    def _replaced_embeddings(self, embeds: torch.Tensor) -> Iterator[None]:
        """Inside: the word-embedding layer outputs ``embeds`` instead of looking ids up."""
        handle = self.embedding_layer.register_forward_hook(lambda _module, _inputs, _output: embeds)
        try:
            yield
        finally:
            handle.remove()

    # --------------------------------------------------------------- attention
    def attention_maps(self, encoded: Encoded) -> torch.Tensor:
        """Attention probabilities (layers, heads, T, T) on the unperturbed input (eager attention)."""
        config = self.model.config  # type: ignore[union-attr]
        previous = getattr(config, "_attn_implementation", None)
        setter = getattr(self.model, "set_attn_implementation", None)
        if callable(setter) and previous != "eager":
            setter("eager")
        try:
            kwargs: dict[str, torch.Tensor] = {"input_ids": encoded.input_ids[None].to(self.device)}
            if encoded.token_type_ids is not None:
                kwargs["token_type_ids"] = encoded.token_type_ids[None].to(self.device)
            with torch.no_grad():
                output = self.model(**kwargs, output_attentions=True)
            self.counter.forward_passes += 1
            self.counter.model_calls += 1
        finally:
            if callable(setter) and previous is not None and previous != "eager":
                setter(previous)
        if not output.attentions:
            raise ParameterError(f"{self.name} does not return attention probabilities")
        return torch.stack([a[0] for a in output.attentions]).double().cpu()


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` on every parameter, restoring each flag on exit (errors too)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)


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


def _words(text: str, segment: int, offsets: list[tuple[int, int]], sequence: list[int | None]) -> list[Feature]:
    """Words of ``text`` with the indices of the tokens (of this segment) that start inside them."""
    spans = [(m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]
    members: list[list[int]] = [[] for _ in spans]
    starts = [s for s, _ in spans]
    for token, ((begin, end), seq) in enumerate(zip(offsets, sequence)):
        if seq != segment or end <= begin:
            continue
        # the word containing the token's first character, else the next word (a "▁"-style prefix)
        index = bisect.bisect_right(starts, begin) - 1
        if index < 0 or begin >= spans[index][1]:
            index += 1
        if index < len(spans):
            members[index].append(token)
    return [Feature(text[s:e], s, e, segment, tuple(m)) for (s, e), m in zip(spans, members) if m]

