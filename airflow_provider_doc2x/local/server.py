"""
A local Doc2X-compatible server: the API's three image endpoints, faithfully, on FastAPI.

It answers as the API notes describe (Bearer auth and 401, the 7 MB and type checks with their
codes, the per-key rate limit as HTTP 429 ``request_limit_exceeded``, async jobs that are
``processing`` then ``success`` or a failure code, ``parse_status_not_found`` for unknown or expired
uids, ``convert_zip`` as base64 of a real zip of ``images/...``), plus what tests and benchmarks
need: knobs (latency, processing time, injected 5xx, stalled answers, rate window, quota) under
``/local/config``, and billing counters per image content hash under ``/local/stats``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import random
import time
import uuid
import zipfile
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.local.engines import Engine, EngineResult, ImageUnreadable, open_image
from airflow_provider_doc2x.local.registry import load_engine


@dataclass
class ServerConfig:
    """The server's knobs; every one can be changed at run time with ``POST /local/config``."""

    #: The accepted key; None accepts any non-empty Bearer token.
    api_key: str | None = None
    engine: str = "simple"
    #: Seconds an async job stays ``processing`` (also how long a synchronous parse takes at least).
    processing_time: float = 1.0
    #: Seconds added before every answer.
    latency: float = 0.0
    #: Share of requests answered with an HTML 502 page instead (seeded, so repeatable).
    error_rate: float = 0.0
    #: The next N requests answer an HTML 503 page, whatever they are.
    fail_next: int = 0
    #: The next N uploads are accepted and billed, then their answer stalls for ``stall_seconds``.
    stall_next: int = 0
    stall_seconds: float = 30.0
    rate_limit: int = protocol.DEFAULT_RATE_LIMIT_IMAGES
    rate_window: float = protocol.DEFAULT_RATE_LIMIT_WINDOW
    #: Seconds a job's result is kept (Doc2X: 24 h).
    result_ttl: float = protocol.RESULT_LIFETIME_SECONDS
    #: Pages the account may still bill; None is unlimited.
    quota: int | None = None
    seed: int = 0

    def updated(self, changes: dict[str, Any]) -> ServerConfig:
        known = {item.name for item in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"Unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **changes)


@dataclass
class Job:
    uid: str
    sha256: str
    created: float
    work: asyncio.Task | None = None
    result: EngineResult | None = None


@dataclass
class ServerState:
    config: ServerConfig
    initial: ServerConfig
    engine: Engine
    random: random.Random
    jobs: dict[str, Job] = field(default_factory=dict)
    billed: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    windows: defaultdict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    rate_limited: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    #: Server times of the first and last billed upload, for throughput figures.
    upload_times: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def reset(self) -> None:
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
        self.upload_times = [0.0, 0.0]


def error(code: str, msg: str, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "msg": msg}, status_code=status, headers=headers)


def success(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"code": "success", "data": data})


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
    pages = []
    for index, page in enumerate(result.pages):
        entry: dict[str, Any] = {"page_width": page.width, "page_height": page.height, "md": page.md}
        if with_index:
            entry = {"url": f"{uid}_{index}.jpg", "page_idx": index, **entry}
        pages.append(entry)
    return {"result": {"pages": pages}, "convert_zip": convert_zip(result.figures)}


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """Build the server; one engine is loaded here and serves every request of the process."""
    config = config or ServerConfig()
    state = ServerState(
        config=config, initial=config, engine=load_engine(config.engine), random=random.Random(config.seed)
    )
    app = FastAPI(title="Doc2X local server", docs_url="/local/docs", openapi_url="/local/openapi.json")
    app.state.doc2x = state

    @app.middleware("http")
    async def trace_and_faults(request: Request, call_next):
        trace_id = uuid.uuid4().hex
        if request.url.path.startswith("/local/"):
            return await call_next(request)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            response = await answer_api_call(request, call_next, trace_id)
        finally:
            state.in_flight -= 1
        response.headers["trace-id"] = trace_id
        return response

    async def answer_api_call(request: Request, call_next, trace_id: str) -> Response:
        """The API's answer, or the faults the knobs ask for: latency, then a gateway's HTML error."""
        settings = state.config
        if settings.latency:
            await asyncio.sleep(settings.latency)
        if settings.fail_next > 0:
            state.config = replace(settings, fail_next=settings.fail_next - 1)
            return html_failure(503, "Service Unavailable", trace_id)
        if settings.error_rate and state.random.random() < settings.error_rate:
            return html_failure(502, "Bad Gateway", trace_id)
        return await call_next(request)

    def authorize(request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = state.config.api_key
        if scheme.lower() != "bearer" or not token.strip() or (expected is not None and token != expected):
            return error("unauthorized", "Invalid or missing API key", status=401)
        return None

    def admit_upload(request: Request) -> JSONResponse | None:
        """Auth, then the key's rolling window: at most ``rate_limit`` images per ``rate_window``."""
        refused = authorize(request)
        if refused:
            return refused
        settings = state.config
        window = state.windows[request.headers["authorization"]]
        now = time.monotonic()
        while window and window[0] <= now - settings.rate_window:
            window.popleft()
        if len(window) >= settings.rate_limit:
            state.rate_limited += 1
            retry_after = window[0] + settings.rate_window - now
            return error(
                "request_limit_exceeded",
                "Too many requests",
                status=429,
                headers={"Retry-After": f"{retry_after:.3f}"},
            )
        window.append(now)
        return None

    async def read_image(request: Request) -> tuple[bytes, JSONResponse | None]:
        declared = request.headers.get("content-length")
        if declared and int(declared) > protocol.MAX_IMAGE_BYTES:
            return b"", error("parse_file_too_large", "File too large, at most 7M")
        body = await request.body()
        if len(body) > protocol.MAX_IMAGE_BYTES:
            return b"", error("parse_file_too_large", "File too large, at most 7M")
        if protocol.sniff_image_type(body) is None:
            return b"", error("parse_file_not_image", "The file is not a jpg/png image")
        return body, None

    def bill(image: bytes) -> tuple[str, JSONResponse | None]:
        settings = state.config
        if settings.quota is not None and sum(state.billed.values()) >= settings.quota:
            return "", error("parse_quota_limit", "No page quota left")
        digest = hashlib.sha256(image).hexdigest()
        if not state.billed:
            state.upload_times[0] = time.monotonic()
        state.upload_times[1] = time.monotonic()
        state.billed[digest] += 1
        return digest, None

    async def run_engine(image: bytes, uid: str) -> EngineResult:
        return await asyncio.to_thread(state.engine.parse, image, uid)

    async def stall_if_asked() -> None:
        settings = state.config
        if settings.stall_next > 0:
            state.config = replace(settings, stall_next=settings.stall_next - 1)
            await asyncio.sleep(settings.stall_seconds)

    @app.post(protocol.PARSE_PATH)
    async def parse(request: Request) -> Response:
        state.requests["parse"] += 1
        refused = admit_upload(request)
        if refused:
            return refused
        image, refused = await read_image(request)
        if refused:
            return refused
        uid = str(uuid.uuid4())
        try:
            started = time.monotonic()
            result = await run_engine(image, uid)
        except ImageUnreadable:
            return error("parse_file_invalid", "The image cannot be read")
        _, refused = bill(image)
        if refused:
            return refused
        await asyncio.sleep(max(0.0, state.config.processing_time - (time.monotonic() - started)))
        await stall_if_asked()
        if result.fail_code:
            return error(result.fail_code, f"Failed: {result.fail_code}")
        return success({"uid": uid, **result_data(uid, result, with_index=False)})

    @app.post(protocol.SUBMIT_PATH)
    async def submit(request: Request) -> Response:
        state.requests["submit"] += 1
        refused = admit_upload(request)
        if refused:
            return refused
        image, refused = await read_image(request)
        if refused:
            return refused
        try:  # refused at once, unbilled, like the synchronous endpoint
            await asyncio.to_thread(open_image, image)
        except ImageUnreadable:
            return error("parse_file_invalid", "The image cannot be read")
        digest, refused = bill(image)
        if refused:
            return refused
        now = time.monotonic()
        uid = str(uuid.uuid4())
        job = Job(uid=uid, sha256=digest, created=now)
        job.work = asyncio.create_task(run_engine(image, uid))
        state.jobs[uid] = job
        await stall_if_asked()
        return success({"uid": uid})

    @app.get(protocol.STATUS_PATH)
    async def status(request: Request, uid: str = "") -> Response:
        state.requests["status"] += 1
        refused = authorize(request)
        if refused:
            return refused
        job = state.jobs.get(uid)
        now = time.monotonic()
        if job is None or now - job.created > state.config.result_ttl:
            return error("parse_status_not_found", f"No task with uid {uid!r}, or its result expired")
        assert job.work is not None
        # Readiness follows the current processing_time, so a test can let waiting jobs finish.
        processing_time = state.config.processing_time
        if now < job.created + processing_time or not job.work.done():
            progress = min(99, int(100 * (now - job.created) / max(processing_time, 1e-9)))
            return success({"status": protocol.STATUS_PROCESSING, "progress": progress})
        if job.result is None:
            try:
                job.result = job.work.result()
            except ImageUnreadable:
                return error("parse_file_invalid", "The image cannot be read")
        if job.result.fail_code:
            return error(job.result.fail_code, f"Failed: {job.result.fail_code}")
        return success(
            {
                "status": protocol.STATUS_SUCCESS,
                "progress": 100,
                **result_data(uid, job.result, with_index=True),
            }
        )

    @app.get("/local/stats")
    async def stats() -> dict[str, Any]:
        """What was billed, per image content hash: proof that nothing was billed twice."""
        return {
            "billed_total": sum(state.billed.values()),
            "billed": dict(state.billed),
            "max_billed_per_image": max(state.billed.values(), default=0),
            "requests": dict(state.requests),
            "rate_limited": state.rate_limited,
            "max_in_flight": state.max_in_flight,
            "upload_span_seconds": state.upload_times[1] - state.upload_times[0],
            "jobs": len(state.jobs),
        }

    @app.get("/local/config")
    async def get_config() -> dict[str, Any]:
        return {key: value for key, value in asdict(state.config).items() if key != "api_key"}

    @app.post("/local/config")
    async def set_config(request: Request) -> Response:
        changes = await request.json()
        if "engine" in changes and changes["engine"] != state.config.engine:
            return JSONResponse({"error": "the engine is chosen when the server starts"}, status_code=400)
        try:
            state.config = state.config.updated(changes)
        except (TypeError, ValueError) as problem:
            return JSONResponse({"error": str(problem)}, status_code=400)
        if "seed" in changes:
            state.random = random.Random(state.config.seed)
        return JSONResponse(await get_config())

    @app.post("/local/reset")
    async def reset() -> dict[str, str]:
        state.reset()
        return {"status": "reset"}

    @app.get("/local/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "engine": state.engine.name}

    return app


def html_failure(status: int, title: str, trace_id: str) -> HTMLResponse:
    """What a gateway in front of the API answers when it fails: HTML, not the API's JSON."""
    return HTMLResponse(
        f"<html><head><title>{status} {title}</title></head><body><h1>{status} {title}</h1></body></html>",
        status_code=status,
        headers={"trace-id": trace_id},
    )
