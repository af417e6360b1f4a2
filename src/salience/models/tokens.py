"""What the token models (text classifiers, causal LMs) share: words from character offsets, named
baseline tokens, perturbed rows (tokens replaced or deleted, bucketed by length), and passes in
word-embedding space with the gradients of several targets batched as rows.

The attribution space is the output of the word-embedding layer (before position embeddings are
added): positions are tokens, channels embedding dimensions. A subclass says how one model call
reads the explained outputs (:meth:`TokenAdapter._outputs`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from salience.core.aggregate import WORD_PATTERN  # one word rule for word features and aggregation
from salience.core.batching import MAX_ROWS_PER_CHUNK, choose_batch_size, length_chunks, map_batches, map_chunks
from salience.core.features import Feature, FeatureSet, as_feature_set
from salience.core.target import Target, read_outputs
from salience.errors import ParameterError
from salience.models.arch import word_embedding_module
from salience.models.base import Encoded, PassCounter
from salience.models.passes import as_targets, gradients_of_outputs, score_rows

BASELINE_TOKENS = {"mask": "mask_token_id", "pad": "pad_token_id", "unk": "unk_token_id", "eos": "eos_token_id"}

class TokenAdapter:
    """Shared machinery of adapters over a Hugging Face model and its fast tokenizer.

    The model is put in eval mode. Parameters' ``requires_grad`` flags are switched off only while
    a gradient is taken and restored afterwards; hooks exist only inside the call that needs them.
    """

    kind = "token model"
    feature_options: tuple[str, ...] = ("spans",)
    baselines: tuple[str, ...] = ("mask", "pad", "unk", "zero", "delete")

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str | None = None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ParameterError("Salience needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True")
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        self.model_type: str | None = getattr(config, "model_type", None)
        self.name = name or str(getattr(config, "_name_or_path", "") or type(model).__name__)
        self.embedding_layer = word_embedding_module(model, self.model_type)
        self.counter = PassCounter()
        # the named baselines this tokenizer can build (a decoder's has no [MASK]: its default is then the next one)
        self.baselines = tuple(b for b in type(self).baselines if b not in BASELINE_TOKENS or self.named_token_id(b) is not None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_layer.weight.dtype  # type: ignore[union-attr,return-value]

    # ------------------------------------------------------------------ facts
    def _model_limit(self) -> int:
        """The tokenizer's limit, capped by the model's position embeddings (512 when neither is known)."""
        limits = [int(self.tokenizer.model_max_length)] if self.tokenizer.model_max_length < 10**6 else []
        positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        return min(limits) if limits else 512

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

    # --------------------------------------------------------------- features
    def features(self, encoded: Encoded, level: str, **options: Any) -> FeatureSet:
        """Words (default) or tokens of the input, or ``level="span"`` with ``spans=[(start, end),
        ...]``: character spans [start, end) of the first text (a classifier's text or premise, a
        causal LM's prompt), each the tokens whose first character lies inside it (spans may
        overlap; one that holds no token is an error)."""
        spans = options.pop("spans", None)
        if options:
            raise ParameterError(f"text features take only the option 'spans', got {', '.join(options)}")
        if level == "span":
            if not spans:
                raise ParameterError("level 'span' needs spans=[(start, end), ...] (character offsets into the first text)")
            return as_feature_set(span_features(encoded, spans), encoded.length, level)
        if spans is not None:
            raise ParameterError("spans are features of level 'span'; pass level='span' with them")
        if level not in ("word", "token"):
            raise ParameterError(f"unknown level {level!r} for a {self.kind}; choose 'word', 'token' or 'span'")
        return as_feature_set(encoded.features(level), encoded.length, level)

    def available(self, encoded: Encoded, targets: Sequence[Target], features: FeatureSet) -> np.ndarray:
        """(T, F): every feature can influence every target (a causal LM overrides this)."""
        return np.ones((len(targets), len(features)), dtype=bool)

    def check_baseline(self, baseline: str, *, perturbation: bool) -> str:
        """Refuse a baseline this adapter cannot build, with the list of those it can."""
        if baseline == "delete" and not perturbation:
            raise self._delete_refused()
        if baseline in ("zero", "delete"):
            return baseline
        self.baseline_token_id(baseline)
        return baseline

    def _delete_refused(self) -> ParameterError:
        others = ", ".join(b for b in self.baselines if b != "delete")
        return ParameterError(f"baseline 'delete' exists for perturbation methods only; use {others}")

    def named_token_id(self, baseline: str) -> int | None:
        """The tokenizer's id of a named token baseline ("mask", "pad", "unk", "eos"), or None when it
        has none (or the name is not one of them)."""
        attribute = BASELINE_TOKENS.get(baseline)
        token_id = getattr(self.tokenizer, attribute, None) if attribute else None
        return None if token_id is None else int(token_id)

    def baseline_token_id(self, baseline: str) -> int:
        """Token id replacing features for a named baseline ("mask", "pad", "unk", "eos") or a text that is
        exactly one token."""
        token_id = self.named_token_id(baseline)
        if token_id is not None:
            return token_id
        if baseline in BASELINE_TOKENS:
            raise ParameterError(f"the tokenizer of {self.name} has no {baseline} token; choose another baseline "
                                 f"({', '.join(b for b in self.baselines if b != baseline)})")
        ids = self.tokenizer(baseline, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ParameterError(
                f"unknown baseline {baseline!r}: use {', '.join(self.baselines)} (delete: perturbation only) "
                "or a text that is one token"
            )
        return int(ids[0])

    # ---------------------------------------------------------------- running
    def _outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                 kept: torch.Tensor | None, targets: Sequence[Target]) -> torch.Tensor:
        """One model call on (B, L) rows; the explained output of every target (B, T)."""
        raise NotImplementedError

    def _row_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                     targets: Sequence[Target], which: torch.Tensor) -> torch.Tensor:
        """Row b's output for target ``which[b]`` only (B,), for backward rows. By default every target
        is read and one kept; a causal LM reads only each row's own position."""
        outputs = self._outputs(input_ids, attention_mask, token_type_ids, None, targets)
        return outputs.gather(1, which[:, None].to(outputs.device))[:, 0]

    def _call_model(self, **kwargs: torch.Tensor | int) -> Any:
        """Run the model on one chunk, counting rows and calls."""
        rows = next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[0]
        output = self.model(**{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        self.counter.forward_passes += int(rows)
        self.counter.model_calls += 1
        return output

    def score_perturbed(self, encoded: Encoded, keep: torch.Tensor, features: Sequence[Feature], baseline: str,
                        target: Target | Sequence[Target], batch_size: int | None = None) -> torch.Tensor:
        """Explained output for each row of ``keep`` (B, F): features not kept are replaced by the
        ``baseline`` token, set to the zero embedding (``"zero"``) or, with ``"delete"``, removed from
        the sequence. Returns (B,) for one target, (B, T) for a list."""
        targets, single = as_targets(target)
        removed = as_feature_set(features, encoded.length).removed(keep)  # (B, L)
        if baseline == "zero":
            x, x0 = self.input_and_baseline(encoded, "zero")
            rows = torch.where(removed[:, :, None].to(x.device), x0[None], x[None])
            values, _ = self.score_inputs(encoded, rows, targets, grad=False, batch_size=batch_size)
            return values[:, 0] if single else values
        n_rows, length = keep.shape[0], encoded.length
        ids = encoded.input_ids.expand(n_rows, length)
        types = None if encoded.token_type_ids is None else encoded.token_type_ids.expand(n_rows, length)
        kept: torch.Tensor | None = None
        if baseline == "delete":
            order = torch.argsort(removed.int(), dim=1, stable=True)  # kept tokens first, in order
            lengths = (~removed).sum(dim=1)
            ids = ids.gather(1, order)
            types = None if types is None else types.gather(1, order)
            mask = (torch.arange(length)[None] < lengths[:, None]).long()
            ids = torch.where(mask.bool(), ids, self.baseline_token_id("pad") if self.tokenizer.pad_token_id is not None else 0)
            kept = ~removed
        else:
            ids = torch.where(removed, self.baseline_token_id(baseline), ids)
            mask = torch.ones(n_rows, length, dtype=torch.long)
            shared = self._score_sharing_prefix(encoded, ids, targets, batch_size)
            if shared is not None:
                return shared[:, 0] if single else shared
        size = choose_batch_size(length, backward=False, batch_size=batch_size)
        # bucket by length: rows sorted by kept length, cut into chunks trimmed to their longest row
        row_lengths = mask.sum(dim=1)
        order = torch.argsort(row_lengths, stable=True)
        ids, mask = ids[order], mask[order]
        types = None if types is None else types[order]
        kept = None if kept is None else kept[order]
        pieces = length_chunks(row_lengths[order].tolist(), max_tokens=size * length,
                               max_rows=size if batch_size is not None else MAX_ROWS_PER_CHUNK)

        def run(rows: slice) -> torch.Tensor:
            width = max(1, int(mask[rows].sum(dim=1).max()))  # a chunk of rows with every token deleted keeps one column
            chunk_types = None if types is None else types[rows, :width]
            chunk_kept = None if kept is None else kept[rows]
            return self._outputs(ids[rows, :width], mask[rows, :width], chunk_types, chunk_kept, targets).double().cpu()

        with torch.no_grad():
            values = map_chunks(run, pieces)
        values = torch.empty_like(values).index_copy_(0, order, values)
        return values[:, 0] if single else values

    def _score_sharing_prefix(self, encoded: Encoded, ids: torch.Tensor, targets: Sequence[Target],
                              batch_size: int | None) -> torch.Tensor | None:
        """Every target's output (B, T) for token rows (B, L) of ``encoded``'s length computed from
        the unchanged prefix's key/value cache, or None where the model cannot (a bidirectional
        model's every position sees every token: nothing to reuse)."""
        return None

    # ----------------------------------------------------- replaced tokens (ReAGent)
    def replacement_ids(self) -> torch.Tensor:
        """Token ids a replaced token may take, ascending: the tokenizer's vocabulary (capped by the
        embedding rows) without its special tokens, the unknown token included."""
        size = min(len(self.tokenizer), int(self.embedding_layer.weight.shape[0]))  # type: ignore[union-attr]
        special = set(self.tokenizer.all_special_ids)
        return torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)

    def score_replaced(self, encoded: Encoded, replaced: torch.Tensor, ids: torch.Tensor, targets: Sequence[Target],
                       batch_size: int | None = None, *, which: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and ranks for rows of the input with tokens replaced by given ids: at positions where
        ``replaced`` (B, L) is True the token is ``ids`` (B, L) there. A target's rank is the number of
        the model's outputs at the position it reads (a classifier's classes, a causal LM's vocabulary)
        whose logit is strictly greater than its own: 0 for the top prediction (a span: its worst
        token's; a contrast: its token's, not the foil's). Returns (B, T) outputs and ranks (float64),
        or with ``which`` (B,) target indices, (B,) each: row b read for target ``which[b]`` only."""
        replaced, ids = torch.as_tensor(replaced, dtype=torch.bool), torch.as_tensor(ids, dtype=torch.long)
        if replaced.dim() != 2 or replaced.shape != ids.shape or replaced.shape[1] != encoded.length:
            raise ParameterError(f"replacement rows must be (rows, {encoded.length}) masks and ids of one shape, "
                                 f"got {tuple(replaced.shape)} and {tuple(ids.shape)}")
        rows = torch.where(replaced, ids, encoded.input_ids[None])
        types = None if encoded.token_type_ids is None else encoded.token_type_ids.expand_as(rows)
        chosen = None if which is None else torch.as_tensor(which, dtype=torch.long)
        if len(rows) == 0:
            empty = torch.zeros((0,) if chosen is not None else (0, len(targets)), dtype=torch.float64)
            return empty, empty.clone()

        def run(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
            values, ranks = self._values_and_ranks(rows[part], None if types is None else types[part], list(targets),
                                                   None if chosen is None else chosen[part])
            return values.double().cpu(), ranks.double().cpu()

        with torch.no_grad():
            return map_batches(run, len(rows), choose_batch_size(encoded.length, backward=False, batch_size=batch_size))

    def _values_and_ranks(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None, targets: list[Target],
                          which: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call on (B, L) token rows: every target's output and rank (B, T), or row b's for
        target ``which[b]`` (B,). Here for a model whose output is one row of class logits (``labels``);
        a causal LM overrides it."""
        classes = [Target(c, label, "logit") for c, label in enumerate(self.labels)]  # type: ignore[attr-defined]
        logits = self._outputs(ids, torch.ones_like(ids), token_type_ids, None, classes)  # (B, C)
        values = read_outputs(logits, targets)
        index = torch.tensor([t.index for t in targets], device=logits.device)
        ranks = (logits[:, None, :] > logits[:, index][:, :, None]).sum(dim=-1)
        if which is None:
            return values, ranks
        pick = which[:, None].to(logits.device)
        return values.gather(1, pick)[:, 0], ranks.gather(1, pick)[:, 0]

    # --------------------------------------------------------------- gradients
    def input_and_baseline(self, encoded: Encoded, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings (L, D) of the input and of its baseline: non-special tokens replaced by the
        baseline token's embedding, or by zeros for ``baseline="zero"``."""
        with torch.no_grad():
            x = self.embedding_layer(encoded.input_ids[None].to(self.device))[0].detach()
            if baseline == "zero":
                reference = torch.zeros_like(x)
            else:
                if baseline == "delete":
                    raise self._delete_refused()
                token = torch.tensor([[self.baseline_token_id(baseline)]], device=self.device)
                reference = self.embedding_layer(token)[0, 0].expand_as(x)
            movable = (~encoded.special).to(self.device)[:, None]
            x0 = torch.where(movable, reference, x)
        return x, x0

    def score_inputs(self, encoded: Encoded, rows: torch.Tensor, target: Target | Sequence[Target], *, grad: bool,
                     batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs for word-embedding rows (N, L, D): (N,) for one target, (N, T) for a list; with
        ``grad`` also d output / d rows, (N, L, D) or (N, T, L, D). Without gradients one pass serves
        every target; with them, each (row, target) pair is one backward row."""
        targets, single = as_targets(target)
        size = choose_batch_size(encoded.length, backward=grad, batch_size=batch_size)

        def run(source: torch.Tensor, which: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return self._embedding_pass(encoded, source, targets, which, grad=which is not None)

        def shared_forward(source: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self._all_targets_gradient_pass(encoded, source, targets, group)

        return score_rows(self.model, run, rows, len(targets), size, grad=grad, single=single, shared_forward=shared_forward)

    def _embedding_pass(self, encoded: Encoded, embeds: torch.Tensor, targets: Sequence[Target], which: torch.Tensor | None, *,
                        grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call on word-embedding rows (B, L, D). Without ``grad``: every target's output
        (B, T). With it: row b's output for target ``which[b]`` (B,) and its gradient w.r.t. the row."""
        chunk = embeds.to(self.device, self.dtype).detach().requires_grad_(grad)
        count, length, types = chunk.shape[0], encoded.length, encoded.token_type_ids
        with self._replaced_embeddings(chunk), torch.set_grad_enabled(grad):
            ids, ones = encoded.input_ids.expand(count, length), torch.ones(count, length, dtype=torch.long)
            row_types = None if types is None else types.expand(count, length)
            if not grad:
                return self._outputs(ids, ones, row_types, None, targets).detach(), torch.empty(0)
            assert which is not None
            values = self._row_outputs(ids, ones, row_types, targets, which)
            (gradient,) = torch.autograd.grad(values.sum(), chunk)
            self.counter.backward_passes += count
        return values.detach(), gradient.detach()

    def _all_targets_gradient_pass(self, encoded: Encoded, embeds: torch.Tensor, targets: Sequence[Target],
                                   group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass of word-embedding rows (B, L, D) for every target: outputs (B, T) and
        their gradients w.r.t. the rows (B, T, L, D), the backward vmapped over ``group`` targets."""
        chunk = embeds.to(self.device, self.dtype).detach().requires_grad_(True)
        count, length, types = chunk.shape[0], encoded.length, encoded.token_type_ids
        with self._replaced_embeddings(chunk), torch.enable_grad():
            ids, ones = encoded.input_ids.expand(count, length), torch.ones(count, length, dtype=torch.long)
            row_types = None if types is None else types.expand(count, length)
            values, gradients = self._gradients_of_targets(lambda: self._outputs(ids, ones, row_types, None, targets),
                                                           chunk, targets, group)
        self.counter.backward_passes += count * len(targets)
        return values.detach(), gradients.detach()

    def _gradients_of_targets(self, outputs: Callable[[], torch.Tensor], inputs: torch.Tensor, targets: Sequence[Target],
                              group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every target's output (B, T) from ``outputs()`` (one forward pass over ``inputs``) and its
        gradient w.r.t. ``inputs`` (B, T, ...): a backward vmapped over ``group`` targets at a time."""
        values = outputs()
        return values, gradients_of_outputs(values, inputs, group)

    @contextmanager
    def _replaced_embeddings(self, embeds: torch.Tensor) -> Iterator[None]:
        """Inside: the word-embedding layer outputs ``embeds`` instead of looking ids up."""
        handle = self.embedding_layer.register_forward_hook(lambda _module, _inputs, _output: embeds)
        try:
            yield
        finally:
            handle.remove()


def words_of(text: str, segment: int, offsets: list[tuple[int, int]], sequence: list[int | None]) -> list[Feature]:
    """Words of ``text`` with the indices of the tokens (of this segment) that start inside them. A
    word is a run of letters and digits (inner apostrophes allowed) or one punctuation mark."""
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


def span_features(encoded: Encoded, spans: Sequence[Sequence[int]]) -> list[Feature]:
    """One feature per character span [start, end) of the first text: the non-special tokens of
    segment 0 whose first character lies inside it."""
    text = encoded.input if isinstance(encoded.input, str) else encoded.input[0]
    features = []
    for span in spans:
        if len(span) != 2 or not all(isinstance(v, int) for v in span):
            raise ParameterError(f"a span is (start, end) in characters, got {span!r}")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise ParameterError(f"span ({start}, {end}) is outside the first text (0-{len(text)} characters)")
        tokens = tuple(t for f in encoded.token_features if f.segment == 0 and start <= f.start < end for t in f.tokens)
        if not tokens:
            raise ParameterError(f"span ({start}, {end}) {text[start:end]!r} holds no token")
        features.append(Feature(text[start:end], start, end, 0, tokens))
    return features
