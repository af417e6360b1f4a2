"""A causal LM used as a zero-shot classifier through a prompt template and label verbalisations.

``PromptClassifier(lm, template="Review: {text}\\nSentiment:", labels={"negative": " negative",
"positive": " positive"})``: the text fills the template's ``{text}`` slot; the score of class c is
the log-probability of its verbalisation v_c after the filled template, teacher-forced,

    s_c = sum_j log p(v_c,j | template(text), v_c,<j)      (nats, <= 0),

and the class probabilities are the softmax of the scores over the labels, i.e. p(v_c) renormalised
over the labels: p_c = p(v_c) / sum_c' p(v_c'). So ``output="logit"`` explains s_c itself (the
verbalisation's log-probability under the LM, not renormalised), ``"log_probability"`` log p_c,
``"probability"`` p_c and ``"log_odds"`` (the default) log(p_c / (1 - p_c)), for two labels
s_c - s_other.

Features are the words (or tokens) of the text only: the template's tokens (and BOS, and a chat
template's tokens) are special, so they are never features, and they keep their values in every
baseline; perturbation methods delete or replace the text's tokens, gradient methods take the
gradient w.r.t. the word embeddings of the filled template (zero on the template's tokens).

Cost: one evaluation (one perturbed or interpolated row) runs R = max(1, number of labels whose
verbalisation has several tokens) LM rows: every single-token verbalisation is read from the
logits at the template's last position, shared by all rows; a multi-token verbalisation needs its
own teacher-forced row (prompt + its tokens). A gradient costs one backward row per label (the
gradient of each s_c, combined by the chain rule through the output).

The template is a text with exactly one ``{text}`` (other braces are literal), or chat messages
(``[{"role": "user", "content": "Review: {text}"}]``, ``{text}`` in exactly one content) to which
the tokenizer's chat template is applied (with the generation prompt). A verbalisation whose first
token would merge with the template's last token (the LM would never see the two apart) is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from salience.core.features import Feature, FeatureSet
from salience.core.target import Prediction, Target, prediction_from_logits, read_outputs
from salience.errors import InputError, ParameterError, indefinite
from salience.models.base import Encoded
from salience.models.causal_lm import CausalLM
from salience.models.chat import is_messages, render_chat
from salience.models.passes import as_targets
from salience.models.tokens import words_of

SLOT = "{text}"
MARKER = "SALIENCETEXTSLOTMARKER"
Template = str | Sequence[Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class _Row:
    """One teacher-forced LM row of an evaluation: the prompt plus ``continuation`` token ids; its
    ``targets`` are the class scores read from it (label ``classes[i]`` from ``targets[i]``)."""

    encoded: Encoded
    targets: list[Target]
    classes: list[int]


class PromptClassifier:
    """Classify a text into ``labels`` (name -> verbalisation) with a :class:`CausalLM` and a template."""

    kind = "text classifier"
    default_output = "log_odds"  # log(p / (1 - p)) of the renormalised label probability

    def __init__(self, lm: CausalLM, template: Template, labels: Mapping[str, str], *, name: str | None = None) -> None:
        if not isinstance(lm, CausalLM):
            raise ParameterError(f"a prompt classifier wraps a causal LM adapter, not {indefinite(getattr(lm, 'kind', type(lm).__name__))}")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.template = _checked_template(template)
        self.prefix, self.suffix = self._template_parts()
        self.labels, self.verbalisations = _checked_labels(labels)
        self.label_ids = [self._tokenise(v) for v in self.verbalisations]
        empty = [n for n, ids in zip(self.labels, self.label_ids) if not ids]
        if empty:
            raise ParameterError(f"the verbalisation of label {empty[0]!r} tokenises to no token")
        seen: dict[tuple[int, ...], str] = {}
        for label, ids in zip(self.labels, self.label_ids):
            if tuple(ids) in seen:
                raise ParameterError(f"labels {seen[tuple(ids)]!r} and {label!r} have verbalisations with the same tokens")
            seen[tuple(ids)] = label
        self._check_merges(self.prefix + "text" + self.suffix)  # early: most merges do not depend on the text
        self.name = name or f"{lm.name} (prompt: {', '.join(self.labels)})"
        self.counter = lm.counter
        self.max_length = lm.max_length
        self.baselines = lm.baselines

    # ------------------------------------------------------------- template
    def _template_parts(self) -> tuple[str, str]:
        """The filled template's text before and after the text."""
        if isinstance(self.template, str):
            before, _, after = self.template.partition(SLOT)
            return before, after
        marked = [{**m, "content": m["content"].replace(SLOT, MARKER)} for m in self.template]
        rendered = render_chat(self.tokenizer, marked).text
        if rendered.count(MARKER) != 1:
            raise ParameterError("the chat template does not keep the {text} slot's place in the rendered prompt")
        before, _, after = rendered.partition(MARKER)
        return before, after

    def fill(self, text: str) -> str:
        """The prompt the LM reads for ``text`` (a chat's rendered text)."""
        prompt = self.prefix + text + self.suffix
        if not isinstance(self.template, str):
            filled = [{**m, "content": m["content"].replace(SLOT, text)} for m in self.template]
            if render_chat(self.tokenizer, filled).text != prompt:
                raise InputError("the chat template changes the text (e.g. strips its spaces); give it without them")
        return prompt

    def _tokenise(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def _check_merges(self, prompt: str) -> None:
        """Refuse a verbalisation whose tokens change when it follows the prompt (a token across the
        boundary): the teacher-forced scores would be of a tokenisation the LM never reads."""
        alone = self._tokenise(prompt)
        for label, verbalisation, ids in zip(self.labels, self.verbalisations, self.label_ids):
            if self._tokenise(prompt + verbalisation) != alone + ids:
                raise ParameterError(
                    f"the verbalisation {verbalisation!r} of label {label!r} merges with the template's end "
                    f"{prompt[-12:]!r} when tokenised together; start the verbalisation with a space (ending the template "
                    "without one) or end the template differently")

    # ------------------------------------------------------------- encoding
    def encode(self, inputs: str, *, truncate: bool = False) -> Encoded:
        """Fill the template with the text and tokenise it; the text's tokens are the features (word
        offsets into the text), every other token is special."""
        if not isinstance(inputs, str):
            raise InputError("a prompt classifier explains a single text, not a pair or a list")
        if not inputs.strip():
            raise InputError("the text is empty")
        text, truncated = inputs, False
        while True:
            encoded, over = self._encode_text(text)
            if over <= 0:
                break
            if not truncate:
                raise InputError(f"the filled template plus the longest verbalisation has {over} tokens over the model's "
                                 f"context length of {self.max_length}; shorten the text or pass truncate=True")
            text_tokens = encoded.token_features
            if len(text_tokens) <= over:
                raise InputError("the template alone fills the model's context length")
            text, truncated = text[: text_tokens[-over].start].rstrip(), True
        self._check_merges(str(encoded.extras["filled_template"]))
        return dataclasses.replace(encoded, input=text, truncated=truncated)

    def _encode_text(self, text: str) -> tuple[Encoded, int]:
        """The encoded text and how many tokens the longest row is over the context length."""
        prompt = self.fill(text)
        glued = (self.prefix[-1:] + text[:1], text[-1:] + self.suffix[:1])
        if any(len(pair) == 2 and pair.isalnum() for pair in glued):
            raise InputError(f"the text's words run into the template's ({self.prefix[-8:]!r}{{text}}{self.suffix[:8]!r}): "
                             "put a space or a line break between {text} and the template's words")
        enc = self.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        ids = [int(i) for i in enc["input_ids"]]
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        specials = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        start, end = len(self.prefix), len(self.prefix) + len(text)
        inside = [s is not None and i not in specials and _in_text(prompt, a, b, start, end)
                  for i, s, (a, b) in zip(ids, enc.sequence_ids(0), offsets)]
        # offsets into the text; a token's leading space from the template is left out
        local = [(max(a, start) - start, min(b, end) - start) if keep else (0, 0) for keep, (a, b) in zip(inside, offsets)]
        segment: list[int | None] = [0 if keep else None for keep in inside]
        tokens = [self.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
        token_features = [Feature(tokens[t], local[t][0], local[t][1], 0, (t,)) for t in range(len(ids)) if inside[t]]
        words = words_of(text, 0, local, segment)
        if not words:
            raise InputError("the text has no words the tokenizer keeps")
        encoded = Encoded(input=text, input_ids=torch.tensor(ids, dtype=torch.long), token_type_ids=None, tokens=tokens,
                          special=~torch.tensor(inside, dtype=torch.bool), words=words, token_features=token_features,
                          extras={"filled_template": prompt})
        over = len(ids) + max(len(v) for v in self.label_ids) - self.max_length
        return encoded, over

    def _rows(self, encoded: Encoded) -> list[_Row]:
        """The LM rows of one evaluation, built from ``encoded``'s ids (so an input whose ids were
        replaced, e.g. by max-sensitivity, is scored as it now is): one per multi-token
        verbalisation (its own teacher-forced tokens, one span target); the single-token labels are
        read at the prompt's end of the first row (the prompt alone when every verbalisation is one
        token)."""
        length = encoded.length
        multi = [c for c, ids in enumerate(self.label_ids) if len(ids) > 1]
        single = [c for c, ids in enumerate(self.label_ids) if len(ids) == 1]
        rows = []
        for r, owner in enumerate(multi or [None]):
            continuation = [] if owner is None else self.label_ids[owner]
            classes = ([] if owner is None else [owner]) + (single if r == 0 else [])
            targets = [Target(self.label_ids[c][0], self.labels[c], "log_probability", length,
                              span=tuple(self.label_ids[c]) if len(self.label_ids[c]) > 1 else None) for c in classes]
            ids = torch.cat([encoded.input_ids, torch.tensor(continuation, dtype=torch.long)])
            special = torch.cat([encoded.special, torch.ones(len(continuation), dtype=torch.bool)])
            row = Encoded(input=encoded.input, input_ids=ids, token_type_ids=None, tokens=[], special=special,
                          words=[], token_features=[], extras={"prompt_length": length})
            rows.append(_Row(row, targets, classes))
        return rows

    def baseline_token_id(self, baseline: str) -> int:
        """The LM's token for a named baseline (``eos``, ``unk``, ``pad``) or a one-token text."""
        return self.lm.baseline_token_id(baseline)

    def describe_input(self, encoded: Encoded) -> dict[str, object]:
        """Kept in the Explanation: the template, the verbalisations and the filled prompt."""
        template: object = self.template if isinstance(self.template, str) else [dict(m) for m in self.template]
        return {"prompt_template": template, "verbalisations": dict(zip(self.labels, self.verbalisations)),
                "filled_template": encoded.extras["filled_template"]}

    # ------------------------------------------------------------- scoring
    def bytes_per_row(self, seq_len: int, *, backward: bool) -> int:
        """One evaluation row is R LM rows forward (one per label backward), each the prompt plus
        the longest verbalisation."""
        rows = len(self.labels) if backward else max(1, sum(len(ids) > 1 for ids in self.label_ids))
        return rows * self.lm.bytes_per_row(seq_len + max(len(ids) for ids in self.label_ids), backward=backward)

    def predict(self, encoded: Encoded) -> Prediction:
        """The argmax label and the probabilities renormalised over the labels (one evaluation: R LM rows)."""
        keep = torch.ones(1, len(encoded.words), dtype=torch.bool)
        return prediction_from_logits(self.class_scores(encoded, keep, encoded.words, "delete")[0], self.labels)

    def class_scores(self, encoded: Encoded, keep: torch.Tensor, features: Sequence[Feature], baseline: str,
                     batch_size: int | None = None) -> torch.Tensor:
        """Class scores s_c (B, C), float64: log-probabilities of the verbalisations in each row of
        ``keep`` (B, F), features not kept replaced by ``baseline`` or deleted."""
        scores = torch.empty(keep.shape[0], len(self.labels), dtype=torch.float64)
        for row in self._rows(encoded):
            values = self.lm.score_perturbed(row.encoded, keep, features, baseline, row.targets, batch_size)
            scores[:, row.classes] = values.double().cpu()
        return scores

    def features(self, encoded: Encoded, level: str, **options: Any) -> FeatureSet:
        return self.lm.features(encoded, level, **options)

    def available(self, encoded: Encoded, targets: Sequence[Target], features: FeatureSet) -> np.ndarray:
        """Every text feature precedes the verbalisations, so each can influence every class."""
        return np.ones((len(targets), len(features)), dtype=bool)

    def check_baseline(self, baseline: str, *, perturbation: bool) -> str:
        return self.lm.check_baseline(baseline, perturbation=perturbation)

    def score_perturbed(self, encoded: Encoded, keep: torch.Tensor, features: Sequence[Feature], baseline: str,
                        target: Target | Sequence[Target], batch_size: int | None = None) -> torch.Tensor:
        """Each class target's output (read from the class scores, see the module) per row of ``keep``."""
        targets, single = as_targets(target)
        values = read_outputs(self.class_scores(encoded, keep, features, baseline, batch_size), targets)
        return values[:, 0] if single else values

    def input_and_baseline(self, encoded: Encoded, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings (L, D) of the filled template and its baseline (the text's tokens replaced;
        the template's tokens keep their embeddings)."""
        return self.lm.input_and_baseline(encoded, baseline)

    def score_inputs(self, encoded: Encoded, rows: torch.Tensor, target: Target | Sequence[Target], *, grad: bool,
                     batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs of the class targets for embedding rows (N, L, D) of the filled template, each
        completed with the verbalisations' embeddings; with ``grad`` the gradient combines the
        per-label gradients d s_c / d rows by the chain rule through the output (softmax)."""
        targets, single = as_targets(target)
        n, length = rows.shape[0], encoded.length
        z = torch.empty(n, len(self.labels), dtype=torch.float64)
        per_label: list[torch.Tensor | None] = [None] * len(self.labels)
        for row in self._rows(encoded):
            with torch.no_grad():
                tail = self.lm.embedding_layer(row.encoded.input_ids[length:][None].to(self.lm.device))[0]
            full = torch.cat([rows, tail.expand(n, -1, -1).to(rows)], dim=1)
            values, gradient = self.lm.score_inputs(row.encoded, full, row.targets, grad=grad, batch_size=batch_size)
            z[:, row.classes] = values.double().cpu()
            if gradient is not None:
                for i, c in enumerate(row.classes):
                    per_label[c] = gradient[:, i, :length]
        out = read_outputs(z, targets)  # (N, T)
        gradients = None
        if grad:
            jacobian = _output_jacobian(z, targets)  # (N, T, C)
            stacked = torch.stack([g for g in per_label if g is not None], dim=1)  # (N, C, L, D)
            gradients = torch.einsum("ntc,ncld->ntld", jacobian.to(stacked), stacked).to(rows)
        if single:
            return out[:, 0], None if gradients is None else gradients[:, 0]
        return out, gradients


def _output_jacobian(z: torch.Tensor, targets: list[Target]) -> torch.Tensor:
    """d output_t / d z_c (N, T, C) of ``read_outputs`` at the class scores z (N, C), by autograd."""
    point = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = read_outputs(point, targets)
        columns = [torch.autograd.grad(out[:, t].sum(), point, retain_graph=True)[0] for t in range(len(targets))]
    return torch.stack(columns, dim=1)


def _in_text(prompt: str, begin: int, end: int, start: int, stop: int) -> bool:
    """Whether token [begin, end) of the prompt belongs to the text [start, stop): its non-space
    characters all lie inside (a leading space of the template may ride along, as in ' dull');
    a token with characters on both sides is refused (it cannot be removed without the template)."""
    visible = [i for i in range(begin, end) if not prompt[i].isspace()] or list(range(begin, min(begin + 1, end)))
    if not visible:
        return False
    inside = [start <= i < stop for i in visible]
    if all(inside):
        return True
    if any(inside):
        raise InputError(f"the token {prompt[begin:end]!r} spans the text and the template around it; "
                         "put a space or a line break between {text} and the template's words")
    return False


def _checked_template(template: Template) -> Template:
    if isinstance(template, str):
        count = template.count(SLOT)
    elif is_messages(template):
        contents = [m.get("content") for m in template]
        if not all(isinstance(c, str) for c in contents):
            raise ParameterError("every chat message of the template needs a text content")
        count = sum(str(c).count(SLOT) for c in contents)
        template = [dict(m) for m in template]
    else:
        raise ParameterError("a prompt template is a text with {text} or a list of chat messages ({'role', 'content'})")
    if count == 0:
        raise ParameterError("the prompt template has no {text} slot for the text to classify")
    if count > 1:
        raise ParameterError(f"the prompt template has {count} {{text}} slots; give exactly one")
    return template


def _checked_labels(labels: Mapping[str, str]) -> tuple[list[str], list[str]]:
    if not isinstance(labels, Mapping):
        raise ParameterError('labels map each label name to its verbalisation, e.g. {"negative": " negative", "positive": " positive"}')
    if len(labels) < 2:
        raise ParameterError(f"a prompt classifier needs at least two labels, got {len(labels)}")
    names, verbalisations = [], []
    for name, verbalisation in labels.items():
        if not isinstance(name, str) or not name.strip():
            raise ParameterError(f"label name {name!r} is empty or not a text")
        if not isinstance(verbalisation, str) or not verbalisation:
            raise ParameterError(f"the verbalisation of label {name!r} is empty")
        if verbalisation in verbalisations:
            other = names[verbalisations.index(verbalisation)]
            raise ParameterError(f"labels {other!r} and {name!r} have the same verbalisation {verbalisation!r}")
        names.append(name)
        verbalisations.append(verbalisation)
    return names, verbalisations
