"""The live explain page (``salience serve --model M``): type a text (a prompt for a causal LM) or
upload an image (an image classifier; see :mod:`salience.serve.upload`), pick methods, see each
explanation side by side with its cost (image overlays drawn on the server as PNG data URIs).
Nothing is written anywhere unless the server runs with ``--record``
(:mod:`salience.serve.record`): then each request becomes one example of the day's live run.

One model, one worker thread: requests queue for it (a queue of one computation at a time; at
most ``MAX_WAITING`` more wait, further ones get 503 at once). A request waits at most
``time_limit`` seconds for its explanations, then gets 504; the computation it started cannot be
interrupted inside torch and finishes in the background (the queue moves on after it).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from salience.errors import ParameterError, SalienceError

MAX_TEXT = 2000  # characters of a typed text or prompt
MAX_BODY = 64 * 1024  # bytes of a form submission
MAX_METHODS = 4
MAX_WAITING = 4
TIME_LIMIT = 60.0  # seconds a request waits for its explanations (queue time included)
DEFAULT_METHODS = ("occlusion", "saliency", "input_x_gradient", "integrated_gradients")


class Busy(SalienceError):
    """Too many requests are waiting for the model (HTTP 503)."""


class TooSlow(SalienceError):
    """The explanations were not ready within the time limit (HTTP 504)."""


@dataclass(frozen=True)
class LiveResult:
    method: str
    html: str  # the renderer's escaped fragment, or an escaped error line
    seconds: float


@dataclass(frozen=True)
class LiveOutcome:
    """One request's explanations and, with --record, where they were stored (or why not)."""

    results: list[LiveResult] = field(default_factory=list)
    note: str = ""


class LiveModel:
    """A loaded adapter behind a one-thread executor (the per-model queue); ``record``: a
    :class:`~salience.serve.record.Recorder` that stores each request (None: nothing is stored)."""

    def __init__(self, name: str, *, time_limit: float = TIME_LIMIT, model: Any = None, record: Any = None) -> None:
        if model is None:
            from salience.models.loading import load_model

            model = load_model(name)
        kind = getattr(model, "kind", "text classifier")
        self.record = record
        self.name = name
        self.model = model
        self.kind = kind
        self.time_limit = time_limit
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="salience-live")
        self.waiting = 0
        self.lock = threading.Lock()

    @property
    def input_name(self) -> str:
        return {"causal LM": "prompt", "image classifier": "image"}.get(self.kind, "text")

    @property
    def takes_images(self) -> bool:
        return self.kind == "image classifier"

    def methods(self) -> list[str]:
        """Methods offered on the form: the defaults that are registered."""
        from salience.core.registry import all_methods

        known = {m.name for m in all_methods()}
        return [m for m in DEFAULT_METHODS if m in known]

    def explain(self, value: Any, methods: list[str]) -> LiveOutcome:
        """Queue the explanations of ``value`` (a text, or H x W x 3 uint8 pixels) by ``methods``;
        Busy or TooSlow when they cannot be had."""
        with self.lock:
            if self.waiting >= MAX_WAITING + 1:
                raise Busy(f"{self.waiting} requests are already waiting for {self.name}; try again in a moment")
            self.waiting += 1
        future: Future[LiveOutcome] = self.executor.submit(self._compute, value, methods)
        try:
            return future.result(timeout=self.time_limit)
        except FutureTimeout:
            future.cancel()  # a request still queued is dropped; one already running finishes in the background
            raise TooSlow(f"the explanations took longer than the {self.time_limit:g} s limit") from None
        finally:
            with self.lock:
                self.waiting -= 1

    def _compute(self, value: Any, methods: list[str]) -> LiveOutcome:
        import warnings
        from html import escape

        import salience.render  # noqa: F401  (registers the renderers)
        from salience.api import explain
        from salience.render.html import explanation_html

        results, units = [], []
        for method in methods:
            started = time.perf_counter()
            explanation, error = None, None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an explanation carries its warnings; the renderer shows them
                    explanation = explain(self.model, value, method=method, progress=False)
                html = explanation_html([explanation], standalone=False)  # type: ignore[list-item]
            except SalienceError as failure:
                error = f"{type(failure).__name__}: {failure}"
                html = f'<div class="failed">{escape(error)}</div>'
            seconds = time.perf_counter() - started
            results.append(LiveResult(method, html, seconds))
            units.append((method, explanation, error, seconds))
        return LiveOutcome(results, self._record(value, units))

    def _record(self, value: Any, units: list[tuple[str, Any, str | None, float]]) -> str:
        """With --record: store the request and say where; a failure to store is said, not raised."""
        if self.record is None:
            return ""
        import sqlite3

        try:
            example_id, run_name = self.record.record(value, units)
        except (SalienceError, sqlite3.Error, OSError) as error:
            return f"not recorded: {str(error)[:200]}"
        return f"recorded as example {example_id} of run {run_name}"

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def parse_form(body: bytes, offered: list[str]) -> tuple[str, list[str]]:
    """The submitted (text, methods), checked: a text of 1..MAX_TEXT characters, 1..MAX_METHODS
    methods among ``offered``; anything else is a ParameterError (HTTP 400)."""
    if len(body) > MAX_BODY:
        raise ParameterError(f"the form is larger than {MAX_BODY // 1024} KiB")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_METHODS + 8, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as error:
        raise ParameterError(f"the form cannot be read: {str(error)[:80]}") from None
    text = fields.get("text", [""])[0]
    if not text.strip():
        raise ParameterError("type a text to explain")
    if len(text) > MAX_TEXT:
        raise ParameterError(f"the text has {len(text)} characters; the live page takes at most {MAX_TEXT}")
    methods = fields.get("method", [])
    if not methods:
        raise ParameterError("pick at least one method")
    for method in methods:
        if method not in offered:
            raise ParameterError(f"unknown method {method[:60]!r}; the live page offers {', '.join(offered)}")
    return text, list(dict.fromkeys(methods))[:MAX_METHODS]
