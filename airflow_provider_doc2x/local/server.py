"""A local Doc2X-compatible server: the API's image endpoints and its PDF API, faithfully, on FastAPI.

The image endpoints are :class:`~airflow_provider_doc2x.local.image_service.ImageService`'s, the
PDF API (preupload, PUT to a presigned url, status, export, the CDN of figures) is
:class:`~airflow_provider_doc2x.local.pdf_service.PdfService`'s. Around them this server keeps
what tests and benchmarks need: knobs (latency, processing time, injected 5xx, stalled answers,
rate window, quota, a slow and flaky upload link, an ``echo_key`` that quotes the
``Authorization`` header in every error) under ``/local/config`` (see
:class:`~airflow_provider_doc2x.local.config.ServerConfig`), and counters under ``/local/stats``:
billing per image (and PDF page) content hash, the load, and ``keyless_routes``: how many requests
reached the routes a client reaches without the key (the presigned PUT, the export download, the
CDN), and how many of them carried an ``Authorization`` header or the key all the same.

:class:`LocalServer` holds what both APIs share (the knobs, the key check, injected faults, the
upload link, the quota); :func:`create_app` maps the routes onto it and its two APIs. The uvicorn
protocol that lets it reset a connection is
:class:`~airflow_provider_doc2x.local.connection.TransportInScope`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from airflow_provider_doc2x.local.answers import (
    ConnectionGone,
    Refused,
    api_error,
    authorization_quote,
    echoed,
    html_failure,
)
from airflow_provider_doc2x.local.config import ServerConfig
from airflow_provider_doc2x.local.connection import declared_length, reset_connection
from airflow_provider_doc2x.local.engines import Engine
from airflow_provider_doc2x.local.image_service import ImageService, image_routes
from airflow_provider_doc2x.local.limits import rate_limited
from airflow_provider_doc2x.local.pdf_service import PdfService, pdf_routes
from airflow_provider_doc2x.local.registry import load_engine

#: The routes a client reaches without the API key, as ``/local/stats`` names them in
#: ``keyless_routes``: the presigned PUT, the export download, the CDN's page images.
KEYLESS_ROUTES = ("put", "export", "cdn")
#: Keys shorter than this are not searched for in keyless requests (they would match by chance).
MIN_SEARCHED_KEY = 8
#: Most keys remembered from accepted API calls (a server that accepts any key learns them so).
MAX_REMEMBERED_KEYS = 1000


class LocalServer:
    """The state of one local Doc2X server: its knobs, key, faults, upload link and quota, and its two APIs.

    Args:
        config: the knobs at start; :meth:`reset` returns to them.
    """

    def __init__(self, config: ServerConfig) -> None:
        """Load the engine; start with no jobs and zeroed counters."""
        self.config = config
        self.initial = config
        #: Loaded once; it serves every request of the process.
        self.engine: Engine = load_engine(config.engine)
        self.random = random.Random(config.seed)
        #: Requests per endpoint (``parse``, ``submit``, ``status``, ...), including refused ones.
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.uploads_in_flight = 0
        self.max_uploads_in_flight = 0
        self.uploads_reset = 0
        #: Set (and replaced) when the knobs change: paced uploads compute their pace again.
        self.knobs_changed = asyncio.Event()
        #: Per keyless route (:data:`KEYLESS_ROUTES`): ``requests``, and ``with_authorization``.
        self.keyless: dict[str, Counter[str]] = {route: Counter() for route in KEYLESS_ROUTES}
        #: Bearer keys the API accepted: what a keyless request must not carry even when the server
        #: accepts any key. Kept across :meth:`reset`.
        self.accepted_keys: set[str] = set()
        #: The image API's jobs and billing.
        self.images = ImageService(self)
        #: The PDF API's uploads, tasks and exports.
        self.pdf = PdfService(self)

    def reset(self) -> None:
        """Back to the knobs at start, with no jobs and zeroed counters (calls in flight stay counted)."""
        self.images.reset()
        self.config = self.initial
        self.random = random.Random(self.initial.seed)
        self.requests.clear()
        self.max_in_flight = self.in_flight
        self.max_uploads_in_flight = self.uploads_in_flight
        self.uploads_reset = 0
        for counts in self.keyless.values():
            counts.clear()
        self.pdf.reset()
        self.announce_change()

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply ``POST /local/config``.

        Raises:
            ValueError: an unknown knob, a value of the wrong type, or another engine.
        """
        if "engine" in changes and changes["engine"] != self.config.engine:
            raise ValueError("the engine is chosen when the server starts")
        try:
            self.config = self.config.updated(changes)
        except TypeError as problem:
            raise ValueError(str(problem)) from problem
        if "seed" in changes:
            self.random = random.Random(self.config.seed)
        self.announce_change()

    def announce_change(self) -> None:
        """Wake whatever waits on the knobs (uploads on the way, PDF pickups and pages) to follow them."""
        self.knobs_changed.set()
        self.knobs_changed = asyncio.Event()
        self.pdf.reconfigured()

    def settings(self) -> dict[str, Any]:
        """Show the knobs as ``GET /local/config`` does (without the key)."""
        return {key: value for key, value in asdict(self.config).items() if key != "api_key"}

    def stats(self) -> dict[str, Any]:
        """Count what was billed, per image (and PDF page) content hash, and the load.

        ``billed`` counts images (see :meth:`ImageService.stats`), ``pdf_billed`` PDF pages (see
        :meth:`PdfService.stats`); uploads in flight and reset count the PDF API's PUTs too.
        """
        return {
            **self.images.stats(),
            "requests": dict(self.requests),
            "max_in_flight": self.max_in_flight,
            "uploads_in_flight": self.uploads_in_flight,
            "max_uploads_in_flight": self.max_uploads_in_flight,
            "uploads_reset": self.uploads_reset,
            "keyless_routes": {
                route: {"requests": counts["requests"], "with_authorization": counts["with_authorization"]}
                for route, counts in self.keyless.items()
            },
            **self.pdf.stats(),
        }

    def quota_left(self) -> int | None:
        """Pages the account may still bill (None: no quota): images and PDF pages share the quota.

        The pages of PDF tasks in progress are deducted: they are billed when their task ends.
        """
        quota = self.config.quota
        if quota is None:
            return None
        tasks = self.pdf.tasks
        return quota - self.images.pages_billed() - tasks.pages_billed() - tasks.pages_in_progress

    # Every API call

    @contextmanager
    def api_call(self) -> Iterator[None]:
        """Count an API call in flight (``max_in_flight``) while it runs."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    async def inject_faults(self, request: Request, trace_id: str) -> Response | None:
        """Apply the faults the knobs ask for: latency, then maybe a gateway's HTML error to answer instead."""
        settings = self.config
        if settings.latency:
            await asyncio.sleep(settings.latency)
        quote = authorization_quote(request.headers.get("authorization")) if settings.echo_key else ""
        if settings.fail_next > 0:
            self.config = replace(settings, fail_next=settings.fail_next - 1)
            return html_failure(503, "Service Unavailable", trace_id, quote)
        if settings.error_rate and self.random.random() < settings.error_rate:
            return html_failure(502, "Bad Gateway", trace_id, quote)
        if settings.throttle_status_next > 0 and request.url.path.endswith("/status"):
            self.config = replace(settings, throttle_status_next=settings.throttle_status_next - 1)
            return rate_limited(0.0).response
        return None

    def authorize(self, request: Request) -> None:
        """Check the Bearer key.

        Raises:
            Refused: HTTP 401 ``unauthorized``.
        """
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self.config.api_key
        if scheme.lower() != "bearer" or not token.strip() or (expected is not None and token != expected):
            raise api_error("unauthorized", "Invalid or missing API key", status=401)
        if len(self.accepted_keys) < MAX_REMEMBERED_KEYS:
            self.accepted_keys.add(token)

    # Keyless routes and the key

    def count_keyless(self, request: Request, route: str) -> None:
        """Count a request to a keyless route, and again in ``with_authorization`` if it carried the key.

        A client must never send its key where Doc2X does not ask for it (the object store's
        presigned urls, the CDN): another party runs those hosts.
        """
        counts = self.keyless[route]
        counts["requests"] += 1
        if self.carries_key(request):
            counts["with_authorization"] += 1

    def carries_key(self, request: Request) -> bool:
        """Whether a request has an ``Authorization`` header, or a known key in a header or its query.

        The keys searched for are the configured ``api_key`` and every key the API accepted (at
        least :data:`MIN_SEARCHED_KEY` characters long).
        """
        if "authorization" in request.headers:
            return True
        keys = set(self.accepted_keys)
        if self.config.api_key:
            keys.add(self.config.api_key)
        keys = {key for key in keys if len(key) >= MIN_SEARCHED_KEY}
        query = request.url.query
        places = [*request.headers.values(), query, unquote_plus(query)]
        return any(key in place for key in keys for place in places)

    def echo(self, request: Request, response: Response) -> Response:
        """Quote the request's ``Authorization`` header in an error answer when ``echo_key`` is on."""
        if not self.config.echo_key:
            return response
        return echoed(response, authorization_quote(request.headers.get("authorization")))

    # The upload link

    @contextmanager
    def upload_in_flight(self) -> Iterator[None]:
        """Count an upload (an image, or a PDF's PUT) in flight until it is answered."""
        self.uploads_in_flight += 1
        self.max_uploads_in_flight = max(self.max_uploads_in_flight, self.uploads_in_flight)
        try:
            yield
        finally:
            self.uploads_in_flight -= 1

    async def receive_body(
        self, request: Request, declared: int | None = None, *, keep: int | None = None
    ) -> tuple[bytes, int]:
        """Read the body as the link delivers it: paced by ``upload_seconds`` and ``upload_bandwidth``.

        Args:
            request: the upload.
            declared: its ``Content-Length``; read from the request when not given.
            keep: keep at most this many bytes (the rest is read and dropped); None keeps all.

        Returns:
            The bytes kept, and the body's size.

        Raises:
            ConnectionGone: the upload was cut off (``reset_next_uploads``) or the client went away.
        """
        if declared is None:
            declared = declared_length(request)
        settings = self.config
        cut_after: int | None = None
        if settings.reset_next_uploads > 0:
            self.config = replace(settings, reset_next_uploads=settings.reset_next_uploads - 1)
            cut_after = settings.reset_after_bytes
        body = bytearray()
        size = 0
        started = time.monotonic()
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if keep is None or len(body) < keep:
                    body += chunk if keep is None else chunk[: keep - len(body)]
                if cut_after is not None and size >= cut_after:
                    break
                await self.await_arrival(started, size, declared or size)
        except ClientDisconnect as gone:
            raise ConnectionGone("the client closed the connection during the upload") from gone
        if cut_after is not None:
            reset_connection(request)
            self.uploads_reset += 1
            raise ConnectionGone(f"upload reset after {size} bytes")
        return bytes(body), size

    async def await_arrival(self, started: float, received: int, total: int) -> None:
        """Sleep until ``received`` of ``total`` bytes are due; a change of the knobs applies at once."""
        await self.sleep_until(lambda: started + self.arrival_time(received, total))

    async def sleep_until(self, due: Callable[[], float]) -> None:
        """Sleep until the monotonic time ``due()``, reading it again whenever the knobs change."""
        while (delay := due() - time.monotonic()) > 0:
            changed = self.knobs_changed
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), delay)

    def arrival_time(self, received: int, total: int) -> float:
        """Seconds after the upload's start at which ``received`` of its ``total`` bytes have arrived."""
        settings = self.config
        by_duration = settings.upload_seconds * received / total if total else settings.upload_seconds
        by_bandwidth = received / settings.upload_bandwidth if settings.upload_bandwidth > 0 else 0.0
        return max(by_duration, by_bandwidth)


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """Build the server's ASGI app; its :class:`LocalServer` is ``app.state.doc2x``."""
    server = LocalServer(config or ServerConfig())
    app = FastAPI(title="Doc2X local server", docs_url="/local/docs", openapi_url="/local/openapi.json")
    app.state.doc2x = server

    @app.exception_handler(Refused)
    async def refused(request: Request, refusal: Refused) -> Response:
        return server.echo(request, refusal.response)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, problem: StarletteHTTPException) -> Response:
        answer = JSONResponse(
            {"detail": problem.detail}, status_code=problem.status_code, headers=problem.headers
        )
        return server.echo(request, answer)

    @app.exception_handler(ConnectionGone)
    async def gone(request: Request, problem: ConnectionGone) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.middleware("http")
    async def trace_and_faults(request: Request, call_next) -> Response:
        if request.url.path.startswith("/local/"):
            return await call_next(request)
        trace_id = uuid.uuid4().hex
        with server.api_call():
            response = await server.inject_faults(request, trace_id) or await call_next(request)
        response.headers["trace-id"] = trace_id
        return response

    app.include_router(image_routes(server.images))
    app.include_router(pdf_routes(server.pdf))

    @app.get("/local/stats")
    async def stats() -> dict[str, Any]:
        return server.stats()

    @app.get("/local/config")
    async def get_config() -> dict[str, Any]:
        return server.settings()

    @app.post("/local/config")
    async def set_config(request: Request) -> Response:
        try:
            server.configure(await request.json())
        except ValueError as problem:
            return JSONResponse({"error": str(problem)}, status_code=400)
        return JSONResponse(server.settings())

    @app.post("/local/reset")
    async def reset() -> dict[str, str]:
        server.reset()
        return {"status": "reset"}

    @app.get("/local/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "engine": server.engine.name}

    return app
