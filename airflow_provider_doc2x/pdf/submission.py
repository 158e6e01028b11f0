"""A PDF's submission to Doc2X: preupload, PUT, status, export and download, for the hook.

The PDF API takes a file in steps: a preupload hands out a uid and a presigned url, the PDF is PUT
to that url (streamed from disk, no key), and the service picks the file up, parses it and bills
its pages; its status is polled, and a finished parse is exported and downloaded.
:class:`PdfCalls` makes these calls for one connection; the hook
(:class:`~airflow_provider_doc2x.hooks.doc2x.Doc2XHook`) offers them as ``hook.pdf``.

**One PDF is PUT at most ``max_retries + 1`` times in all** (the connection's ``max_retries``),
whatever the path: a PUT that failed before its body was sent whole (or that the store answered
408, 429 or 5xx) is sent again on the same url while the url is young; a url the store refused
(403: expired or not matching) or too old to use again is replaced by a new preupload; and
:meth:`PdfCalls.aparse_pdf` submits a PDF again when Doc2X refused its task for its limits. All of
these draw on one count (:class:`_PdfPuts`) run by one ``tenacity.AsyncRetrying`` with the
transport's policy (:func:`~airflow_provider_doc2x.transport.retry_options`): a retried step never
holds another retried step, so the tries add up instead of multiplying. Preuploads and status
calls are API calls, retried on their own by the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import tenacity

from airflow_provider_doc2x import protocol, transport
from airflow_provider_doc2x.exceptions import (
    Doc2XError,
    Doc2XInputError,
    Doc2XJobNotFoundError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.pacing import PdfBudget, pdf_budget_for
from airflow_provider_doc2x.pdf.presigned import put_file
from airflow_provider_doc2x.settings import Doc2XSettings

T = TypeVar("T")

#: Longest wait for a PDF's final status by default: the service's own cap is 15 minutes of parsing
#: (``parse_timeout``); the rest is for its queue and pickup.
DEFAULT_PDF_WAIT = 30 * 60.0
#: Longest wait for an export's url by default.
DEFAULT_EXPORT_WAIT = 300.0
#: Seconds a url that took a PDF is remembered (its lifetime, and a margin).
_USED_URL_MEMORY = 2 * protocol.PRESIGNED_URL_LIFETIME

BeforePut = Callable[[protocol.Doc2XPreupload], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class PdfSubmission:
    """A PDF Doc2X took: its uid, file, pages, images, and when its PUT was answered (wall clock, JSON-able)."""

    uid: str
    source: str
    pages: int
    sources: tuple[str, ...]
    uploaded_at: float

    def to_dict(self) -> dict[str, Any]:
        """The submission as JSON (for trigger kwargs and the task state store)."""
        return {**dataclasses.asdict(self), "sources": list(self.sources)}


class _UsedUrls:
    """Presigned urls that took a PDF in this process, remembered by digest until they have long expired."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}

    @staticmethod
    def _key(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()

    def add(self, url: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._until = {key: until for key, until in self._until.items() if until > now}
            self._until[self._key(url)] = now + _USED_URL_MEMORY

    def seen(self, url: str) -> bool:
        with self._lock:
            return self._until.get(self._key(url), 0.0) > time.monotonic()


_used_urls = _UsedUrls()
#: Set while the current task holds a PDF slot (:meth:`PdfCalls.apdf_slot`).
_holding_pdf_slot: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "doc2x_holding_pdf_slot", default=False
)


class PdfCalls:
    """The PDF API's calls for one connection (see the module's doc for the bound on PUTs).

    :param settings: returns the connection's settings, read without blocking the loop (the
        hook's ``aget_settings``).
    :param log: where progress and retries are told (the hook's logger).
    """

    def __init__(self, settings: Callable[[], Awaitable[Doc2XSettings]], log: Any) -> None:
        """Keep how to read the connection, and where to log."""
        self._settings = settings
        self.log = log

    @staticmethod
    def pdf_budget(settings: Doc2XSettings) -> PdfBudget:
        """The key's PDFs and pages in flight in this process, on this event loop (see :class:`PdfBudget`)."""
        return pdf_budget_for(
            settings.base_url, settings.api_key, settings.pdf_max_in_flight, settings.pdf_max_pages_in_flight
        )

    @contextlib.asynccontextmanager
    async def apdf_slot(self, pages: int) -> AsyncIterator[None]:
        """Hold one of the key's PDF slots and ``pages`` of its pages in flight while the block runs.

        Wrap a PDF's submission and its wait for a final status in it, so that the PDFs and pages in
        progress stay within the connection's ``pdf_max_in_flight`` and ``pdf_max_pages_in_flight``
        (what pdfdeal bounds). :meth:`asubmit_pdf` called outside one holds a slot for the
        submission alone.
        """
        budget = self.pdf_budget(await self._settings())
        async with budget.hold(pages):
            token = _holding_pdf_slot.set(True)
            try:
                yield
            finally:
                _holding_pdf_slot.reset(token)

    async def apreupload(self, model: str | None = None) -> protocol.Doc2XPreupload:
        """Ask Doc2X for a uid and a presigned url to PUT one PDF to (``model``: ``"v2"`` or ``"v3-2026"``).

        Nothing is billed; a lost answer is asked again. 429 and the limit codes are retried after
        a back-off. The url lives five minutes and is a secret meanwhile: it is never logged whole.
        """
        settings = await self._settings()
        upload = await transport.call(
            settings, protocol.preupload_request(model), _read_preupload, log=self.log
        )
        self.log.info("Doc2X preupload: uid %s, PUT to %s", upload.uid, upload.redacted_url)
        return upload

    async def aput_pdf(
        self,
        url: str,
        path: str | os.PathLike,
        *,
        uid: str,
        sources: Sequence[str] = (),
        issued_at: float | None = None,
    ) -> None:
        """PUT a PDF to its presigned url (no key, streamed from disk); return once the store answered 200.

        A PUT that failed before its body was sent whole (or that the store answered 408, 429 or
        5xx) is sent again on the same url while the url is young (``issued_at``, the monotonic
        time of its preupload; now if not given): at most ``max_retries + 1`` PUTs. Otherwise the
        last :class:`Doc2XTransientError` is raised: ``presigned_url_refused`` (403: expired or
        refused) or ``upload_failed``; either way the PDF needs a new preupload.

        A PUT whose body was sent whole but whose answer was lost is never sent again:
        :class:`Doc2XSubmitUncertainError`, naming the PDF and its images (``sources``); the
        caller decides. A url that took a PDF is never used again (:class:`Doc2XInputError`).
        """
        upload = protocol.Doc2XPreupload(uid, url, time.monotonic() if issued_at is None else issued_at)
        puts = _PdfPuts(self, await self._settings(), path, sources=sources, upload=upload)
        await puts.run(puts.put)

    async def asubmit_pdf(
        self,
        path: str | os.PathLike,
        *,
        pages: int,
        sources: Sequence[str] = (),
        model: str | None = None,
        before_put: BeforePut | None = None,
        name: str | None = None,
    ) -> PdfSubmission:
        """Submit one PDF of ``pages`` pages: preupload, then PUT; preupload again when the url is refused or too old.

        At most ``max_retries + 1`` PUTs of the PDF in all, on however many urls, with back-off;
        past that the last error is raised, naming the PDF. Within :meth:`apdf_slot` it uses the
        held slot; outside, it holds one for the submission. A lost PUT answer raises
        :class:`Doc2XSubmitUncertainError` (its ``uid`` set) and nothing is sent again.
        ``before_put`` is awaited with each preupload before its PUT starts: where a caller records
        the uid, so that a PUT that lands and is never answered can still be found. ``name`` is how
        logs and errors name the PDF (its path by default; a document's source, not its private copy).
        """
        if not _holding_pdf_slot.get():
            async with self.apdf_slot(pages):
                return await self.asubmit_pdf(
                    path, pages=pages, sources=sources, model=model, before_put=before_put, name=name
                )
        settings = await self._settings()
        puts = _PdfPuts(
            self, settings, path, pages=pages, sources=sources, model=model, before_put=before_put, name=name
        )
        return await puts.run(puts.put)

    async def aget_pdf_status(self, uid: str, *, uploaded_at: float | None = None) -> protocol.Doc2XJobStatus:
        """A PDF job's status, and its pages once it succeeded (a ``failed`` status is a status, not an error).

        ``uploaded_at`` (wall-clock seconds of the PUT's 200, :attr:`PdfSubmission.uploaded_at`)
        covers the service's pickup delay: an unknown uid within ``PDF_PICKUP_GRACE_SECONDS`` of it
        is ``awaiting_pickup``, not an error. A failure shown as an envelope code is raised as its
        class; a limit code there refers to the task, so it is raised at once, not retried as a
        429 is.
        """
        settings = await self._settings()
        request = protocol.pdf_status_request(uid)
        try:
            return await transport.call(
                settings,
                request,
                lambda data: protocol.read_pdf_status(uid, data, secrets=settings.secrets),
                log=self.log,
                retry=_status_call_retryable,
            )
        except Doc2XJobNotFoundError:
            if uploaded_at is not None and time.time() - uploaded_at < protocol.PDF_PICKUP_GRACE_SECONDS:
                return protocol.Doc2XJobStatus(uid, protocol.STATUS_AWAITING_PICKUP, progress=0)
            raise

    async def await_pdf(
        self, submission: PdfSubmission, *, poll_interval: float = 2.0, timeout: float = DEFAULT_PDF_WAIT
    ) -> protocol.Doc2XJobStatus:
        """Poll a submitted PDF until its status is final; return it (``failed`` included).

        A failure shown as an envelope code is raised as its class. Past ``timeout`` seconds a
        :class:`Doc2XTransientError` names the uid: the job may still finish (and bill), so poll it
        again rather than submit it again.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = await self.aget_pdf_status(submission.uid, uploaded_at=submission.uploaded_at)
            if status.is_terminal:
                return status
            if time.monotonic() > deadline:
                raise Doc2XTransientError(
                    f"Doc2X is still parsing {submission.source} after {timeout:g}s ({status.status}, "
                    f"progress {status.progress}); poll uid {submission.uid} again rather than resubmit it",
                    uid=submission.uid,
                    source=submission.source,
                )
            await asyncio.sleep(poll_interval)

    async def aparse_pdf(
        self,
        path: str | os.PathLike,
        *,
        pages: int,
        sources: Sequence[str] = (),
        model: str | None = None,
        poll_interval: float = 2.0,
        timeout: float = DEFAULT_PDF_WAIT,
    ) -> protocol.Doc2XJobStatus:
        """Submit one PDF and wait for its pages, holding a PDF slot throughout; return the successful status.

        When Doc2X refuses the task for its limits (``parse_task_limit_exceeded``,
        ``parse_concurrency_limit``: page counts are known only after the upload, so these show in
        the status), the PDF is submitted again after a back-off, with a warning: whether a
        refused task is billed is not documented. Those submissions and the PUTs that failed share
        one bound: at most ``max_retries + 1`` PUTs of the PDF in all. Any other failure is raised
        as its class.
        """
        settings = await self._settings()
        async with self.apdf_slot(pages):
            puts = _PdfPuts(self, settings, path, pages=pages, sources=sources, model=model)

            async def submit_and_wait() -> protocol.Doc2XJobStatus:
                submission = await puts.put()
                try:
                    status = await self.await_pdf(submission, poll_interval=poll_interval, timeout=timeout)
                    if status.status == protocol.STATUS_SUCCESS:
                        return status
                    raise status.failure()
                except Doc2XRateLimitError as error:
                    if error.http_status != 429:
                        # Doc2X refused the task for its limits. A 429 is a status call's own
                        # throttling that outlasted its retries: the PDF may still be parsing, so
                        # it is never submitted again for that.
                        puts.refused(error, submission)
                    raise

            return await puts.run(submit_and_wait)

    async def aexport_markdown(
        self,
        uid: str,
        filename: str | None = None,
        *,
        poll_interval: float = 1.0,
        timeout: float = DEFAULT_EXPORT_WAIT,
    ) -> str:
        """Export a finished PDF parse as Markdown (``$`` formulas) and return the zip's presigned url.

        The export is started, then its result polled until it names an md zip (the result call
        shows the uid's latest export: an earlier export's url is not taken), within ``timeout``
        seconds. Download it with :meth:`adownload`. Export one uid's formats one after another.
        """
        settings = await self._settings()
        read = functools.partial(protocol.read_export, uid)
        export = await transport.call(
            settings, protocol.export_request(uid, filename=filename), read, log=self.log
        )
        deadline = time.monotonic() + timeout
        while not export.names("md"):
            if export.is_failed:
                raise export.failure()
            if time.monotonic() > deadline:
                raise Doc2XTransientError(
                    f"Doc2X's Markdown export of uid {uid} was not ready within {timeout:g}s", uid=uid
                )
            await asyncio.sleep(poll_interval)
            export = await transport.call(settings, protocol.export_result_request(uid), read, log=self.log)
        assert export.url is not None
        self.log.info("Doc2X exported uid %s to %s", uid, protocol.redact_url(export.url))
        return export.url

    async def adownload(self, url: str, cap: int | None = None) -> bytes:
        """Download a file the PDF API points to (an export zip, a page image), at most ``cap`` bytes.

        Only https urls on the vendor's storage and CDN hosts, or on the connection's own host, are
        fetched, with no key (:func:`~airflow_provider_doc2x.protocol.check_download_url`). ``cap``
        defaults to the connection's ``max_answer_bytes``.
        """
        settings = await self._settings()
        return await transport.download(settings, url, cap=cap or settings.max_answer_bytes, log=self.log)


class _PdfPuts:
    """The PUTs of one PDF, on as many urls as it takes, at most ``max_retries + 1`` in all.

    :meth:`run` runs a step (one :meth:`put`, and for :meth:`PdfCalls.aparse_pdf` the wait that
    follows it) under one ``tenacity.AsyncRetrying``; a step's failure is retried only when
    :meth:`put` or :meth:`refused` marked it so. Without a url in hand (at first, after the store
    refused one, after one grew too old, after one took the PDF) a step preuploads first. Given a
    url (:meth:`PdfCalls.aput_pdf`), the PUTs stay on it.
    """

    def __init__(
        self,
        calls: PdfCalls,
        settings: Doc2XSettings,
        path: str | os.PathLike,
        *,
        pages: int = 0,
        sources: Sequence[str] = (),
        model: str | None = None,
        before_put: BeforePut | None = None,
        upload: protocol.Doc2XPreupload | None = None,
        name: str | None = None,
    ) -> None:
        self.calls, self.settings, self.path, self.pages = calls, settings, path, pages
        self.name, self.sources, self.model, self.before_put = (
            name or str(path),
            tuple(sources),
            model,
            before_put,
        )
        self.new_urls = upload is None  # a url given by the caller is the only one to use
        self.upload = upload  # the url the next PUT goes to; None: preupload first
        self.last: protocol.Doc2XPreupload | None = None  # the url of the last PUT
        self._retryable: BaseException | None = None
        self._refused: PdfSubmission | None = None

    async def run(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until it succeeds, or fails in a way not marked for a retry, or the PUTs ran out."""
        options = transport.retry_options(self.settings, retry=self._may_retry, on_retry=self._tell_retry)
        async for attempt in tenacity.AsyncRetrying(**options):
            with attempt:
                return await step()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def put(self) -> PdfSubmission:
        """PUT the PDF once (after a preupload, without a url in hand); its submission once the store took it."""
        self._retryable = self._refused = None
        if self.upload is None:
            self.upload = await self.calls.apreupload(self.model)
            if self.before_put is not None:
                await self.before_put(self.upload)
        self.last = upload = self.upload
        try:
            await _put_once(
                self.settings, upload, self.path, self.sources, log=self.calls.log, name=self.name
            )
        except Doc2XTransientError as error:
            if error.code == "presigned_url_refused" or not upload.is_young(time.monotonic()):
                if not self.new_urls:
                    raise
                self.upload = None
            self._retryable = error
            raise
        self.upload = None  # the url took the PDF: another PUT of it needs another preupload
        return PdfSubmission(upload.uid, self.name, self.pages, self.sources, uploaded_at=time.time())

    def refused(self, error: Doc2XRateLimitError, submission: PdfSubmission) -> None:
        """Mark Doc2X's refusal of the task for its limits: the PDF is submitted again as a new task."""
        self._retryable, self._refused = error, submission

    def _may_retry(self, error: BaseException) -> bool:
        return error is self._retryable

    def _tell_retry(self, error: BaseException | None, pause: float, next_try: int) -> None:
        said = error.message if isinstance(error, Doc2XError) else str(error)
        tries = self.settings.max_retries + 1
        if self._refused is not None:
            self.calls.log.warning(
                "Doc2X refused uid %s (%s) for its limits (%s); submitting it again in %.1fs as a new "
                "task, PUT %d of %d (whether a refused task is billed is not documented)",
                self._refused.uid,
                self._refused.source,
                getattr(error, "code", None),
                pause,
                next_try,
                tries,
            )
        elif self.upload is not None:
            self.calls.log.warning(
                "PUT of %s to %s failed (%s); sending it again on the same url in %.1fs (try %d of %d)",
                self.name,
                self.upload.redacted_url,
                said,
                pause,
                next_try,
                tries,
            )
        else:
            self.calls.log.warning(
                "The upload of %s as uid %s failed (%s); preuploading it again in %.1fs (try %d of %d)",
                self.name,
                self.last.uid if self.last else None,
                said,
                pause,
                next_try,
                tries,
            )


def _read_preupload(data: dict[str, Any]) -> protocol.Doc2XPreupload:
    """A preupload's answer, with the monotonic time it arrived (from which the url's age counts)."""
    return protocol.read_preupload(data, issued_at=time.monotonic())


def _status_call_retryable(error: BaseException) -> bool:
    """A status call's retry rule: a limit code in its answer (not a 429) is the task's refusal, not the call's."""
    if isinstance(error, Doc2XRateLimitError) and error.http_status != 429:
        return False
    return protocol.is_retryable(error)


async def _put_once(
    settings: Doc2XSettings,
    upload: protocol.Doc2XPreupload,
    path: str | os.PathLike,
    sources: tuple[str, ...],
    *,
    log: Any,
    name: str | None = None,
) -> None:
    """One PUT of a PDF to its url (:func:`~airflow_provider_doc2x.pdf.presigned.put_file`), judged.

    A url that took a PDF, or may have, is remembered and never used again. ``name`` names the PDF
    in logs and errors (its path by default).
    """
    name, url = name or str(path), upload.url
    if _used_urls.seen(url):
        raise Doc2XInputError(
            f"The presigned url {upload.redacted_url} already took a PDF: preupload again for {name}",
            code="presigned_url_used",
            uid=upload.uid,
            source=name,
        )
    try:
        answer = await put_file(settings, url, path, uid=upload.uid, source=name, sources=sources)
        protocol.read_put_answer(answer, url=url, uid=upload.uid, source=name)
    except Doc2XSubmitUncertainError:
        _used_urls.add(url)  # the store may hold the PDF: the url is spent either way
        raise
    _used_urls.add(url)
    log.info("Uploaded %s (%d sources) to Doc2X as uid %s", name, len(sources), upload.uid)
