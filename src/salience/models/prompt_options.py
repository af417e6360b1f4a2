"""Command-line spellings of a :class:`~salience.PromptClassifier`'s template and labels, shared by
``salience explain`` and ``salience evaluate`` (``--prompt-template``, ``--labels``)."""

from __future__ import annotations

import json
from typing import Any

from salience.errors import ParameterError


def parse_prompt_options(template: str | None, labels: str | None) -> tuple[Any, dict[str, str] | None]:
    """``--prompt-template`` and ``--labels`` parsed: (None, None) when neither is given; one without
    the other is an error."""
    if template is None and labels is None:
        return None, None
    if template is None or labels is None:
        raise ParameterError("--prompt-template and --labels go together (a causal LM as a zero-shot classifier)")
    return parse_template_option(template), parse_labels_option(labels)


def parse_template_option(text: str) -> Any:
    """A template with ``{text}`` (backslash escapes ``\\n`` and ``\\t`` read) or, when it starts with
    ``[``, a JSON list of chat messages."""
    if text.lstrip().startswith("["):
        return _parsed_json(text, "[")
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def parse_labels_option(text: str) -> dict[str, str]:
    """``negative= negative,positive= positive`` (what the shell leaves of negative=" negative",...),
    a JSON object, or bare names (verbalised with a leading space)."""
    if text.lstrip().startswith("{"):
        parsed = _parsed_json(text, "{")
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ParameterError("--labels as JSON is an object of label name -> verbalisation text")
        return {str(k): v for k, v in parsed.items()}
    labels: dict[str, str] = {}
    for item in text.split(","):
        name, sep, verbalisation = item.partition("=")
        name = name.strip()
        if not name:
            raise ParameterError(f"--labels {text!r} has an empty label name; write NAME=VERBALISATION,...")
        if name in labels:
            raise ParameterError(f"--labels names {name!r} twice")
        labels[name] = verbalisation if sep else f" {name}"
    return labels


def _parsed_json(text: str, opening: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ParameterError(f"{text[:40]!r} starts with {opening!r} but is not valid JSON: {error.msg}") from error
