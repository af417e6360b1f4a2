"""Chat messages as a causal LM's prompt: the tokenizer's chat template applied, and which characters
of the rendered text come from which message.

The prompt is ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
(the text the model sees, ending with the assistant turn's header). To know which characters are
a message's, the template is rendered a second time with each content replaced by a unique
marker: the text between the markers is the template's own (role headers, ``<|im_start|>``, a
default system prompt the template adds, newlines), and putting the contents (as given, or
stripped for templates that trim them) back between those pieces must give the real rendering
exactly, else the messages are refused. So a content that also occurs in the template's text
(a user message "a" and a system prompt "You are a ...") is never confused with it. A token
belongs to a message when its first character lies inside the message's content.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from salience.errors import InputError

ROLES = ("system", "user", "assistant")


def is_messages(inputs: Any) -> bool:
    """Whether ``inputs`` is one chat: a non-empty list of mappings (``{"role": ..., "content": ...}``)."""
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(m, Mapping) for m in inputs)


@dataclass(frozen=True)
class Chat:
    """A rendered chat: the prompt text, the messages as given (plain dicts) and one segment per
    message, ``{"role", "message" (its index), "segment": 0, "start", "end"}`` (characters of
    ``text``, end exclusive)."""

    text: str
    messages: list[dict[str, str]]
    segments: list[dict[str, Any]]

    def content_of(self, start: int) -> bool:
        """Whether character ``start`` of the text belongs to a message's content."""
        return any(s["start"] <= start < s["end"] for s in self.segments)


def turn_of(segments: Sequence[Mapping[str, Any]], segment: int, start: int) -> Mapping[str, Any] | None:
    """The turn (an entry of ``extras["segments"]``) that holds a feature of text ``segment`` (0 the
    prompt, 1 the continuation) starting at character ``start``; None for a template token."""
    return next((s for s in segments if s["segment"] == segment and s["start"] <= start < s["end"]), None)


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> Chat:
    """Apply ``tokenizer``'s chat template to ``messages`` (with the generation prompt) and locate each
    message's content in the result. Unknown roles, non-text or empty contents, a last message from
    the assistant and a tokenizer without a template are :class:`InputError`."""
    checked = _checked(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template; give the prompt as a text instead of messages")
    text = _render(tokenizer, checked)
    markers = [f"SALIENCEMESSAGE{i}MARKER" for i in range(len(checked))]
    marked = _render(tokenizer, [{**m, "content": marker} for m, marker in zip(checked, markers)])
    pieces = _pieces(marked, markers)
    for contents in ([m["content"] for m in checked], [m["content"].strip() for m in checked]):
        if pieces is not None and "".join(p + c for p, c in zip(pieces, [*contents, ""])) == text:
            segments, cursor = [], 0
            for index, (message, piece, content) in enumerate(zip(checked, pieces, contents)):
                start = cursor + len(piece)
                segments.append({"role": message["role"], "message": index, "segment": 0, "start": start,
                                 "end": start + len(content)})
                cursor = start + len(content)
            return Chat(text, checked, segments)
    raise InputError("the chat template rewrites the messages' texts, so their characters cannot be located "
                     "in the prompt; give the prompt as a text instead")


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise InputError("the tokenizer's chat template did not render to a text")
    return text


def _pieces(marked: str, markers: list[str]) -> list[str] | None:
    """The template's text before each marker and after the last (len(markers) + 1 pieces), or None
    when a marker is missing, repeated or out of order."""
    pieces, cursor = [], 0
    for marker in markers:
        at = marked.find(marker, cursor)
        if at < 0 or marked.count(marker) != 1:
            return None
        pieces.append(marked[cursor:at])
        cursor = at + len(marker)
    return [*pieces, marked[cursor:]]


def _checked(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    if not is_messages(messages):
        raise InputError("chat messages are a non-empty list of {'role': ..., 'content': ...}")
    checked = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"message {index} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"message {index} ({role}) has no text content")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise InputError(f"message {index} has keys other than role and content: {', '.join(map(str, extra))}")
        checked.append({"role": str(role), "content": content})
    if checked[-1]["role"] == "assistant":
        raise InputError("the last message is the assistant's: give its text as continuation=... to explain it")
    return checked
