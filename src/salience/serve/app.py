"""The viewer's Starlette application: read-only pages over one results database.

Routes (all GET, all rendered on the server; no JavaScript):

* ``/``: the runs list
* ``/runs/{run_id}``: the run page (``?sort=method|METRIC&order=asc|desc``)
* ``/runs/{run_id}/examples``: the example browser (see :mod:`salience.serve.browser` for the query)
* ``/runs/{run_id}/example?id=EXAMPLE``: one example with every method
* ``/explain`` (GET: the form; POST: explain), only with a live model (:mod:`salience.serve.live`);
  a POST from another origin is refused (403); a busy model gives 503, a time-out 504

Bad input never reaches a traceback: an unknown run or example, or a page past the last, is 404;
a malformed parameter (page number, sort, method or metric name) is 400; both as an HTML page
with one escaped line. Every response carries a Content-Security-Policy that allows no script,
no external resource and no framing, and requests whose Host is not one of ``allowed_hosts`` are
refused (400), which stops DNS-rebinding pages from reading a loopback server.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from salience.errors import ParameterError
from salience.evaluate.store import RunInfo, StoreError
from salience.serve.browser import SORTS, ExampleRow, NotFound, build_page, menus, parse_query
from salience.serve.database import ExampleEntry, ReadOnlyStore
from salience.serve.disagreement import rank_correlations
from salience.serve.explanations import UnitRenderer
from salience.serve.live import MAX_BODY, MAX_METHODS, MAX_TEXT, Busy, LiveModel, LiveOutcome, TooSlow, parse_form
from salience.serve.pages import labels, render
from salience.serve.runpage import ARROWS, RunData, build_run_page, run_data
from salience.serve.upload import MAX_FORM_EXTRA, MAX_UPLOAD, parse_upload

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
REFRESH = 5.0  # seconds: a run being written is re-read at most this often (or every 2x its last read time)
CACHED = 24  # computed things kept (per run: its index, menus, page data, one per method pair's ρ), least recently used dropped
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                                 b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Chromium send "Origin: null" with our own form
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


@dataclass
class Viewer:
    """What the routes share: the database path, the example-index cache, the rendered-unit cache."""

    database: Path
    live: LiveModel | None = None
    renderer: UnitRenderer = field(default_factory=UnitRenderer)
    cache: OrderedDict[tuple[str, str], tuple[tuple[float, int], float, Any]] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self) -> ReadOnlyStore:
        return ReadOnlyStore(self.database)  # one connection per request: requests run on several threads

    def run(self, store: ReadOnlyStore, run_id: str) -> RunInfo:
        try:
            return store.run(run_id)
        except StoreError:
            raise NotFound(f"no run {run_id[:80]!r} in this database") from None

    def _cached(self, kind: str, store: ReadOnlyStore, run_id: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` of the run, kept until the run gains units; while it is being written, kept
        for REFRESH seconds or twice the time the last computation took, whichever is longer (so a
        large run being written is not recomputed on every request). At most CACHED values are
        kept, the least recently used dropped first."""
        key = store.fingerprint(run_id)
        with self.lock:
            cached = self.cache.get((kind, run_id))
            if cached is not None:
                self.cache.move_to_end((kind, run_id))
        if cached is not None and (cached[0] == key or time.monotonic() < cached[1]):
            return cached[2]
        started = time.monotonic()
        value = compute()
        now = time.monotonic()
        with self.lock:
            self.cache[(kind, run_id)] = (key, now + max(REFRESH, 2 * (now - started)), value)
            self.cache.move_to_end((kind, run_id))
            while len(self.cache) > CACHED:
                self.cache.popitem(last=False)
        return value

    def index(self, store: ReadOnlyStore, run_id: str) -> list[ExampleEntry]:
        """The run's example index (id, position, label, prediction)."""
        return self._cached("index", store, run_id, lambda: store.example_index(run_id))  # type: ignore[no-any-return]

    def menus(self, store: ReadOnlyStore, run_id: str) -> tuple[list[str], list[str]]:
        """The run's labels and predictions (the example browser's menus)."""
        return self._cached("menus", store, run_id, lambda: menus(self.index(store, run_id)))  # type: ignore[no-any-return]

    def data(self, store: ReadOnlyStore, info: RunInfo) -> RunData:
        """The run page's summary and curves."""
        return self._cached("data", store, info.run_id, lambda: run_data(store, info))  # type: ignore[no-any-return]

    def rhos(self, store: ReadOnlyStore, run_id: str, first: str, second: str) -> dict[str, float | None]:
        """example id -> Spearman ρ of the two methods' scores (one scan of the run, then cached;
        ρ is symmetric, so both orders share one entry)."""
        first, second = sorted((first, second))
        return self._cached(f"rho\0{first}\0{second}", store, run_id,  # type: ignore[no-any-return]
                            lambda: rank_correlations(store, run_id, first, second))


def _page(viewer: Viewer, template: str, **context: Any) -> Any:
    from starlette.responses import HTMLResponse

    return HTMLResponse(render(template, database=str(viewer.database), live_model=viewer.live is not None, **context))


def create_app(database: str | Path, *, allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
               live: LiveModel | None = None) -> Any:
    """The viewer over ``database`` (opened read-only per request; StoreError now if it cannot be
    read). ``allowed_hosts``: accepted Host headers (None: any, for a server bound elsewhere).
    ``live``: a model for the live explain page (none: no such page)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.routing import Route

    viewer = Viewer(Path(database).expanduser(), live)
    viewer.store().close()  # fails now, with one line, when the file is not a readable results database

    def runs_list(request: Request) -> Any:
        with viewer.store() as store:
            runs = store.runs()
        return _page(viewer, "runs.html", title="runs", runs=runs)

    def run_page(request: Request) -> Any:
        with viewer.store() as store:
            info = viewer.run(store, request.path_params["run_id"])
            page = build_run_page(viewer.data(store, info), info, sort=request.query_params.get("sort", ""),
                                  order=request.query_params.get("order", ""))
        return _page(viewer, "run.html", title=f"run {info.run_id}", page=page, arrows=ARROWS)

    def examples_page(request: Request) -> Any:
        with viewer.store() as store:
            info = viewer.run(store, request.path_params["run_id"])
            methods, metrics = labels(info.config.get("methods", [])), labels(info.config.get("metrics", []))
            query = parse_query(request.query_params, methods, metrics)
            rhos = viewer.rhos(store, info.run_id, query.rank_a, query.rank_b) if query.compares else None
            page = build_page(store, info.run_id, viewer.index(store, info.run_id), query, metrics, viewer.renderer, rhos,
                              viewer.menus(store, info.run_id))
        return _page(viewer, "examples.html", title=f"examples of {info.run_id}", run=info, page=page, sorts=SORTS,
                     methods=methods, metrics=metrics, correct_value={None: "", True: "yes", False: "no"}[query.correct])

    def example_page(request: Request) -> Any:
        example_id = request.query_params.get("id", "")
        with viewer.store() as store:
            info = viewer.run(store, request.path_params["run_id"])
            entry = next((e for e in viewer.index(store, info.run_id) if e.example_id == example_id), None)
            if entry is None:
                raise NotFound(f"run {info.run_id} has no example {example_id[:80]!r}")
            methods, metrics = labels(info.config.get("methods", [])), labels(info.config.get("metrics", []))
            units = store.units(info.run_id, [example_id])
            results = store.example_results(info.run_id, [example_id])
            row = ExampleRow(entry, None)
            for method in methods:
                cells = [(m, "n/a" if results[(example_id, method, m)]["value"] is None
                          else f"{results[(example_id, method, m)]['value']:.3f}")
                         for m in metrics if (example_id, method, m) in results]
                row.explanations.append((method, viewer.renderer(info.run_id, entry, method, units.get((example_id, method))),
                                         cells))
        return _page(viewer, "example.html", title=f"example {example_id}", run=info, row=row)

    def live_page(text: str = "", chosen: Sequence[str] = (), outcome: LiveOutcome | None = None, message: str = "",
                  status: int = 200) -> Any:
        from starlette.responses import HTMLResponse

        if viewer.live is None:
            raise NotFound("this server has no live model (start it with --model)")
        html = render("live.html", title=f"explain with {viewer.live.name}", database=str(viewer.database), live_model=True,
                      live=viewer.live, text=text, chosen=list(chosen) or viewer.live.methods()[:2],
                      results=outcome.results if outcome else [], note=outcome.note if outcome else "", message=message,
                      max_text=MAX_TEXT, max_upload_mb=MAX_UPLOAD // (1024 * 1024))
        return HTMLResponse(html, status_code=status)

    def explain_form(request: Request) -> Any:
        return live_page()

    async def explain_post(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        if viewer.live is None:
            raise NotFound("this server has no live model (start it with --model)")
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return error_page(request, 403, "a form from another site cannot use this server")
        images = viewer.live.takes_images
        limit = MAX_UPLOAD + MAX_FORM_EXTRA if images else MAX_BODY
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > limit:
                break  # the parsers refuse a body over the limit; the rest is not read
        body = bytes(received)
        try:
            if images:  # the file's name is shown (escaped) above its overlays
                value, methods, shown = parse_upload(body, request.headers.get("content-type", ""), viewer.live.methods(),
                                                     MAX_METHODS)
            else:  # the textarea is refilled with the typed text
                shown, methods = parse_form(body, viewer.live.methods())
                value = shown
        except ParameterError as error:
            return live_page(message=str(error), status=400)
        try:
            outcome = await run_in_threadpool(viewer.live.explain, value, methods)
        except Busy as error:
            return live_page(shown, methods, message=str(error), status=503)
        except TooSlow as error:
            return live_page(shown, methods, message=str(error), status=504)
        return live_page(shown, methods, outcome)

    def error_page(request: Request, status: int, message: str) -> Any:
        from starlette.responses import HTMLResponse

        reason = HTTPStatus(status).phrase
        html = render("error.html", title=f"{status} {reason}", database=str(viewer.database), status=status, reason=reason,
                      message=message)
        return HTMLResponse(html, status_code=status)

    async def bad_request(request: Request, error: Exception) -> Any:
        return error_page(request, 400, str(error))

    async def not_found(request: Request, error: Exception) -> Any:
        return error_page(request, 404, str(error))

    async def http_error(request: Request, error: Exception) -> Any:
        assert isinstance(error, HTTPException)
        return error_page(request, error.status_code, str(error.detail))

    async def server_error(request: Request, error: Exception) -> Any:
        return error_page(request, 500, f"the viewer failed on this request ({type(error).__name__}); see the server's log")

    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    routes = [Route("/", runs_list), Route("/runs/{run_id}", run_page), Route("/runs/{run_id}/examples", examples_page),
              Route("/runs/{run_id}/example", example_page), Route("/explain", explain_form, methods=["GET"]),
              Route("/explain", explain_post, methods=["POST"])]
    handlers = {ParameterError: bad_request, NotFound: not_found, StoreError: not_found, HTTPException: http_error,
                Exception: server_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
