r"""The local server's PDF API: preupload, PUT to a presigned url, status, export, and the CDN.

It answers as the PDF API notes describe, for the provider's bulk lane (images of one size packed
losslessly into multi-page PDFs with img2pdf):

- ``POST /api/v2/parse/preupload`` (Bearer key; body none, or JSON ``{"model": "v2" | "v3-2026"}``;
  ``file_name`` and other fields are ignored; another model is the error ``invalid_params``) gives
  ``{"uid", "url"}``: a presigned PUT url on the server itself,
  ``/local/oss/tmp/<uid>.pdf?X-Amz-...&X-Amz-Signature=...``. Past ``preupload_rate_limit`` per
  ``rate_window`` it answers HTTP 429 ``request_limit_exceeded``; with no quota left,
  ``parse_quota_limit``.
- ``PUT`` to that url, no key: the raw PDF (or ``multipart/form-data`` holding it, as pdfdeal
  sends). The store answers HTTP 200 (with an ``ETag``) and the task exists; it refuses with HTTP
  403 and an XML error a wrong signature, an expired url (``upload_url_ttl``), and a url that
  already answered a 200. A PUT that got no 200 (cut by a reset, or an injected 503) may be sent
  again on the same url. The upload's size and type are not checked here: the task fails later.
- ``GET /api/v2/parse/status?uid=``: during ``pickup_delay`` after the PUT, ``processing`` with
  progress 0, or ``parse_status_not_found`` (``pickup_status``). Then the task is picked up: its
  size (``pdf_max_bytes``, ``parse_file_too_large``), type (``parse_file_not_pdf``), readability
  (``parse_file_invalid``), page count (``max_pages``, ``parse_page_limit_exceeded``), the limits
  in progress (``max_tasks_in_progress``, ``parse_task_limit_exceeded``; ``max_pages_in_progress``,
  ``parse_concurrency_limit``) and the quota (``parse_quota_limit``) are checked: the notes say
  limit errors only show in status, since page counts are unknown before the upload. Its pages are
  parsed by the server's engine, ``pdf_page_workers`` at once over all tasks, each taking at least
  ``pdf_page_seconds``; progress is the share of pages done. Then ``success`` with
  ``result: {"version": "", "pages": [{"url", "page_idx", "page_width", "page_height", "md",
  "score"}]}``, one page per PDF page in order (a blank page too), sizes in the page image's
  pixels. A failure shows as ``pdf_failure_shape`` says: ``failed`` with ``detail``, or an envelope
  error code. A page whose embedded text says ``<!-- doc2x-fail: CODE -->`` fails the whole task
  with CODE (Doc2X has no per-page error field).
- Figures in ``md`` link the page image on the local CDN, ``/local/cdn/<uid>_<page_idx>.jpg?x=..
  &y=..&w=..&h=..&r=0``, which crops it; the links work for ``cdn_ttl`` after the task finished,
  then answer 403. A page's ``url`` is its CDN image when it has figures, else ``""``; ``score``
  is 100, 0 for a blank page.
- ``POST /api/v2/convert/parse`` (``uid``, ``to`` md|tex|docx, ``formula_mode`` normal|dollar, all
  required; ``filename``, ``merge_cross_page_forms``, ``formula_level`` optional; a bad one is
  ``invalid_params``; a task that has not succeeded is ``convert_not_ready``) answers
  ``{"status": "processing", "url": ""}``; ``GET /api/v2/convert/parse/result?uid=`` shows the
  uid's latest export: ``processing`` for ``export_seconds``, then ``success`` with a presigned GET
  url, ``/local/s3/objects/<uid>/convert_md_none.zip?X-Amz-...`` (its ``&`` written ``\u0026``
  with ``export_url_escaped``). See :mod:`~airflow_provider_doc2x.local.exports` for the files.

Billing: a task that succeeds bills one page per PDF page, counted per page content hash (see
:mod:`~airflow_provider_doc2x.local.pdfdoc`) in ``pdf_billed``; a failed task bills only with
``bill_failed_pdfs``. Images and PDF pages share the ``quota``.

The model: ``/local/stats`` counts preuploads per model asked (``preuploads_by_model``) and pages
billed per model (``pages_by_model``), and a page parsed by a model other than the default (v2)
ends its ``md`` (and its export's Markdown) with ``<!-- model: NAME -->``, so that a result of
another model differs from the default's. The default model's Markdown is the engine's, unchanged.

:class:`PdfLane` holds the state and the rules; the routes in
:func:`~airflow_provider_doc2x.local.server.create_app` call it. It reaches the rest of the server
(knobs, key check, the upload link, the engine) through :class:`Host`, which
:class:`~airflow_provider_doc2x.local.server.LocalServer` is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response

from airflow_provider_doc2x.local.answers import Refused, api_error, authorization_quote
from airflow_provider_doc2x.local.config import ServerConfig
from airflow_provider_doc2x.local.engines import Engine, ImageUnreadable
from airflow_provider_doc2x.local.exports import (
    DEFAULT_STEM,
    FORMATS,
    FORMULA_MODES,
    MEDIA_TYPES,
    Box,
    cdn_link,
    cdn_path,
    crop,
    docx_document,
    dollar_formulas,
    export_file_name,
    figure_box,
    image_name,
    link_figures,
    markdown_archive,
    tex_archive,
)
from airflow_provider_doc2x.local.limits import Slots, admit
from airflow_provider_doc2x.local.objectstore import Presigner, multipart_file, store_error
from airflow_provider_doc2x.local.pdfdoc import PageImage, PdfDocument, PdfUnreadable, looks_like_pdf

PREUPLOAD_PATH = "/api/v2/parse/preupload"
PDF_STATUS_PATH = "/api/v2/parse/status"
CONVERT_PATH = "/api/v2/convert/parse"
CONVERT_RESULT_PATH = "/api/v2/convert/parse/result"
#: The store's paths (routes): uploads by PUT, exports by GET, and the CDN's page images.
UPLOAD_ROUTE = "/local/oss/tmp/{name}"
EXPORT_ROUTE = "/local/s3/objects/{uid}/{name}"
CDN_ROUTE = "/local/cdn/{name}"

MODELS = ("v2", "v3-2026")
DEFAULT_MODEL = "v2"
#: What ends each page's Markdown when a model other than :data:`DEFAULT_MODEL` parsed it.
MODEL_MARK = "<!-- model: {model} -->"
#: This server's code for a bad parameter (Doc2X's is not documented).
PARAMETER_ERROR = "invalid_params"
#: This server's code for an export asked of a task that has not succeeded.
NOT_READY = "convert_not_ready"
NOT_FOUND = "parse_status_not_found"
#: Room kept beyond ``pdf_max_bytes`` for a multipart body's headers.
MULTIPART_ROOM = 64 * 1024
ROTATIONS = (0, 90, 180, 270)
_CDN_NAME = re.compile(r"(?P<uid>[0-9a-f-]{36})_(?P<page>\d+)\.jpg")

PROCESSING, SUCCESS, FAILED = "processing", "success", "failed"

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the PDF API needs of the server around it (:class:`~airflow_provider_doc2x.local.server.LocalServer`)."""

    config: ServerConfig
    engine: Engine
    #: Requests per endpoint.
    requests: Counter[str]

    def authorize(self, request: Request) -> None:
        """Check the Bearer key, or raise the 401 refusal."""
        ...

    def upload_in_flight(self) -> AbstractContextManager[None]:
        """Count an upload in flight while it lasts."""
        ...

    async def receive_body(
        self, request: Request, declared: int | None = None, *, keep: int | None = None
    ) -> tuple[bytes, int]:
        """Read a body at the link's pace: its first ``keep`` bytes, and its size."""
        ...

    async def sleep_until(self, due: Callable[[], float]) -> None:
        """Sleep until the monotonic time ``due()`` returns, read again whenever the knobs change."""
        ...

    def quota_left(self) -> int | None:
        """Pages the account may still bill (None: no quota), pages reserved by tasks in progress deducted."""
        ...


class TaskFailed(Exception):
    """A PDF task fails with this Doc2X code (or free text, from ``pdf_fail_reason``)."""

    def __init__(self, code: str) -> None:
        """Carry the code."""
        super().__init__(code)
        self.code = code


@dataclass
class Upload:
    """A presigned PUT url handed out by preupload."""

    uid: str
    model: str
    #: The server's URL as the client reached it; the task's links start with it.
    base_url: str
    issued: float
    #: ``upload_url_ttl`` when the url was issued.
    ttl: float
    #: Whether a PUT on it answered 200 (then it is spent).
    used: bool = False


@dataclass
class ParsedPage:
    """A PDF page as the engine read it: its size, hash, and Markdown for status and for exports."""

    index: int
    width: int
    height: int
    digest: str
    #: Markdown with figures linked to the CDN, as status shows it.
    md: str = ""
    #: Markdown with figures linked to ``images/...``, as an md export holds it.
    export_md: str = ""
    #: The figures' boxes, by their file name in an export.
    figures: dict[str, Box] = field(default_factory=dict)
    score: int = 100
    #: Set when the page's text asks the task to fail.
    fail_code: str | None = None


@dataclass
class PdfTask:
    """A PDF task: created by a PUT's 200, picked up after ``pickup_delay``, then parsed page by page."""

    uid: str
    model: str
    base_url: str
    uploaded: float
    #: The PDF, empty when it was over ``pdf_max_bytes`` (``oversize``).
    body: bytes
    oversize: bool = False
    document: PdfDocument | None = None
    page_count: int = 0
    picked_up: bool = False
    #: Whether it counts in the tasks and pages in progress.
    in_progress: bool = False
    pages: dict[int, ParsedPage] = field(default_factory=dict)
    status: str = PROCESSING
    failure: str | None = None
    failure_shape: str = "status"
    finished: float | None = None
    #: Set by ``pdf_fail_next``: the reason it fails with once its pages are parsed.
    injected: str | None = None
    work: asyncio.Task[None] | None = None

    @property
    def progress(self) -> int:
        """0 to 100: the share of pages parsed (100 only on success)."""
        if self.status == SUCCESS:
            return 100
        if not self.page_count:
            return 0
        return min(99, 100 * len(self.pages) // self.page_count)


@dataclass
class Export:
    """A uid's latest export: what was asked, when, and its file once built."""

    uid: str
    to: str
    formula_mode: str
    stem: str
    requested: float
    file_name: str
    url: str | None = None


class PdfLane:
    """The PDF API's state and rules, for the routes of :func:`~airflow_provider_doc2x.local.server.create_app`.

    Args:
        host: the server around it.
    """

    def __init__(self, host: Host) -> None:
        """Start with no uploads, no tasks and zeroed counters."""
        self.host = host
        self.presigner = Presigner()
        self.start()

    def start(self) -> None:
        """Forget every upload, task and export, and zero the counters."""
        self.uploads: dict[str, Upload] = {}
        self.tasks: dict[str, PdfTask] = {}
        self.exports: dict[str, Export] = {}
        #: Export files by (uid, file name), for the store's GETs.
        self.files: dict[tuple[str, str], bytes] = {}
        self.slots = Slots(lambda: self.host.config.pdf_page_workers)
        #: Per key (its Authorization header): when each preupload of the rate window was admitted.
        self.windows: defaultdict[str, deque[float]] = defaultdict(deque)
        #: Billed pages per page content hash.
        self.billed: Counter[str] = Counter()
        self.in_progress: set[str] = set()
        self.pages_in_progress = 0
        self.counts: Counter[str] = Counter()
        #: Preuploads per model asked (no model asked counts as the default).
        self.preuploads_by_model: Counter[str] = Counter()
        #: Billed pages per model.
        self.pages_by_model: Counter[str] = Counter()

    def reset(self) -> None:
        """Stop every task's work and start over (``POST /local/reset``)."""
        for task in self.tasks.values():
            if task.work is not None:
                task.work.cancel()
        self.start()

    def reconfigured(self) -> None:
        """Follow a change of the knobs: more page workers take waiting pages at once."""
        self.slots.hand_over()

    @property
    def config(self) -> ServerConfig:
        """The server's knobs now."""
        return self.host.config

    def pages_billed(self) -> int:
        """Pages billed for PDFs."""
        return sum(self.billed.values())

    def stats(self) -> dict[str, Any]:
        """Count the PDF API's work for ``GET /local/stats``."""
        return {
            "preuploads": self.counts["preuploads"],
            "preuploads_rate_limited": self.counts["preuploads_rate_limited"],
            "puts": self.counts["puts"],
            "puts_refused": self.counts["puts_refused"],
            "puts_failed": self.counts["puts_failed"],
            "pdf_tasks": self.counts["pdf_tasks"],
            "pdf_tasks_failed": self.counts["pdf_tasks_failed"],
            "pdf_pages_billed": self.pages_billed(),
            "pdf_billed": dict(self.billed),
            "preuploads_by_model": dict(self.preuploads_by_model),
            "pages_by_model": dict(self.pages_by_model),
            "max_pdf_billed_per_page": max(self.billed.values(), default=0),
            "pdf_tasks_in_progress": len(self.in_progress),
            "max_pdf_tasks_in_progress": self.counts["max_pdf_tasks_in_progress"],
            "pages_in_progress": self.pages_in_progress,
            "max_pages_in_progress": self.counts["max_pages_in_progress"],
            "max_pages_parsing": self.slots.max_active,
            "exports": self.counts["exports"],
        }

    # Preupload and PUT

    async def preupload(self, request: Request) -> dict[str, Any]:
        """Hand out a uid and its presigned PUT url: the preupload's ``data``.

        Raises:
            Refused: 401, ``invalid_params``, HTTP 429, or ``parse_quota_limit``.
        """
        self.host.requests["preupload"] += 1
        self.host.authorize(request)
        model = preupload_model(await request.body())
        settings = self.config
        if settings.preupload_rate_limit is not None:
            try:
                admit(
                    self.windows[request.headers["authorization"]],
                    limit=settings.preupload_rate_limit,
                    seconds=settings.rate_window,
                    now=time.monotonic(),
                )
            except Refused:
                self.counts["preuploads_rate_limited"] += 1
                raise
        left = self.host.quota_left()
        if left is not None and left <= 0:
            raise api_error("parse_quota_limit", "No page quota left")
        self.purge()
        uid = str(uuid.uuid4())
        base_url = str(request.base_url).rstrip("/")
        self.uploads[uid] = Upload(uid, model, base_url, issued=time.monotonic(), ttl=settings.upload_url_ttl)
        self.counts["preuploads"] += 1
        self.preuploads_by_model[model] += 1
        url = self.presigner.url(base_url, "PUT", upload_path(uid), expires=settings.upload_url_ttl)
        return {"uid": uid, "url": url}

    async def put(self, request: Request, name: str) -> Response:
        """Take a PUT on a presigned url: check the url, receive the body, create the task.

        Raises:
            Refused: the store's 403 (signature, expiry, reuse) or an injected 503, as XML.
            ConnectionGone: the link cut the upload (``reset_next_uploads``) or the client left.
        """
        self.host.requests["put"] += 1
        self.counts["puts"] += 1
        path = request.url.path
        try:
            self.presigner.check("PUT", path, request.query_params)
            upload = self.uploads.get(name.removesuffix(".pdf"))
            if upload is None:
                raise store_error(403, "AccessDenied", "No upload is expected at this url", path)
            self.check_unused(upload, path)
            if time.monotonic() >= upload.issued + upload.ttl:
                raise store_error(403, "AccessDenied", "Request has expired", path)
        except Refused:
            self.counts["puts_refused"] += 1
            raise
        limit = self.config.pdf_max_bytes
        with self.host.upload_in_flight():
            body, size = await self.host.receive_body(request, keep=limit + MULTIPART_ROOM)
        settings = self.config
        if settings.put_fail_next > 0:
            self.host.config = replace(settings, put_fail_next=settings.put_fail_next - 1)
            self.counts["puts_failed"] += 1
            raise store_error(503, "ServiceUnavailable", "Please reduce your request rate.", path)
        try:
            self.check_unused(upload, path)  # another PUT on this url may have won meanwhile
        except Refused:
            self.counts["puts_refused"] += 1
            raise
        upload.used = True
        content_type = request.headers.get("content-type", "")
        if size <= len(body) and content_type.lower().startswith("multipart/form-data"):
            body = multipart_file(body, content_type) or body
            size = len(body)
        digest = hashlib.md5(body, usedforsecurity=False).hexdigest().upper()
        self.start_task(upload, b"" if size > limit else body, oversize=size > limit)
        return Response(status_code=200, headers={"ETag": f'"{digest}"'})

    def check_unused(self, upload: Upload, path: str) -> None:
        """Refuse a url that already answered a 200.

        Raises:
            Refused: HTTP 403 ``AccessDenied``.
        """
        if upload.used:
            raise store_error(403, "AccessDenied", "This upload url was already used", path)

    def start_task(self, upload: Upload, body: bytes, *, oversize: bool) -> None:
        """Create the task of an upload that answered 200, and start its work."""
        task = PdfTask(upload.uid, upload.model, upload.base_url, time.monotonic(), body, oversize)
        self.tasks[task.uid] = task
        self.counts["pdf_tasks"] += 1
        task.work = asyncio.create_task(self.run(task))

    # A task's work

    async def run(self, task: PdfTask) -> None:
        """Wait for pickup, check the task, parse its pages, then bill it and mark it done."""
        await self.host.sleep_until(lambda: task.uploaded + self.config.pickup_delay)
        task.picked_up = True
        try:
            await self.pick_up(task)
            await self.parse_pages(task)
            if task.injected is not None:
                raise TaskFailed(task.injected)
            self.bill(task)
            task.status = SUCCESS
        except TaskFailed as failure:
            await self.fail(task, failure.code)
        except Exception:  # the engine broke: the task fails, as the service's would, and says why here
            log.exception("PDF task %s: parsing failed", task.uid)
            await self.fail(task, "parse_error")
        finally:
            task.finished = time.monotonic()
            self.leave(task)

    async def pick_up(self, task: PdfTask) -> None:
        """Check the upload as the service does when it fetches it; count the task in progress.

        Raises:
            TaskFailed: size, type, readability, page count, a limit in progress, or the quota.
        """
        if task.oversize:
            raise TaskFailed("parse_file_too_large")
        if not looks_like_pdf(task.body):
            raise TaskFailed("parse_file_not_pdf")
        try:
            task.document = await asyncio.to_thread(PdfDocument, task.body)
        except PdfUnreadable:
            raise TaskFailed("parse_file_invalid") from None
        task.page_count = pages = task.document.page_count
        settings = self.config
        if pages > settings.max_pages:
            raise TaskFailed("parse_page_limit_exceeded")
        limit = settings.max_tasks_in_progress
        if limit is not None and len(self.in_progress) >= limit:
            raise TaskFailed("parse_task_limit_exceeded")
        limit = settings.max_pages_in_progress
        if limit is not None and self.pages_in_progress + pages > limit:
            raise TaskFailed("parse_concurrency_limit")
        left = self.host.quota_left()
        if left is not None and left < pages:
            raise TaskFailed("parse_quota_limit")
        task.in_progress = True
        self.in_progress.add(task.uid)
        self.pages_in_progress += pages
        self.counts["max_pdf_tasks_in_progress"] = max(
            self.counts["max_pdf_tasks_in_progress"], len(self.in_progress)
        )
        self.counts["max_pages_in_progress"] = max(
            self.counts["max_pages_in_progress"], self.pages_in_progress
        )
        if settings.pdf_fail_next > 0:
            self.host.config = replace(settings, pdf_fail_next=settings.pdf_fail_next - 1)
            task.injected = settings.pdf_fail_reason

    def leave(self, task: PdfTask) -> None:
        """Stop counting a finished task in progress."""
        if task.in_progress and task.uid in self.in_progress:
            self.in_progress.discard(task.uid)
            self.pages_in_progress -= task.page_count
        task.in_progress = False

    async def parse_pages(self, task: PdfTask) -> None:
        """Parse every page, as many at once as the page workers allow.

        Raises:
            TaskFailed: a page asked for it, or could not be read (the other pages stop).
        """
        work = [asyncio.ensure_future(self.parse_page(task, index)) for index in range(task.page_count)]
        try:
            for done in asyncio.as_completed(work):
                await done
        finally:
            for page in work:
                page.cancel()
            await asyncio.gather(*work, return_exceptions=True)

    async def parse_page(self, task: PdfTask, index: int) -> None:
        """Parse one page in a worker slot, taking at least ``pdf_page_seconds``.

        Raises:
            TaskFailed: the page asked for it, or could not be read.
        """
        async with self.slots:
            started = time.monotonic()
            try:
                page = await asyncio.to_thread(self.read_page, task, index)
            except (PdfUnreadable, ImageUnreadable):
                raise TaskFailed("parse_file_invalid") from None
            await self.host.sleep_until(lambda: started + self.config.pdf_page_seconds)
        task.pages[index] = page
        if page.fail_code is not None:
            raise TaskFailed(page.fail_code)

    def read_page(self, task: PdfTask, index: int) -> ParsedPage:
        """Read a page's image and run the engine on it. Blocking: run it in a thread.

        Raises:
            PdfUnreadable: the page cannot be read.
            ImageUnreadable: its image does not decode.
        """
        assert task.document is not None
        image = task.document.page(index)
        page = ParsedPage(index, image.width, image.height, image.digest)
        if image.blank:
            page.score = 0
            return page
        result = self.host.engine.parse(image.data, task.uid)
        if result.fail_code:
            page.fail_code = result.fail_code
            return page
        md = "\n\n".join(engine_page.md for engine_page in result.pages)
        if task.model != DEFAULT_MODEL:
            md = f"{md}\n\n{MODEL_MARK.format(model=task.model)}"
        boxes = {name: figure_box(name, (image.width, image.height)) for name in result.figures}
        page.md = link_figures(md, boxes, lambda box: cdn_link(task.base_url, task.uid, index, box))
        page.export_md = link_figures(md, boxes, lambda box: f"images/{image_name(task.uid, index, box)}")
        page.figures = {image_name(task.uid, index, box): box for box in boxes.values()}
        return page

    async def fail(self, task: PdfTask, code: str) -> None:
        """Mark the task failed, in the shape the knobs ask for; bill it if ``bill_failed_pdfs`` says so."""
        settings = self.config
        if settings.bill_failed_pdfs and task.document is not None and code != "parse_quota_limit":
            try:
                for index in range(task.page_count):
                    if index not in task.pages:
                        image = await asyncio.to_thread(task.document.page, index)
                        task.pages[index] = ParsedPage(index, image.width, image.height, image.digest)
            except PdfUnreadable:
                pass  # billed: the pages that could be read
            self.bill(task)
        task.status = FAILED
        task.failure = code
        task.failure_shape = settings.pdf_failure_shape
        self.counts["pdf_tasks_failed"] += 1

    def bill(self, task: PdfTask) -> None:
        """Bill one page per page read, by its content hash and by the task's model."""
        for page in task.pages.values():
            self.billed[page.digest] += 1
        if task.pages:
            self.pages_by_model[task.model] += len(task.pages)

    # Status

    def live_task(self, uid: str) -> PdfTask:
        """The task of a uid, while its result lives.

        Raises:
            Refused: ``parse_status_not_found`` (unknown, not uploaded yet, or expired).
        """
        task = self.tasks.get(uid)
        if task is None or time.monotonic() > task.uploaded + self.config.result_ttl:
            raise api_error(NOT_FOUND, f"No task with uid {uid!r}, or its result expired")
        return task

    def status(self, request: Request, uid: str) -> dict[str, Any]:
        """Report a PDF task's status ``data``.

        Raises:
            Refused: 401, ``parse_status_not_found``, or the task's failure as an envelope error.
        """
        self.host.requests["pdf_status"] += 1
        self.host.authorize(request)
        task = self.live_task(uid)
        if not task.picked_up:
            if self.config.pickup_status == "not_found":
                raise api_error(NOT_FOUND, f"No task with uid {uid!r}, or its result expired")
            return {"status": PROCESSING, "progress": 0}
        if task.status == FAILED:
            assert task.failure is not None
            if task.failure_shape == "envelope":
                raise api_error(task.failure, f"Failed: {task.failure}")
            detail = task.failure
            if self.config.echo_key and "authorization" in request.headers:
                detail = f"{detail} {authorization_quote(request.headers['authorization'])}"
            return {"status": FAILED, "progress": task.progress, "detail": detail}
        if task.status == SUCCESS:
            return {"status": SUCCESS, "progress": 100, "result": self.result(task)}
        return {"status": PROCESSING, "progress": task.progress}

    def result(self, task: PdfTask) -> dict[str, Any]:
        """A finished task's ``result``: its pages in order."""
        pages = []
        for index in range(task.page_count):
            page = task.pages[index]
            pages.append(
                {
                    "url": f"{task.base_url}{cdn_path(task.uid, index)}" if page.figures else "",
                    "page_idx": index,
                    "page_width": page.width,
                    "page_height": page.height,
                    "md": page.md,
                    "score": page.score,
                }
            )
        malformed = set(self.config.malformed_status)
        for index in range(task.page_count):
            if task.pages[index].digest in malformed:
                if task.page_count == 1:
                    del pages[index]["page_idx"]
                else:
                    pages[index]["page_idx"] = index - 1 if index else index + 1
        return {"version": "", "pages": pages}

    # The CDN

    async def cdn(self, name: str, query: Mapping[str, str]) -> Response:
        """Serve a page image, cropped to ``x, y, w, h`` and turned by ``r`` when the query asks.

        Raises:
            Refused: 404 for an unknown image, 403 once ``cdn_ttl`` has passed, 400 for a bad query.
        """
        match = _CDN_NAME.fullmatch(name)
        task = self.tasks.get(match["uid"]) if match else None
        resource = f"/local/cdn/{name}"
        if match is None or task is None or task.status != SUCCESS or task.document is None:
            raise store_error(404, "NoSuchKey", "The specified key does not exist.", resource)
        assert task.finished is not None
        now = time.monotonic()
        if now > task.finished + self.config.cdn_ttl or now > task.uploaded + self.config.result_ttl:
            raise store_error(403, "AccessDenied", "The link has expired", resource)
        index = int(match["page"])
        if index >= task.page_count:
            raise store_error(404, "NoSuchKey", "The specified key does not exist.", resource)
        box, rotation = crop_query(query, resource)
        image = await asyncio.to_thread(task.document.page, index)
        if image.blank:
            raise store_error(404, "NoSuchKey", "The page holds no image.", resource)
        return Response(await asyncio.to_thread(crop, image.data, box, rotation), media_type="image/jpeg")

    # Exports

    async def export(self, request: Request) -> dict[str, Any]:
        """Start an export of a finished task: the convert call's ``data``.

        Raises:
            Refused: 401, ``invalid_params``, ``parse_status_not_found``, ``convert_not_ready``.
        """
        self.host.requests["convert"] += 1
        self.host.authorize(request)
        asked = export_parameters(await request.body())
        task = self.live_task(asked["uid"])
        if task.status != SUCCESS:
            raise api_error(NOT_READY, f"The task {task.uid!r} has not parsed successfully")
        to = asked["to"]
        self.exports[task.uid] = Export(
            task.uid,
            to,
            asked["formula_mode"],
            asked.get("filename") or DEFAULT_STEM,
            requested=time.monotonic(),
            file_name=export_file_name(to),
        )
        self.counts["exports"] += 1
        return {"status": PROCESSING, "url": ""}

    async def export_result(self, request: Request, uid: str) -> dict[str, Any]:
        """Report the uid's latest export: the convert result call's ``data``.

        Raises:
            Refused: 401, or ``parse_status_not_found`` (no task, or no export asked).
        """
        self.host.requests["convert_result"] += 1
        self.host.authorize(request)
        task = self.live_task(uid)
        export = self.exports.get(uid)
        if export is None:
            raise api_error(NOT_FOUND, f"No export of uid {uid!r} was asked for")
        if time.monotonic() < export.requested + self.config.export_seconds:
            return {"status": PROCESSING, "url": ""}
        if export.url is None:
            self.files[(uid, export.file_name)] = await asyncio.to_thread(self.build_export, task, export)
            path = f"/local/s3/objects/{uid}/{export.file_name}"
            base_url = str(request.base_url).rstrip("/")
            export.url = self.presigner.url(base_url, "GET", path, expires=self.config.result_ttl)
        url = export.url.replace("&", "\\u0026") if self.config.export_url_escaped else export.url
        return {"status": SUCCESS, "url": url}

    def build_export(self, task: PdfTask, export: Export) -> bytes:
        """Build an export's file. Blocking: run it in a thread."""
        assert task.document is not None
        pages = [task.pages[index] for index in range(task.page_count)]
        markdown = "\n\n".join(page.export_md for page in pages if page.export_md)
        if export.formula_mode == "dollar":
            markdown = dollar_formulas(markdown)
        if export.to == "docx":
            return docx_document(markdown)
        images: dict[str, bytes] = {}
        for page in pages:
            if page.figures:
                image: PageImage = task.document.page(page.index)
                for name, box in page.figures.items():
                    images[name] = crop(image.data, box, 0)
        if export.to == "tex":
            return tex_archive(export.stem, markdown, images)
        return markdown_archive(export.stem, markdown, images)

    def download(self, request: Request, uid: str, name: str) -> Response:
        """Serve an export's file to a presigned GET.

        Raises:
            Refused: the store's 403 (signature) or 404 (no such file, or the task expired).
        """
        path = request.url.path
        self.presigner.check("GET", path, request.query_params)
        data = self.files.get((uid, name))
        if data is None or uid not in self.tasks or self.expired(self.tasks[uid]):
            raise store_error(404, "NoSuchKey", "The specified key does not exist.", path)
        media_type = MEDIA_TYPES["docx" if name.endswith(".docx") else "zip"]
        return Response(data, media_type=media_type)

    # Housekeeping

    def expired(self, task: PdfTask) -> bool:
        """Whether the task's result has expired (``result_ttl`` after its upload)."""
        return time.monotonic() > task.uploaded + self.config.result_ttl

    def purge(self) -> None:
        """Forget expired tasks, their exports, and urls that can no longer be used."""
        now = time.monotonic()
        for uid, task in list(self.tasks.items()):
            if self.expired(task):
                if task.work is not None:
                    task.work.cancel()
                del self.tasks[uid]
                self.exports.pop(uid, None)
                for key in [key for key in self.files if key[0] == uid]:
                    del self.files[key]
        for uid, upload in list(self.uploads.items()):
            if now > upload.issued + max(upload.ttl, self.config.result_ttl):
                del self.uploads[uid]


def upload_path(uid: str) -> str:
    """The path of a presigned PUT url."""
    return UPLOAD_ROUTE.format(name=f"{uid}.pdf")


def json_object(body: bytes) -> dict[str, Any]:
    """Read a JSON object body; an empty body is ``{}``.

    Raises:
        Refused: ``invalid_params`` for anything else.
    """
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise api_error(PARAMETER_ERROR, "The body must be a JSON object") from None
    if not isinstance(value, dict):
        raise api_error(PARAMETER_ERROR, "The body must be a JSON object")
    return value


def preupload_model(body: bytes) -> str:
    """The model a preupload asks for: none is v2; ``file_name`` and other fields are ignored.

    Raises:
        Refused: ``invalid_params`` for a bad body or another model.
    """
    model = json_object(body).get("model")
    if model is None:
        return DEFAULT_MODEL
    if model not in MODELS:
        raise api_error(PARAMETER_ERROR, f"model must be one of {list(MODELS)}")
    return str(model)


def export_parameters(body: bytes) -> dict[str, Any]:
    """Check an export's parameters.

    Raises:
        Refused: ``invalid_params``, naming the first bad one.
    """
    asked = json_object(body)
    uid = asked.get("uid")
    if not isinstance(uid, str) or not uid:
        raise api_error(PARAMETER_ERROR, "uid is required")
    if asked.get("to") not in FORMATS:
        raise api_error(PARAMETER_ERROR, f"to is required, one of {list(FORMATS)}")
    if asked.get("formula_mode") not in FORMULA_MODES:
        raise api_error(PARAMETER_ERROR, f"formula_mode is required, one of {list(FORMULA_MODES)}")
    filename = asked.get("filename")
    if filename is not None and (
        not isinstance(filename, str)
        or not filename
        or len(filename) > 200
        or any(character in filename for character in "/\\\0")
        or filename in {".", ".."}
    ):
        raise api_error(PARAMETER_ERROR, "filename must be a plain file name without an extension")
    merge = asked.get("merge_cross_page_forms")
    if merge is not None and not isinstance(merge, bool):
        raise api_error(PARAMETER_ERROR, "merge_cross_page_forms must be a boolean")
    level = asked.get("formula_level")
    if level is not None and (isinstance(level, bool) or level not in (0, 1, 2)):
        raise api_error(PARAMETER_ERROR, "formula_level must be 0, 1 or 2")
    return asked


def crop_query(query: Mapping[str, str], resource: str) -> tuple[Box | None, int]:
    """Read a CDN query: the crop box (all of x, y, w, h, or none) and the turn ``r``.

    Raises:
        Refused: HTTP 400 ``InvalidArgument`` for a partial or bad box, or a turn not a multiple of 90.
    """
    try:
        values = {key: int(query[key]) for key in ("x", "y", "w", "h", "r") if key in query}
    except ValueError:
        raise store_error(400, "InvalidArgument", "x, y, w, h and r must be integers", resource) from None
    rotation = values.pop("r", 0)
    if rotation % 360 not in ROTATIONS:
        raise store_error(400, "InvalidArgument", "r must be a multiple of 90", resource)
    if not values:
        return None, rotation % 360
    if len(values) != 4 or values["w"] <= 0 or values["h"] <= 0 or values["x"] < 0 or values["y"] < 0:
        raise store_error(400, "InvalidArgument", "x, y, w and h go together, w and h above 0", resource)
    return (values["x"], values["y"], values["w"], values["h"]), rotation % 360
