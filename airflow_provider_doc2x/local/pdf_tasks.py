"""A simulated PDF task's life on the local server: pickup, checks, pages parsed, billing, the result.

A task exists once a PUT on its presigned url answered 200 (see
:mod:`~airflow_provider_doc2x.local.pdf_service`). During ``pickup_delay`` after the PUT it is not
picked up yet (status shows ``processing`` with progress 0, or ``parse_status_not_found`` as
``pickup_status`` says). Then it is picked up and checked as the notes describe: its size
(``pdf_max_bytes``, ``parse_file_too_large``), type (``parse_file_not_pdf``), readability
(``parse_file_invalid``), page count (``max_pages``, ``parse_page_limit_exceeded``), the limits in
progress (``max_tasks_in_progress``, ``parse_task_limit_exceeded``; ``max_pages_in_progress``,
``parse_concurrency_limit``) and the quota (``parse_quota_limit``): limit errors only show in
status, since page counts are unknown before the upload. Its pages are parsed by the server's
engine, ``pdf_page_workers`` at once over all tasks, each taking at least ``pdf_page_seconds``;
progress is the share of pages done. A page is read as its image or its text layer (the rule is
in :mod:`~airflow_provider_doc2x.local.pdfdoc`): an image is parsed by the engine, a text layer is
the page's Markdown as it is. A page whose embedded text (or text layer) says
``<!-- doc2x-fail: CODE -->`` fails the whole task with CODE (Doc2X has no per-page error field); a
page that does not decode fails it with ``parse_file_invalid``; ``pdf_fail_next`` fails the next
task picked up with ``pdf_fail_reason``.

A successful task's ``result`` is ``{"version": "", "pages": [{"url", "page_idx", "page_width",
"page_height", "md", "score"}]}``, one page per PDF page in order (a blank page too), sizes in the
page image's pixels (a text or blank page's: its media box, in points). Figures in ``md`` link the
page image on the local CDN (see :mod:`~airflow_provider_doc2x.local.exports`); a page's ``url``
is its CDN image when it has figures, else ``""``; ``score`` is 100, 0 for a blank page.

Billing: a task that succeeds bills one page per PDF page, counted per page content hash (see
:mod:`~airflow_provider_doc2x.local.pdfdoc`) in ``pdf_billed``, and per model in
``pages_by_model``; a failed task bills only with ``bill_failed_pdfs``. A page parsed by a model
other than the default (v2) ends its ``md`` (and its export's Markdown) with
``<!-- model: NAME -->``, so that a result of another model differs from the default's.

:class:`PdfTasks` holds the tasks and runs them; it reaches the knobs, the engine and the quota
through :class:`~airflow_provider_doc2x.local.host.Host`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from airflow_provider_doc2x.local.config import ServerConfig
from airflow_provider_doc2x.local.engines import FAIL_DIRECTIVE, ImageUnreadable
from airflow_provider_doc2x.local.exports import Box, cdn_link, cdn_path, figure_box, image_name, link_figures
from airflow_provider_doc2x.local.host import Host
from airflow_provider_doc2x.local.limits import Slots
from airflow_provider_doc2x.local.pdfdoc import PdfDocument, PdfUnreadable, looks_like_pdf

MODELS = ("v2", "v3-2026")
DEFAULT_MODEL = "v2"
#: What ends each page's Markdown when a model other than :data:`DEFAULT_MODEL` parsed it.
MODEL_MARK = "<!-- model: {model} -->"

PROCESSING, SUCCESS, FAILED = "processing", "success", "failed"

log = logging.getLogger(__name__)


class TaskFailed(Exception):
    """A PDF task fails with this Doc2X code (or free text, from ``pdf_fail_reason``)."""

    def __init__(self, code: str) -> None:
        """Carry the code."""
        super().__init__(code)
        self.code = code


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


class PdfTasks:
    """The PDF tasks of one server: each one's life from its upload to its result, and their billing.

    Args:
        host: the server around them.
    """

    def __init__(self, host: Host) -> None:
        """Start with no tasks and zeroed counters."""
        self.host = host
        self.start()

    def start(self) -> None:
        """Forget every task and zero the counters."""
        self.tasks: dict[str, PdfTask] = {}
        self.slots = Slots(lambda: self.host.config.pdf_page_workers)
        #: Billed pages per page content hash.
        self.billed: Counter[str] = Counter()
        self.in_progress: set[str] = set()
        self.pages_in_progress = 0
        self.counts: Counter[str] = Counter()
        #: Billed pages per model.
        self.pages_by_model: Counter[str] = Counter()

    def reset(self) -> None:
        """Stop every task's work and start over."""
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
        """Count the tasks, their pages in progress and their billing for ``GET /local/stats``."""
        return {
            "pdf_tasks": self.counts["pdf_tasks"],
            "pdf_tasks_failed": self.counts["pdf_tasks_failed"],
            "pdf_pages_billed": self.pages_billed(),
            "pdf_billed": dict(self.billed),
            "pages_by_model": dict(self.pages_by_model),
            "max_pdf_billed_per_page": max(self.billed.values(), default=0),
            "pdf_tasks_in_progress": len(self.in_progress),
            "max_pdf_tasks_in_progress": self.counts["max_pdf_tasks_in_progress"],
            "pages_in_progress": self.pages_in_progress,
            "max_pages_in_progress": self.counts["max_pages_in_progress"],
            "max_pages_parsing": self.slots.max_active,
        }

    def add(self, uid: str, model: str, base_url: str, body: bytes, *, oversize: bool) -> None:
        """Create the task of an upload that answered 200, and start its work."""
        task = PdfTask(uid, model, base_url, time.monotonic(), body, oversize)
        self.tasks[task.uid] = task
        self.counts["pdf_tasks"] += 1
        task.work = asyncio.create_task(self.run(task))

    def live(self, uid: str) -> PdfTask | None:
        """The task of a uid while its result lives; None when unknown, not uploaded yet, or expired."""
        task = self.tasks.get(uid)
        if task is None or self.expired(task):
            return None
        return task

    def expired(self, task: PdfTask) -> bool:
        """Whether the task's result has expired (``result_ttl`` after its upload)."""
        return time.monotonic() > task.uploaded + self.config.result_ttl

    def purge(self) -> list[str]:
        """Forget the expired tasks, stopping their work; return their uids."""
        gone = []
        for uid, task in list(self.tasks.items()):
            if self.expired(task):
                if task.work is not None:
                    task.work.cancel()
                del self.tasks[uid]
                gone.append(uid)
        return gone

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
        """Read a page and run the engine on its image, or take its text layer. Blocking: run it in a thread.

        Raises:
            PdfUnreadable: the page cannot be read.
            ImageUnreadable: its image does not decode.
        """
        assert task.document is not None
        image = task.document.page(index)
        page = ParsedPage(index, image.width, image.height, image.digest)
        if image.text:  # a born-digital page: its text layer is its Markdown
            failure = FAIL_DIRECTIVE.search(image.text)
            if failure:
                page.fail_code = failure.group(1)
                return page
            md, figures = image.text, {}
        elif image.blank:
            page.score = 0
            return page
        else:
            result = self.host.engine.parse(image.data, task.uid)
            if result.fail_code:
                page.fail_code = result.fail_code
                return page
            md, figures = "\n\n".join(engine_page.md for engine_page in result.pages), result.figures
        if task.model != DEFAULT_MODEL:
            md = f"{md}\n\n{MODEL_MARK.format(model=task.model)}"
        boxes = {name: figure_box(name, (image.width, image.height)) for name in figures}
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

    # The result

    def result(self, task: PdfTask) -> dict[str, Any]:
        """A finished task's ``result``: its pages in order (a page of ``malformed_status`` misnumbered)."""
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
