"""The local server's image API: the synchronous parse, async jobs and their status, and their billing.

It answers as the API notes describe: Bearer auth and 401, the 7 MB and type checks with their
codes, the per-key rate limit as HTTP 429 ``request_limit_exceeded``, async jobs that are
``processing`` for ``processing_time`` then ``success`` or a failure code,
``parse_status_not_found`` for unknown or expired uids, ``convert_zip`` as base64 of a real zip of
``images/...``. Each image is billed one page, counted per image content hash (``billed`` in
``/local/stats``), with the times of billing for throughput figures.

:class:`ImageService` holds the jobs and the billing; :func:`image_routes` maps the routes onto it.
It reaches the rest of the server (knobs, key check, the upload link, the engine, the quota)
through :class:`~airflow_provider_doc2x.local.host.Host`.
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.local.answers import Refused, api_error, success
from airflow_provider_doc2x.local.connection import declared_length
from airflow_provider_doc2x.local.engines import EngineResult, ImageUnreadable, open_image
from airflow_provider_doc2x.local.host import Host
from airflow_provider_doc2x.local.limits import admit


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


class ImageService:
    """The image API's jobs, billing and rate window, for the routes of :func:`image_routes`.

    Args:
        host: the server around it.
    """

    def __init__(self, host: Host) -> None:
        """Start with no jobs and zeroed counters."""
        self.host = host
        self.jobs: dict[str, Job] = {}
        #: Billed pages per image content hash.
        self.billed: Counter[str] = Counter()
        #: Per key (its Authorization header): when each upload of the rate window was admitted.
        self.windows: defaultdict[str, deque[float]] = defaultdict(deque)
        self.rate_limited = 0
        #: Server times of the first and last billed upload, for throughput figures.
        self.upload_times = [0.0, 0.0]
        #: When each billed upload was billed, in seconds after the first (the last 100,000).
        self.billed_seconds: deque[float] = deque(maxlen=100_000)
        #: Draws the answer waits' jitter (seeded, so repeatable).
        self.random = random.Random(host.config.seed)
        #: Uploads whose body arrived whole; the seconds their bodies took to arrive, and their answer waits.
        self.timed = [0, 0.0, 0.0]

    def reset(self) -> None:
        """Stop every job's work, forget the jobs, and zero the counters."""
        for job in self.jobs.values():
            if job.work is not None:
                job.work.cancel()
        self.jobs.clear()
        self.billed.clear()
        self.windows.clear()
        self.rate_limited = 0
        self.upload_times = [0.0, 0.0]
        self.billed_seconds.clear()
        self.random = random.Random(self.host.config.seed)
        self.timed = [0, 0.0, 0.0]

    def pages_billed(self) -> int:
        """Pages billed for images (one per image)."""
        return sum(self.billed.values())

    def stats(self) -> dict[str, Any]:
        """Count what was billed per image content hash, the rate limit's refusals and the jobs."""
        return {
            "billed_total": self.pages_billed(),
            "billed": dict(self.billed),
            "max_billed_per_image": max(self.billed.values(), default=0),
            "rate_limited": self.rate_limited,
            "upload_span_seconds": self.upload_times[1] - self.upload_times[0],
            "billed_seconds": [round(seconds, 4) for seconds in self.billed_seconds],
            "jobs": len(self.jobs),
            # What an upload's time was made of at the server: its body's arrival, then the answer wait.
            "uploads_timed": self.timed[0],
            "body_seconds_mean": self.timed[1] / self.timed[0] if self.timed[0] else 0.0,
            "answer_wait_seconds_mean": self.timed[2] / self.timed[0] if self.timed[0] else 0.0,
        }

    # Uploads

    @asynccontextmanager
    async def upload(self, request: Request, endpoint: str) -> AsyncIterator[bytes]:
        """Open an upload, as both upload endpoints do; yield the image once it is admitted.

        Counts the request and the upload in flight until the endpoint is done with it, checks the
        key, receives the body at the link's pace (or resets it), admits it into the key's rate
        window and waits ``answer_seconds`` (plus jitter), or the other way round when the server
        counts at the answer (``rate_counted_at``), then checks size and type.

        Raises:
            Refused: 401, 429, or an image refused for its size or type.
            ConnectionGone: the connection was reset, or the client went away.
        """
        self.host.requests[endpoint] += 1
        with self.host.upload_in_flight():
            self.host.authorize(request)
            declared = declared_length(request)
            if declared is not None and declared > protocol.MAX_IMAGE_BYTES:
                self.admit_upload(request)  # refused without reading it; a Doc2X attempt all the same
                raise api_error("parse_file_too_large", "File too large, at most 7M")
            started = time.monotonic()
            image, _ = await self.host.receive_body(request, declared)
            arrived = time.monotonic()
            counted_at_answer = self.host.config.rate_counted_at == "answer"
            if not counted_at_answer:
                self.admit_upload(request)
            await self.answer_wait()
            self.timed = [
                self.timed[0] + 1,
                self.timed[1] + arrived - started,
                self.timed[2] + time.monotonic() - arrived,
            ]
            if counted_at_answer:
                self.admit_upload(request)
            self.check_image(image)
            yield image

    async def answer_wait(self) -> None:
        """Wait ``answer_seconds`` plus up to ``answer_jitter`` more: the server's own time on an upload."""
        settings = self.host.config
        wait = settings.answer_seconds + (
            settings.answer_jitter and self.random.uniform(0, settings.answer_jitter)
        )
        if wait > 0:
            await asyncio.sleep(wait)

    def admit_upload(self, request: Request) -> None:
        """Count the upload in its key's rolling window: at most ``rate_limit`` per ``rate_window``.

        Raises:
            Refused: HTTP 429 ``request_limit_exceeded`` with ``Retry-After``.
        """
        settings = self.host.config
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
        left = self.host.quota_left()
        if left is not None and left <= 0:
            raise api_error("parse_quota_limit", "No page quota left")
        digest = hashlib.sha256(image).hexdigest()
        if not self.billed:
            self.upload_times[0] = time.monotonic()
        self.upload_times[1] = time.monotonic()
        self.billed_seconds.append(self.upload_times[1] - self.upload_times[0])
        self.billed[digest] += 1
        return digest

    async def stall(self) -> None:
        """Hold this answer for ``stall_seconds`` if ``stall_next`` asks for it."""
        settings = self.host.config
        if settings.stall_next > 0:
            self.host.config = replace(settings, stall_next=settings.stall_next - 1)
            await asyncio.sleep(settings.stall_seconds)

    async def run_engine(self, image: bytes, uid: str) -> EngineResult:
        """Run the engine on one image, in a thread."""
        return await asyncio.to_thread(self.host.engine.parse, image, uid)

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
        await asyncio.sleep(max(0.0, self.host.config.processing_time - (time.monotonic() - started)))
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
        config = self.host.config
        if job is None or now - job.created > config.result_ttl:
            raise api_error("parse_status_not_found", f"No task with uid {uid!r}, or its result expired")
        if job.sha256 in config.malformed_status:
            return {"status": ["garbled"], "progress": 0}
        assert job.work is not None
        # Readiness follows the current processing_time, so a test can let waiting jobs finish.
        processing_time = config.processing_time
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


def image_routes(images: ImageService) -> APIRouter:
    """Map the image API's routes (parse, submit, status) onto ``images``."""
    router = APIRouter()

    @router.post(protocol.PARSE_PATH)
    async def parse(request: Request) -> Response:
        async with images.upload(request, "parse") as image:
            return success(await images.parse(image))

    @router.post(protocol.SUBMIT_PATH)
    async def submit(request: Request) -> Response:
        async with images.upload(request, "submit") as image:
            return success(await images.submit(image))

    @router.get(protocol.STATUS_PATH)
    async def status(request: Request, uid: str = "") -> Response:
        images.host.requests["status"] += 1
        images.host.authorize(request)
        return success(images.status(uid))

    return router
