"""A causal LM's prompt built from a context and a query, and the context's sources as character
spans of that prompt (ContextCite's setting: Cohen-Wang et al. 2024, "ContextCite: Attributing
Model Generation to Context").

The prompt is ``template`` with ``{context}`` and ``{query}`` filled in (the ``context-cite``
package's default, ``"Context: {context}\\n\\nQuery: {query}"``), sent as one user message through
the tokenizer's chat template when it has one (as the package does), else as plain text. The
sources are the context's sentences (:func:`salience.core.aggregate.sentence_spans`), its words
(:func:`~salience.core.aggregate.word_spans`) or character spans of the context the user gives.
Each source's span in the prompt text starts after the whitespace that precedes it, so that a
token carrying a leading space (byte-level BPE's " The") belongs to the source it begins, and
removing a source removes its separator too (as the package drops a part with its separator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from salience.core.aggregate import sentence_spans, word_spans
from salience.errors import InputError, ParameterError
from salience.models.chat import render_chat

PROMPT_TEMPLATE = "Context: {context}\n\nQuery: {query}"
SOURCES = ("sentence", "word")
SourceSpec = str | Sequence[Sequence[int]]

__all__ = ["PROMPT_TEMPLATE", "SOURCES", "ContextPrompt", "context_prompt"]


@dataclass(frozen=True)
class ContextPrompt:
    """What a causal LM encodes (``prompt``: a text, or one user message for its chat template), the
    prompt text the features' offsets refer to (``text``: the rendered chat, or the prompt itself),
    where the context starts in it, and each source's span [start, end) in ``text``."""

    prompt: str | list[dict[str, str]]
    text: str
    context_start: int
    spans: list[tuple[int, int]]
    sources: str


def context_prompt(tokenizer: Any, context: str, query: str | None = None, *, sources: SourceSpec = "sentence",
                   template: str = PROMPT_TEMPLATE, chat: bool | None = None) -> ContextPrompt:
    """The prompt for ``context`` and ``query`` (an empty or missing query is allowed: the template's
    query part is left empty) and the spans of the context's sources in it. ``sources``:
    ``"sentence"``, ``"word"`` or a list of ``(start, end)`` character spans of the context.
    ``chat``: use the tokenizer's chat template (default: when it has one)."""
    if not isinstance(context, str) or not context.strip():
        raise InputError("the context is empty" if isinstance(context, str) else "the context must be a text")
    query = "" if query is None else query
    if not isinstance(query, str):
        raise InputError("the query must be a text")
    if template.count("{context}") != 1:
        raise ParameterError("the prompt template must contain '{context}' exactly once")
    cut = template.index("{context}")
    before = template[:cut].replace("{query}", query)
    filled = before + context + template[cut + len("{context}"):].replace("{query}", query)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        messages = [{"role": "user", "content": filled}]
        rendered = render_chat(tokenizer, messages)
        text, start = rendered.text, rendered.segments[0]["start"] + len(before)
        prompt: str | list[dict[str, str]] = messages
    else:
        text, start, prompt = filled, len(before), filled
    if text[start:start + len(context)] != context:
        raise InputError("the chat template changes the context's text, so its sources cannot be located; pass chat=False")
    spans = [(_after_previous_text(text, start + a), start + b) for a, b in _source_spans(context, sources)]
    return ContextPrompt(prompt, text, start, spans, sources if isinstance(sources, str) else "spans")


def _source_spans(context: str, sources: SourceSpec) -> list[tuple[int, int]]:
    """The sources' character spans [start, end) in ``context``."""
    if isinstance(sources, str):
        if sources not in SOURCES:
            raise ParameterError(f"unknown sources {sources!r}; choose 'sentence', 'word' or a list of (start, end) spans")
        return sentence_spans(context) if sources == "sentence" else word_spans(context)
    spans = []
    for span in sources:
        if not (isinstance(span, (tuple, list)) and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise ParameterError(f"a source span is (start, end) in characters of the context, got {span!r}")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= len(context) or not context[start:end].strip():
            raise ParameterError(f"source span ({start}, {end}) is empty or outside the context (0-{len(context)} characters)")
        spans.append((start, end))
    return spans


def _after_previous_text(text: str, start: int) -> int:
    """``start`` moved back over the whitespace before it (to just after the previous non-space)."""
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return start
