"""A local Doc2X-compatible server: the API's image endpoints and its PDF API, faithfully, on FastAPI.

The image endpoints answer as the API notes describe (Bearer auth and 401, the 7 MB and type
checks with their codes, the per-key rate limit as HTTP 429 ``request_limit_exceeded``, async jobs
that are ``processing`` then ``success`` or a failure code, ``parse_status_not_found`` for unknown
or expired uids, ``convert_zip`` as base64 of a real zip of ``images/...``), plus what tests and
benchmarks need: knobs (latency, processing time, injected 5xx, stalled answers, rate window,
quota, a slow and flaky upload link, an ``echo_key`` that quotes the ``Authorization`` header in
every error) under ``/local/config``, and billing counters per image content hash under
``/local/stats``, with ``keyless_routes``: how many requests reached the routes a client reaches
without the key (the presigned PUT, the export download, the CDN), and how many of them carried an
``Authorization`` header or the key all the same. The PDF API (preupload, PUT to a presigned
url, status, export, the CDN of figures) is :class:`~airflow_provider_doc2x.local.pdf.PdfLane`'s;
its knobs are in :class:`~airflow_provider_doc2x.local.config.ServerConfig` too.

:class:`LocalServer` holds the state and the API's rules; :func:`create_app` maps the routes onto
it. :class:`TransportInScope` is the uvicorn protocol that lets the server reset a connection.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import io
import random
import socket
import struct
import time
import uuid
import zipfile
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.local.answers import (
    ConnectionGone,
    Refused,
    api_error,
    authorization_quote,
    echoed,
    html_failure,
    success,
)
from airflow_provider_doc2x.local.config import ServerConfig
from airflow_provider_doc2x.local.engines import Engine, EngineResult, ImageUnreadable, open_image
from airflow_provider_doc2x.local.limits import admit
from airflow_provider_doc2x.local.pdf import (
    CDN_ROUTE,
    CONVERT_PATH,
    CONVERT_RESULT_PATH,
    EXPORT_ROUTE,
    PDF_STATUS_PATH,
    PREUPLOAD_PATH,
    UPLOAD_ROUTE,
    PdfLane,
)
from airflow_provider_doc2x.local.registry import load_engine

try:  # what uvicorn's "auto" HTTP protocol picks
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornProtocol
except ImportError:  # pragma: no cover
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornProtocol  # type: ignore[assignment]

#: The ASGI scope extension under which :class:`TransportInScope` puts a request's connection.
TRANSPORT_EXTENSION = "doc2x.transport"
#: The routes a client reaches without the API key, as ``/local/stats`` names them in
#: ``keyless_routes``: the presigned PUT, the export download, the CDN's page images.
KEYLESS_ROUTES = ("put", "export", "cdn")
#: Keys shorter than this are not searched for in keyless requests (they would match by chance).
MIN_SEARCHED_KEY = 8
#: Most keys remembered from accepted API calls (a server that accepts any key learns them so).
MAX_REMEMBERED_KEYS = 1000


@dataclass
class Job:
    """An async job: the image's content hash, when it was submitted, and the engine's work on it."""

    uid: str
    sha256: str
    created: float
    work: asyncio.Task | None = None
    result: EngineResult | None = None


def convert_zip(figures: dict[str, bytes]) -> str | None:
    """Figures as Doc2X ships them: base64 of a zip holding ``images/NAME``."""
    if not figures:
        return None
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in figures.items():
            archive.writestr(f"images/{name}", data)
    return base64.b64encode(buffer.getvalue()).decode()


def result_data(uid: str, result: EngineResult, *, with_index: bool) -> dict[str, Any]:
    """Show a result's pages and figures as the API's ``data`` does (the status adds url and index)."""
    pages = []
    for index, page in enumerate(result.pages):
        entry: dict[str, Any] = {"page_width": page.width, "page_height": page.height, "md": page.md}
        if with_index:
            entry = {"url": f"{uid}_{index}.jpg", "page_idx": index, **entry}
        pages.append(entry)
    return {"result": {"pages": pages}, "convert_zip": convert_zip(result.figures)}


def declared_length(request: Request) -> int | None:
    """Read the body's size from its ``Content-Length`` header, if it has one."""
    value = request.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def reset_connection(request: Request) -> None:
    """Reset the request's TCP connection at once: RST, no answer, unread bytes dropped.

    Raises:
        RuntimeError: the server was not started with :class:`TransportInScope` (see ``__main__``).
    """
    transport = request.scope.get("extensions", {}).get(TRANSPORT_EXTENSION, {}).get("transport")
    if transport is None:
        raise RuntimeError("Resetting uploads needs the server's TransportInScope uvicorn protocol")
    sock = transport.get_extra_info("socket")
    if sock is not None:  # linger 0: close() sends RST, not FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class LocalServer:
    """The state of one local Doc2X server and the API's rules, for :func:`create_app`'s routes.

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
        self.jobs: dict[str, Job] = {}
        #: Billed pages per image content hash.
        self.billed: Counter[str] = Counter()
        #: Requests per endpoint (``parse``, ``submit``, ``status``), including refused ones.
        self.requests: Counter[str] = Counter()
        #: Per key (its Authorization header): when each upload of the rate window was admitted.
        self.windows: defaultdict[str, deque[float]] = defaultdict(deque)
        self.rate_limited = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.uploads_in_flight = 0
        self.max_uploads_in_flight = 0
        self.uploads_reset = 0
        #: Server times of the first and last billed upload, for throughput figures.
        self.upload_times = [0.0, 0.0]
        #: When each billed upload was billed, in seconds after the first (the last 100,000).
        self.billed_seconds: deque[float] = deque(maxlen=100_000)
        #: Set (and replaced) when the knobs change: paced uploads compute their pace again.
        self.knobs_changed = asyncio.Event()
        #: Per keyless route (:data:`KEYLESS_ROUTES`): ``requests``, and ``with_authorization``.
        self.keyless: dict[str, Counter[str]] = {route: Counter() for route in KEYLESS_ROUTES}
        #: Bearer keys the API accepted: what a keyless request must not carry even when the server
        #: accepts any key. Kept across :meth:`reset`.
        self.accepted_keys: set[str] = set()
        #: The PDF API's state and rules.
        self.pdf = PdfLane(self)

    def reset(self) -> None:
        """Back to the knobs at start, with no jobs and zeroed counters (calls in flight stay counted)."""
        for job in self.jobs.values():
            if job.work is not None:
                job.work.cancel()
        self.config = self.initial
        self.random = random.Random(self.initial.seed)
        self.jobs.clear()
        self.billed.clear()
        self.requests.clear()
        self.windows.clear()
        self.rate_limited = 0
        self.max_in_flight = self.in_flight
        self.max_uploads_in_flight = self.uploads_in_flight
        self.uploads_reset = 0
        self.upload_times = [0.0, 0.0]
        self.billed_seconds.clear()
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

        ``billed`` counts images, ``pdf_billed`` PDF pages (see :meth:`PdfLane.stats`); uploads in
        flight and reset count the PDF API's PUTs too.
        """
        return {
            "billed_total": sum(self.billed.values()),
            "billed": dict(self.billed),
            "max_billed_per_image": max(self.billed.values(), default=0),
            "requests": dict(self.requests),
            "rate_limited": self.rate_limited,
            "max_in_flight": self.max_in_flight,
            "uploads_in_flight": self.uploads_in_flight,
            "max_uploads_in_flight": self.max_uploads_in_flight,
            "uploads_reset": self.uploads_reset,
            "upload_span_seconds": self.upload_times[1] - self.upload_times[0],
            "billed_seconds": [round(seconds, 4) for seconds in self.billed_seconds],
            "jobs": len(self.jobs),
            "keyless_routes": {
                route: {"requests": counts["requests"], "with_authorization": counts["with_authorization"]}
                for route, counts in self.keyless.items()
            },
            **self.pdf.stats(),
        }

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

    # Uploads

    @asynccontextmanager
    async def upload(self, request: Request, endpoint: str) -> AsyncIterator[bytes]:
        """Open an upload, as both upload endpoints do; yield the image once it is admitted.

        Counts the request and the upload in flight until the endpoint is done with it, checks the
        key, receives the body at the link's pace (or resets it), admits it into the key's rate
        window, then checks size and type.

        Raises:
            Refused: 401, 429, or an image refused for its size or type.
            ConnectionGone: the connection was reset, or the client went away.
        """
        self.requests[endpoint] += 1
        with self.upload_in_flight():
            self.authorize(request)
            declared = declared_length(request)
            if declared is not None and declared > protocol.MAX_IMAGE_BYTES:
                self.admit_upload(request)  # refused without reading it; a Doc2X attempt all the same
                raise api_error("parse_file_too_large", "File too large, at most 7M")
            image, _ = await self.receive_body(request, declared)
            self.admit_upload(request)
            self.check_image(image)
            yield image

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

    def admit_upload(self, request: Request) -> None:
        """Count the upload in its key's rolling window: at most ``rate_limit`` per ``rate_window``.

        Raises:
            Refused: HTTP 429 ``request_limit_exceeded`` with ``Retry-After``.
        """
        settings = self.config
        window = self.windows[request.headers["authorization"]]
        try:
            admit(window, limit=settings.rate_limit, seconds=settings.rate_window, now=time.monotonic())
        except Refused:
            self.rate_limited += 1
            raise

    def check_image(self, body: bytes) -> None:
        """Check size and type (content, not the header).

        Raises:
            Refused: ``parse_file_too_large`` or ``parse_file_not_image``.
        """
        if len(body) > protocol.MAX_IMAGE_BYTES:
            raise api_error("parse_file_too_large", "File too large, at most 7M")
        if protocol.sniff_image_type(body) is None:
            raise api_error("parse_file_not_image", "The file is not a jpg/png image")

    def bill(self, image: bytes) -> str:
        """Bill one page for the image and return its content hash.

        Raises:
            Refused: ``parse_quota_limit`` when the account's quota is used up.
        """
        left = self.quota_left()
        if left is not None and left <= 0:
            raise api_error("parse_quota_limit", "No page quota left")
        digest = hashlib.sha256(image).hexdigest()
        if not self.billed:
            self.upload_times[0] = time.monotonic()
        self.upload_times[1] = time.monotonic()
        self.billed_seconds.append(self.upload_times[1] - self.upload_times[0])
        self.billed[digest] += 1
        return digest

    def quota_left(self) -> int | None:
        """Pages the account may still bill (None: no quota): images and PDF pages share the quota.

        The pages of PDF tasks in progress are deducted: they are billed when their task ends.
        """
        quota = self.config.quota
        if quota is None:
            return None
        return quota - sum(self.billed.values()) - self.pdf.pages_billed() - self.pdf.pages_in_progress

    async def stall(self) -> None:
        """Hold this answer for ``stall_seconds`` if ``stall_next`` asks for it."""
        settings = self.config
        if settings.stall_next > 0:
            self.config = replace(settings, stall_next=settings.stall_next - 1)
            await asyncio.sleep(settings.stall_seconds)

    async def run_engine(self, image: bytes, uid: str) -> EngineResult:
        """Run the engine on one image, in a thread."""
        return await asyncio.to_thread(self.engine.parse, image, uid)

    # The endpoints' own work

    async def parse(self, image: bytes) -> dict[str, Any]:
        """Parse now: the synchronous endpoint's ``data``. Billed once the engine read the image.

        Raises:
            Refused: ``parse_file_invalid``, ``parse_quota_limit`` or the job's failure code.
        """
        uid = str(uuid.uuid4())
        started = time.monotonic()
        try:
            result = await self.run_engine(image, uid)
        except ImageUnreadable:
            raise api_error("parse_file_invalid", "The image cannot be read") from None
        self.bill(image)
        await asyncio.sleep(max(0.0, self.config.processing_time - (time.monotonic() - started)))
        await self.stall()
        if result.fail_code:
            raise api_error(result.fail_code, f"Failed: {result.fail_code}")
        return {"uid": uid, **result_data(uid, result, with_index=False)}

    async def submit(self, image: bytes) -> dict[str, Any]:
        """Start an async job: the submit endpoint's ``data``. An unreadable image is refused unbilled.

        Raises:
            Refused: ``parse_file_invalid`` or ``parse_quota_limit``.
        """
        try:
            await asyncio.to_thread(open_image, image)
        except ImageUnreadable:
            raise api_error("parse_file_invalid", "The image cannot be read") from None
        digest = self.bill(image)
        uid = str(uuid.uuid4())
        job = Job(uid=uid, sha256=digest, created=time.monotonic())
        job.work = asyncio.create_task(self.run_engine(image, uid))
        self.jobs[uid] = job
        await self.stall()
        return {"uid": uid}

    def status(self, uid: str) -> dict[str, Any]:
        """Report an async job's status ``data``; readiness follows the current ``processing_time``.

        Raises:
            Refused: ``parse_status_not_found`` (unknown or expired), or the job's failure code.
        """
        job = self.jobs.get(uid)
        now = time.monotonic()
        if job is None or now - job.created > self.config.result_ttl:
            raise api_error("parse_status_not_found", f"No task with uid {uid!r}, or its result expired")
        if job.sha256 in self.config.malformed_status:
            return {"status": ["garbled"], "progress": 0}
        assert job.work is not None
        # Readiness follows the current processing_time, so a test can let waiting jobs finish.
        processing_time = self.config.processing_time
        if now < job.created + processing_time or not job.work.done():
            progress = min(99, int(100 * (now - job.created) / max(processing_time, 1e-9)))
            return {"status": protocol.STATUS_PROCESSING, "progress": progress}
        if job.result is None:
            try:
                job.result = job.work.result()
            except ImageUnreadable:
                raise api_error("parse_file_invalid", "The image cannot be read") from None
        if job.result.fail_code:
            raise api_error(job.result.fail_code, f"Failed: {job.result.fail_code}")
        return {
            "status": protocol.STATUS_SUCCESS,
            "progress": 100,
            **result_data(uid, job.result, with_index=True),
        }


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

    @app.post(protocol.PARSE_PATH)
    async def parse(request: Request) -> Response:
        async with server.upload(request, "parse") as image:
            return success(await server.parse(image))

    @app.post(protocol.SUBMIT_PATH)
    async def submit(request: Request) -> Response:
        async with server.upload(request, "submit") as image:
            return success(await server.submit(image))

    @app.get(protocol.STATUS_PATH)
    async def status(request: Request, uid: str = "") -> Response:
        server.requests["status"] += 1
        server.authorize(request)
        return success(server.status(uid))

    @app.post(PREUPLOAD_PATH)
    async def preupload(request: Request) -> Response:
        return success(await server.pdf.preupload(request))

    @app.put(UPLOAD_ROUTE)
    async def put_upload(request: Request, name: str) -> Response:
        server.count_keyless(request, "put")
        return await server.pdf.put(request, name)

    @app.get(PDF_STATUS_PATH)
    async def pdf_status(request: Request, uid: str = "") -> Response:
        return success(server.pdf.status(request, uid))

    @app.post(CONVERT_PATH)
    async def convert(request: Request) -> Response:
        return success(await server.pdf.export(request))

    @app.get(CONVERT_RESULT_PATH)
    async def convert_result(request: Request, uid: str = "") -> Response:
        return success(await server.pdf.export_result(request, uid))

    @app.get(EXPORT_ROUTE)
    async def export_file(request: Request, uid: str, name: str) -> Response:
        server.count_keyless(request, "export")
        return server.pdf.download(request, uid, name)

    @app.get(CDN_ROUTE)
    async def cdn(request: Request, name: str) -> Response:
        server.count_keyless(request, "cdn")
        return await server.pdf.cdn(name, request.query_params)

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


class TransportInScope(_UvicornProtocol):
    """uvicorn's HTTP/1.1 protocol, also handing each request its connection's asyncio transport.

    ASGI gives an app no way to reset a connection; ``reset_next_uploads`` needs one. This protocol
    puts the transport in every request's scope, as ``scope["extensions"]["doc2x.transport"]
    ["transport"]``. Use it as ``uvicorn.Config(app, http=TransportInScope)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take uvicorn's arguments, and wrap the app it loaded."""
        super().__init__(*args, **kwargs)
        self.app = functools.partial(self._with_transport, self.app)

    async def _with_transport(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        extensions = scope.setdefault("extensions", {})
        extensions[TRANSPORT_EXTENSION] = {"transport": self.transport}
        await app(scope, receive, send)
