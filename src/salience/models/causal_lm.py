"""Adapter for Hugging Face causal language models (``*ForCausalLM``): explain every token of a
continuation, generated greedily (or sampled, seeded) or given by the user (teacher forcing).

Conventions:

- The sequence is prompt + continuation token ids; the continuation is tokenised on its own
  (without special tokens), so it is the sequence the model is teacher-forced on.
- Targets: one per continuation token (``Target.index`` its id, ``label`` its text, ``position``
  its index in the sequence); its output is read from the logits at ``position - 1``.
- Features: tokens (the default level) or words of the prompt and of the continuation. A
  feature's ``segment`` is 0 for the prompt and 1 for the continuation; ``start``/``end`` are
  character offsets into that text (``Explanation.input`` / ``extras["prompt"]``, and
  ``extras["continuation"]``). Special tokens (BOS, ``<|im_end|>``, ...) are in no feature and keep
  their value in every baseline.
- Feature f can influence the target at position p iff all of f's positions are < p; the API
  writes NaN for the others.
- Baselines: ``"zero"`` (the zero embedding; the default for every method that prefers [MASK] or
  [PAD], which LM tokenizers rarely have), ``"delete"`` (tokens removed from the sequence; LIME's
  default), and ``"eos"`` / ``"unk"`` where the tokenizer has those tokens. ``"pad"`` and any text
  that is one token are accepted too; ``"pad"`` is not listed, so that IG's preference for it does
  not make its default depend on whether a tokenizer defines a pad token.
- With ``"delete"``, the output of a target whose whole prefix is deleted (a prompt without BOS)
  is read after a lone start token (the tokenizer's BOS, else its EOS), computed in the same model
  call as one extra row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from salience.core.batching import MAX_ROWS_PER_CHUNK, choose_batch_size, length_chunks, map_chunks
from salience.core.features import Feature, FeatureSet
from salience.core.target import Target, check_output, read_outputs
from salience.errors import InputError, ParameterError, TargetError
from salience.models.attention_access import AttentionAccess
from salience.models.base import Encoded
from salience.models.chat import Chat, is_messages, render_chat
from salience.models.generation import decode_tokens, decoded_offsets, end_token_ids
from salience.models.head_split import disjoint, per_target_gradients
from salience.models.lm_targets import ContrastSpec, foil_ids, span_bounds, span_output, step_scores, target_positions, target_value
from salience.models.passes import check_finite
from salience.models.prefix_cache import cache_argument, can_reuse, first_changed, prefix_of, returned_cache
from salience.models.tokens import TokenAdapter, words_of

DEFAULT_MAX_NEW_TOKENS = 16
PROMPT, CONTINUATION = 0, 1  # Feature.segment of each text


class CausalLM(AttentionAccess, TokenAdapter):
    """Wraps a Hugging Face ``*ForCausalLM`` model and its fast tokenizer; the model is neither moved
    nor cast (rows follow its embedding layer's device and dtype). ``max_length`` (the context
    length) defaults to the tokenizer's limit capped by the model's position embeddings."""

    kind = "causal LM"
    explanation_kind = "generation"
    default_level = "token"
    encode_options = ("continuation", "max_new_tokens", "sample", "seed", "contrast", "target_span", "step_scores",
                      "template_tokens")

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str | None = None, max_length: int | None = None) -> None:
        super().__init__(model, tokenizer, name=name)
        self.labels: list[str] = []  # no classes: the targets are the continuation's tokens
        self.max_length = max_length or self._model_limit()
        self.baselines = ("zero", "delete", *(b for b in ("eos", "unk") if getattr(tokenizer, f"{b}_token_id", None) is not None))
        self.keeps_logits = _keeps_logits_per_row(model)
        # replacement rows run only their positions from the first change on, over the unchanged prefix's
        # key/value cache (models/prefix_cache.py); False runs every row in full
        self.reuses_prefix = True
        self.end_ids = end_token_ids(model, tokenizer)

    def bytes_per_row(self, seq_len: int, *, backward: bool) -> int:
        """Activation estimate of :class:`TokenAdapter` plus the logits read (at most one vocabulary
        row per position, with its softmax and, backward, its gradient)."""
        vocab = int(getattr(self.model.config, "vocab_size", 32000))  # type: ignore[union-attr]
        head = seq_len * vocab * (3 if backward else 2) * (torch.finfo(self.dtype).bits // 8)
        return super().bytes_per_row(seq_len, backward=backward) + head

    # --------------------------------------------------------------- encoding
    def is_single_input(self, inputs: Any) -> bool:
        """One prompt (a string, one chat's list of messages or an :class:`Encoded`); any other list
        is several prompts."""
        return isinstance(inputs, (str, Encoded)) or is_messages(inputs)

    def encode(self, prompt: str | list[dict[str, str]], *, continuation: str | None = None, max_new_tokens: int | None = None,
               sample: bool = False, seed: int = 0, truncate: bool = False, contrast: ContrastSpec | None = None,
               target_span: Sequence[int] | Sequence[Sequence[int]] | str | None = None, step_scores: bool | None = None,
               template_tokens: bool = False) -> Encoded:
        """Tokenise ``prompt`` and either teacher-force ``continuation`` or generate ``max_new_tokens``
        tokens (default 16; greedy, or sampled with ``seed`` when ``sample``). Prompt plus new tokens
        over the context length raise :class:`InputError` unless ``truncate`` (the prompt is then cut
        from the left, keeping a leading BOS). Generation spends one counted forward pass per token.

        ``prompt`` may be chat messages (``[{"role": "user", "content": ...}, ...]``): the tokenizer's
        chat template is applied (:mod:`salience.models.chat`), its own tokens are special (in no
        feature, kept by every baseline) unless ``template_tokens``, and ``extras["segments"]`` says
        which characters are each message's and the assistant turn's (the continuation).

        ``contrast``: a foil for every continuation token (a text aligned by position, a token id or
        a list of ids): each target explains output(token) - output(foil). ``target_span``: one
        ``(start, end)`` of continuation token indices, a list of them, or ``"all"`` (the whole
        continuation): one target per span, its log-probability (see :mod:`salience.models.lm_targets`). ``step_scores`` (probability,
        entropy, surprisal of each continuation token, nats) are kept in ``extras["step_scores"]``:
        from the decoding steps when generating (no extra pass); for a given continuation only when
        ``step_scores=True`` (one counted forward row); ``False``: none."""
        if continuation is not None and max_new_tokens is not None:
            raise ParameterError("give either a continuation (teacher forcing) or max_new_tokens (generation), not both")
        chat = render_chat(self.tokenizer, prompt) if not isinstance(prompt, str) else None
        text_prompt = chat.text if chat is not None else prompt
        if not isinstance(text_prompt, str) or not text_prompt.strip():
            raise InputError("the prompt is empty" if isinstance(text_prompt, str) else "a prompt must be a text or chat messages")
        prompt_part = self._tokenise(text_prompt, add_special_tokens=chat is None)
        if chat is not None:
            prompt_part, template = _mark_template(prompt_part, chat, include=template_tokens)
        if not prompt_part[0]:
            raise InputError("the prompt tokenises to no token")
        if continuation is not None:
            given = self._tokenise(continuation, add_special_tokens=False)
            if not given[0]:
                raise InputError(f"the continuation {continuation!r} tokenises to no token")
            new = len(given[0])
        else:
            new = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens)
            if new < 1:
                raise ParameterError(f"max_new_tokens must be at least 1, got {new}")
        if contrast is not None and target_span is not None:
            raise ParameterError("a contrast and a target span cannot be combined; explain the span, or contrast its tokens")
        keep = self._fit(prompt_part[2], new, truncate)
        ids, offsets, special = ([part[i] for i in keep] for part in prompt_part)
        steps: list[torch.Tensor] = []
        if continuation is None:
            generated = decode_tokens(self._call_model, self.model, torch.tensor(ids, dtype=torch.long), new,
                                      end_ids=self.end_ids, sample=sample, seed=seed,
                                      on_step=steps.append if step_scores is not False else None)
            text, cont_offsets = decoded_offsets(self.tokenizer, generated)
            cont = (generated, cont_offsets, [i in self._special_ids() for i in generated])
        else:
            text, cont = continuation, given
        extras: dict[str, object] = {"prompt": text_prompt, "continuation": text, "generated": continuation is None,
                                     "prompt_length": len(ids)}
        if continuation is None and sample:
            extras.update(sample=True, seed=seed)
        if chat is not None:
            kept_at = {old: new for new, old in enumerate(keep)}
            extras.update(_chat_extras(chat, text, [kept_at[t] for t in template if t in kept_at]))
        if contrast is not None:
            foils = foil_ids(contrast, lambda t: self._tokenise(t, add_special_tokens=False)[0], len(cont[0]), self._vocab_size())
            extras.update(contrast=contrast if isinstance(contrast, (str, int)) else list(contrast), foil_ids=foils)
        if target_span is not None:
            extras["target_span"] = _spans(target_span, len(cont[0]))
        if steps or step_scores:
            extras["step_scores"] = self._step_scores(ids, cont[0], steps)
        return self._encoded(text_prompt, text, (ids + cont[0], offsets + cont[1], special + cont[2]),
                             truncated=len(keep) < len(prompt_part[0]), extras=extras)

    def _step_scores(self, prompt_ids: list[int], new_ids: list[int], steps: list[torch.Tensor]) -> dict[str, list[float]]:
        """Step scores of the continuation: from the decoding steps' logits, else from one forward row
        of the whole sequence (counted)."""
        if not steps:
            sequence = torch.tensor(prompt_ids + new_ids, dtype=torch.long)[None]
            read = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(new_ids) - 1)[None]
            with torch.no_grad():
                steps = list(self._read_logits(sequence, torch.ones_like(sequence), read)[0])
        return step_scores(torch.stack(steps), torch.tensor(new_ids, dtype=torch.long))

    def _vocab_size(self) -> int:
        return int(getattr(self.model.config, "vocab_size", None) or len(self.tokenizer))  # type: ignore[union-attr]

    def _tokenise(self, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """Ids, character offsets and special flags of ``text``: tokens the tokenizer added (BOS) and
        special tokens written in the text (``<|im_start|>``) are special; the unknown token is not
        (it stands for characters of the text)."""
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = [int(i) for i in enc["input_ids"]]
        specials = self._special_ids()
        sequence = enc.sequence_ids(0)
        special = [s is None or i in specials for i, s in zip(ids, sequence)]
        return ids, [(int(a), int(b)) for a, b in enc["offset_mapping"]], special

    def _special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}

    def _fit(self, special: list[bool], new: int, truncate: bool) -> list[int]:
        """Indices of the prompt tokens kept so that prompt + ``new`` tokens fit the context."""
        length, room = len(special), self.max_length - new
        if length <= room:
            return list(range(length))
        if not truncate:
            raise InputError(f"the prompt ({length} tokens) plus {new} new tokens is over the model's context length "
                             f"of {self.max_length}; shorten it, ask for fewer tokens or pass truncate=True to cut the prompt")
        head = 1 if special[0] else 0  # a leading BOS stays
        if room - head < 1:
            raise InputError(f"{new} new tokens leave no room for the prompt in the context length of {self.max_length}")
        return list(range(head)) + list(range(length - (room - head), length))

    def _encoded(self, prompt: str, continuation: str, sequence: tuple[list[int], list[tuple[int, int]], list[bool]], *,
                 truncated: bool, extras: dict[str, object]) -> Encoded:
        ids, offsets, special = sequence
        start = int(extras["prompt_length"])  # type: ignore[call-overload]
        segment: list[int | None] = [None if s else (PROMPT if t < start else CONTINUATION) for t, s in enumerate(special)]
        tokens = [self.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
        token_features = [Feature(tokens[t], offsets[t][0], offsets[t][1], s, (t,)) for t, s in enumerate(segment) if s is not None]
        words = words_of(prompt, PROMPT, offsets, segment) + words_of(continuation, CONTINUATION, offsets, segment)
        return Encoded(input=prompt, input_ids=torch.tensor(ids, dtype=torch.long), token_type_ids=None, tokens=tokens,
                       special=torch.tensor(special, dtype=torch.bool), words=words, token_features=token_features,
                       truncated=truncated, extras=extras)

    def describe_input(self, encoded: Encoded) -> dict[str, object]:
        """What an Explanation keeps of the input: the prompt, the continuation text, whether it was
        generated (and the seed when sampled), and the number of prompt tokens (special ones included)."""
        return dict(encoded.extras)

    # ---------------------------------------------------------------- targets
    def predict(self, encoded: Encoded) -> None:
        """A causal LM has no class prediction; the targets are the continuation's tokens."""
        return None

    def resolve_targets(self, encoded: Encoded, prediction: object, target: int | str | Sequence[int | str] | None,
                        output: str) -> list[Target]:
        """One target per continuation token (``None`` or ``"all"``), or those chosen by index into the
        continuation (0 = its first token; negative indices count from the end): one or a list. With
        a contrast each target carries its foil (label "token vs foil"); with target spans (encoded
        with ``target_span``) the targets are the spans, and ``target`` must be left out."""
        check_output(output)
        start = int(encoded.extras["prompt_length"])  # type: ignore[call-overload]
        spans = encoded.extras.get("target_span")
        if spans is not None:
            if target is not None and target != "all":
                raise TargetError("give target_span or target, not both: a target span is the target")
            return [self._span_target(encoded, start + a, start + b, output) for a, b in spans]  # type: ignore[union-attr]
        foils = encoded.extras.get("foil_ids")
        every = [self._token_target(encoded, p, output, None if foils is None else int(foils[p - start]))  # type: ignore[index]
                 for p in range(start, encoded.length)]
        if target is None or (isinstance(target, str) and target == "all"):
            return every
        picks = list(target) if isinstance(target, (list, tuple)) else [target]
        if not picks:
            raise TargetError("the list of targets is empty")
        chosen = []
        for pick in picks:
            if isinstance(pick, bool) or not (isinstance(pick, int) or (isinstance(pick, str) and pick.lstrip("-").isdigit())):
                raise TargetError(f"a causal LM's target is the index of a continuation token (or 'all'), not {pick!r}")
            index = int(pick)
            if not -len(every) <= index < len(every):
                raise TargetError(f"target {index} is out of range: the continuation has {len(every)} tokens")
            chosen.append(every[index])
        return chosen

    def _token_target(self, encoded: Encoded, position: int, output: str, foil: int | None) -> Target:
        label = encoded.tokens[position]
        if foil is not None:
            label = f"{label} vs {self.tokenizer.decode([foil], clean_up_tokenization_spaces=False)}"
        return Target(int(encoded.input_ids[position]), label, output, position, foil=foil)

    def _span_target(self, encoded: Encoded, first: int, end: int, output: str) -> Target:
        """The span of positions [first, end) as one target, labelled with its continuation text."""
        span_output(torch.zeros(1, dtype=torch.float64), output)  # refuses an output a span has not
        ids = tuple(int(i) for i in encoded.input_ids[first:end])
        located = {t: f for f in encoded.token_features if f.segment == CONTINUATION for t in f.tokens}
        if all(p in located for p in range(first, end)):
            text = str(encoded.extras["continuation"])
            label = text[located[first].start:located[end - 1].end]
        else:
            label = "".join(encoded.tokens[first:end])
        return Target(ids[0], label, output, first, span=ids)

    def available(self, encoded: Encoded, targets: Sequence[Target], features: FeatureSet) -> np.ndarray:
        """(T, F): feature f can influence the target at position p iff all its positions are < p (a
        span target: < its last position)."""
        last = torch.full((len(features),), -1, dtype=torch.long)
        last.scatter_reduce_(0, features.pairs[0], features.pairs[1], reduce="amax")
        positions = torch.tensor([target_positions(t)[-1] for t in targets], dtype=torch.long)
        return (last[None, :] < positions[:, None]).numpy()

    def attention_query_rows(self, encoded: Encoded, targets: Sequence[Target]) -> list[list[int]]:
        """The attention rows each target reads: the position that predicts its token (``position - 1``);
        for a span target, the rows predicting each of its tokens."""
        return [[p - 1 for p in target_positions(t)] for t in targets]

    # ---------------------------------------------------------------- running
    def _outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                 kept: torch.Tensor | None, targets: Sequence[Target]) -> torch.Tensor:
        """Every target's output from one model call on (B, W) rows: the token at position p is read
        from the logits at ``p - 1`` or, in a deletion row, at the last kept position before p; a
        token with no kept position before it reads an extra row holding only the start token. A
        target reads its token (a span: each of its tokens; a contrast: its foil too, from the
        same logits). Only the logit rows read are computed (``logits_to_keep``) where the model
        allows it."""
        groups = [target_positions(t) for t in targets]
        positions = torch.tensor([p for group in groups for p in group], dtype=torch.long)  # (K,)
        rows = input_ids.shape[0]
        if kept is None:
            read = (positions - 1).expand(rows, -1)
        else:
            read = kept.long().cumsum(dim=1)[:, positions - 1] - 1  # (B, K): kept positions before p, minus one
        source = torch.arange(rows)[:, None].expand_as(read)
        if bool((read < 0).any()):  # a whole prefix deleted: read the start row instead
            start_row = torch.full((1, input_ids.shape[1]), self._pad_id(), dtype=input_ids.dtype)
            start_row[0, 0] = self._start_token_id()
            start_mask = torch.zeros(1, input_ids.shape[1], dtype=attention_mask.dtype)
            start_mask[0, 0] = 1
            input_ids, attention_mask = torch.cat([input_ids, start_row]), torch.cat([attention_mask, start_mask])
            source = torch.where(read < 0, rows, source)
            read = torch.cat([read.clamp(min=0), torch.zeros(1, read.shape[1], dtype=read.dtype)])
        logits = self._read_logits(input_ids, attention_mask, read)  # (B', K, V)
        logits = logits[source.to(logits.device), torch.arange(len(positions), device=logits.device)[None]]  # (B, K, V)
        return _target_values(logits, targets, groups)

    def _gradients_of_targets(self, outputs: Callable[[], torch.Tensor], inputs: torch.Tensor, targets: Sequence[Target],
                              group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As every token adapter, except when no two targets read the same position (one per
        generated token, spans that do not overlap): then the output head runs backward once for
        all of them (models/head_split.py)."""
        groups = [target_positions(t) for t in targets]
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None or not disjoint(groups):
            return super()._gradients_of_targets(outputs, inputs, targets, group)
        length, ends = inputs.shape[1], np.cumsum([len(g) for g in groups]).tolist()

        def columns(width: int) -> list[list[int]] | None:
            if width == length:  # the head saw every position: a target reads the positions before its tokens
                return [[p - 1 for p in g] for g in groups]
            if width == ends[-1]:  # the head saw only the positions read, in the targets' order
                return [list(range(end - len(g), end)) for g, end in zip(groups, ends)]
            return None

        found = per_target_gradients(outputs, head, inputs, columns, group)
        return found if found is not None else super()._gradients_of_targets(outputs, inputs, targets, group)

    def _score_sharing_prefix(self, encoded: Encoded, ids: torch.Tensor, targets: Sequence[Target],
                              batch_size: int | None) -> torch.Tensor | None:
        """Every target's output (B, T) for token rows (B, L): one forward pass of the unperturbed
        input keeps its key/value cache; a row equal to the input takes its outputs; the others,
        sorted by first changed position and cut into chunks that minimise the positions run plus
        a cost per call (:func:`length_chunks`), run only the positions from their chunk's earliest
        change on, over a copy of that cache cut to the prefix (see models/prefix_cache.py).
        Targets before the change read the unperturbed logits. None when the model takes or
        returns no usable cache."""
        argument = cache_argument(self.model)
        if argument is None or not (self.reuses_prefix and self.keeps_logits):
            return None
        groups = [target_positions(t) for t in targets]
        read = torch.tensor([p - 1 for group in groups for p in group], dtype=torch.long)  # (K,)
        length = encoded.length
        with torch.no_grad():
            output = self._call_model(input_ids=encoded.input_ids[None], use_cache=True, logits_to_keep=read)
            cache = returned_cache(output)
            if not can_reuse(cache) or output.logits.shape[1] != len(read):
                self.reuses_prefix = False
                return None
            clean = output.logits  # (1, K, V)
            values = _target_values(clean, targets, groups).double().cpu().expand(ids.shape[0], -1).clone()
            first = first_changed(ids, encoded.input_ids)
            changed = (first < length).nonzero()[:, 0]
            if len(changed) == 0:
                return values
            order = changed[torch.argsort(length - first[changed], stable=True)]  # fewest positions to run first
            size = choose_batch_size(length, backward=False, batch_size=batch_size)
            pieces = length_chunks((length - first[order]).tolist(), max_tokens=size * length,
                                   max_rows=size if batch_size is not None else MAX_ROWS_PER_CHUNK)

            def run(rows: slice) -> torch.Tensor:
                chosen = order[rows]
                count, start = len(chosen), int(first[chosen].min())
                late = read >= start  # the logits that the change reaches
                logits = clean.expand(count, -1, -1).clone()
                if start == 0:
                    part = self._call_model(input_ids=ids[chosen], use_cache=False, logits_to_keep=read[late]).logits
                else:
                    part = self._call_model(input_ids=ids[chosen, start:], use_cache=True, logits_to_keep=read[late] - start,
                                            **{argument: prefix_of(cache, start, count)}).logits
                    self.counter.cached_positions += count * start
                logits[:, late.to(logits.device)] = part
                return _target_values(logits, targets, groups).double().cpu()

            values[order] = map_chunks(run, pieces)
        return values

    def _row_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                     targets: Sequence[Target], which: torch.Tensor) -> torch.Tensor:
        """A backward row explains one target: only the logits at that target's positions (minus one)
        are computed (not all targets', whose softmaxes a single gradient does not need)."""
        groups = [target_positions(t) for t in targets]
        which = which.cpu()
        if all(len(group) == 1 for group in groups):
            positions = torch.tensor([group[0] for group in groups], dtype=torch.long)
            read = (positions[which] - 1)[:, None]  # (B, 1)
            logits = self._read_logits(input_ids, attention_mask, read)[:, 0]  # (B, V)
            logits = check_finite(logits.to(torch.promote_types(logits.dtype, torch.float32)))
            outputs = read_outputs(logits, list(targets))  # (B, T): every target's token read from the row's logits
            return outputs.gather(1, which[:, None].to(outputs.device))[:, 0]
        width = max(len(groups[t]) for t in which.tolist())  # span rows: each row's positions, padded with its last
        read = torch.tensor([[groups[t][min(k, len(groups[t]) - 1)] - 1 for k in range(width)] for t in which.tolist()])
        logits = self._read_logits(input_ids, attention_mask, read)  # (B, width, V)
        logits = check_finite(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        values = torch.empty(len(which), dtype=logits.dtype, device=logits.device)
        for t in which.unique().tolist():
            mine = (which == t).nonzero()[:, 0].to(logits.device)
            values = values.index_put((mine,), target_value(targets[t], logits[mine, :len(groups[t])]))
        return values

    def _values_and_ranks(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None, targets: list[Target],
                          which: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and ranks of the targets (B, T), or of row b's target ``which[b]`` (B,), from one model
        call that reads only the logits needed, on rows cut after the last position read (the logits at
        ``p - 1`` do not see the tokens from ``p`` on). A span's rank is its worst token's."""
        groups = [target_positions(t) for t in targets]
        tokens = [list(t.span) if t.span is not None else [t.index] for t in targets]
        per_row = [list(range(len(targets)))] * len(ids) if which is None else [[t] for t in which.tolist()]
        width = max(len([p for t in row for p in groups[t]]) for row in per_row)
        # each row's positions (targets in order, padded with its last): read at p - 1, ranked for the token at p
        flat = [[(p, k) for t in row for p, k in zip(groups[t], tokens[t])] for row in per_row]
        flat = [row + [row[-1]] * (width - len(row)) for row in flat]
        read = torch.tensor([[p - 1 for p, _ in row] for row in flat])
        token = torch.tensor([[k for _, k in row] for row in flat])
        end = int(read.max()) + 1
        logits = self._read_logits(ids[:, :end], torch.ones_like(ids[:, :end]), read)  # (B, width, V)
        logits = check_finite(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        token = token.to(logits.device)
        rank = (logits > logits.gather(2, token[..., None])).sum(dim=-1)  # (B, width)
        if which is None:
            ends = np.cumsum([len(g) for g in groups]).tolist()
            ranks = torch.stack([rank[:, e - len(g):e].amax(dim=1) for g, e in zip(groups, ends)], dim=1)
            return _target_values(logits, targets, groups), ranks
        values = torch.empty(len(ids), dtype=logits.dtype, device=logits.device)
        ranks_of = torch.empty(len(ids), dtype=rank.dtype, device=logits.device)
        for t in which.unique().tolist():
            mine = (which == t).nonzero()[:, 0].to(logits.device)
            n = len(groups[t])
            values[mine] = target_value(targets[t], logits[mine, :n])
            ranks_of[mine] = rank[mine, :n].amax(dim=1)
        return values, ranks_of

    def _read_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, V) at positions ``read`` (B, K) of each row, from one model call."""
        if self.keeps_logits:
            logits = self._call_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                      logits_to_keep=read).logits
            if logits.shape[:2] == read.shape:
                return logits
            self.keeps_logits = False  # a model with its own slicing: read the full logits from now on
        full = self._call_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return torch.take_along_dim(full, read.to(full.device)[..., None], dim=1)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self._start_token_id()

    def _start_token_id(self) -> int:
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return int(token)
        raise ParameterError(f"the tokenizer of {self.name} has neither BOS nor EOS to stand for an empty context; "
                             "use a replacement baseline instead of 'delete'")


def _target_values(logits: torch.Tensor, targets: Sequence[Target], groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each target's output (B, T) from the logits (B, K, V) read for the targets' positions,
    ``groups`` giving each target's positions in order (K = their total)."""
    logits = check_finite(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    ends = np.cumsum([len(group) for group in groups]).tolist()
    return torch.stack([target_value(target, logits[:, end - len(group):end])
                        for target, group, end in zip(targets, groups, ends)], dim=1)


def _keeps_logits_per_row(model: nn.Module) -> bool:
    """Whether ``model`` takes per-row positions in ``logits_to_keep`` (a (B, K) tensor): its forward
    has the argument and transformers has the shared slicing helper that reads such a tensor."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    try:
        from transformers import modeling_utils
    except ImportError:
        return False
    return hasattr(modeling_utils, "slice_logits_to_keep")


def _mark_template(part: tuple[list[int], list[tuple[int, int]], list[bool]], chat: Chat, *,
                   include: bool) -> tuple[tuple[list[int], list[tuple[int, int]], list[bool]], list[int]]:
    """The rendered chat's tokens with the template's own tokens (those whose first character is in
    no message's content) marked special unless ``include``; and the template tokens' positions."""
    ids, offsets, special = part
    template = [t for t, (a, b) in enumerate(offsets) if not (b > a and chat.content_of(a))]
    if not include:
        marked = set(template)
        special = [s or t in marked for t, s in enumerate(special)]
    return (ids, offsets, special), template


def _chat_extras(chat: Chat, continuation: str, template: list[int]) -> dict[str, object]:
    """What an Explanation keeps of a chat: the messages, each message's characters in the prompt and
    the assistant turn (the continuation, segment 1), and the template tokens' positions."""
    assistant = {"role": "assistant", "message": None, "segment": CONTINUATION, "start": 0, "end": len(continuation)}
    return {"messages": chat.messages, "segments": [*chat.segments, assistant], "template_positions": template}


def _spans(target_span: Sequence[int] | Sequence[Sequence[int]] | str, count: int) -> list[list[int]]:
    """One ``(start, end)`` or a list of them, each checked against the ``count`` continuation tokens;
    ``"all"``: the whole continuation as one span."""
    if isinstance(target_span, str) and target_span == "all":
        return [[0, count]]
    one = isinstance(target_span, (tuple, list)) and len(target_span) == 2 and all(isinstance(v, int) for v in target_span)
    spans = [target_span] if one else list(target_span)  # type: ignore[arg-type]
    if not spans:
        raise ParameterError("target_span is empty; give (start, end) of continuation token indices")
    return [list(span_bounds(span, count)) for span in spans]
