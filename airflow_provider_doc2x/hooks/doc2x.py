"""The Doc2X hook: a ``doc2x`` connection and the API's calls, for workers and triggers.

Requests are built and answers read by :mod:`airflow_provider_doc2x.protocol`; bytes are moved by
:mod:`airflow_provider_doc2x.transport` (deadlines, size caps, retries), uploads are paced by
:mod:`airflow_provider_doc2x.pacing`, and what the connection holds is declared in
:mod:`airflow_provider_doc2x.settings`. This module ties them together per call. The API key
lives in the connection's password and leaves the hook only as the ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import cached_property
from typing import Any

import tenacity
from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.providers.common.compat.sdk import BaseHook, mask_secret

from airflow_provider_doc2x import protocol, transport
from airflow_provider_doc2x import settings as connection_settings
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XInputError,
    Doc2XJobNotFoundError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.pacing import limiter_for
from airflow_provider_doc2x.settings import Doc2XSettings
from airflow_provider_doc2x.storage.sources import ImageSource

ImageInput = bytes | str | os.PathLike

#: Seconds the hooks of one event loop share a connection lookup.
ASYNC_SETTINGS_TTL = 60.0
#: Longest wait for a PDF's final status by default: the service's own cap is 15 minutes of parsing
#: (``parse_timeout``); the rest is for its queue and pickup.
DEFAULT_PDF_WAIT = 30 * 60.0
#: Longest wait for an export's url by default.
DEFAULT_EXPORT_WAIT = 300.0
#: The uid the connection test asks about: Doc2X answers "not found" to a good key, and bills nothing.
CONNECTION_TEST_UID = "airflow-connection-test"

_async_settings: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, tuple[float, asyncio.Future[Doc2XSettings]]]
] = weakref.WeakKeyDictionary()


def read_image(image: ImageInput, *, source: str | None = None) -> tuple[bytes, str]:
    """Load and check an image given as bytes, a local path or a storage URI; return bytes and name."""
    if isinstance(image, bytes):
        name = source or "<bytes>"
        protocol.check_image(image, source=name)
        return image, name
    image_source = ImageSource.of(image)
    return image_source.read(), source or image_source.uri


class Doc2XHook(BaseHook):
    """Talk to Doc2X's image API with the key and URL of a ``doc2x`` connection.

    Synchronous methods are for workers; the ``a``-prefixed ones are for event loops (triggers,
    and a worker's batch of concurrent uploads). Both go through the same transport.

    :param doc2x_conn_id: the connection: API key in the password, base URL in the host (default
        ``https://v2.doc2x.noedgeai.com``); timeouts, retries and pacing in the extra.
    """

    conn_name_attr = "doc2x_conn_id"
    default_conn_name = "doc2x_default"
    conn_type = "doc2x"
    hook_name = "Doc2X"

    def __init__(self, doc2x_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        """Keep the connection's id; the connection is read when first needed."""
        super().__init__(**kwargs)
        self.doc2x_conn_id = doc2x_conn_id
        self._async_settings: Doc2XSettings | None = None

    # -- the connection form (Airflow 2.11; Airflow 3 reads the same from the provider info) ----

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """How Airflow 2.11's form shows the standard fields (hidden, relabelled, placeholders)."""
        behaviour = connection_settings.UI_FIELD_BEHAVIOUR
        return {
            "hidden_fields": behaviour["hidden-fields"],
            "relabeling": behaviour["relabeling"],
            "placeholders": behaviour["placeholders"],
        }

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The extra fields as Airflow 2.11's form widgets, from the one declaration in settings."""
        return connection_settings.connection_form_widgets()

    # -- settings ----------------------------------------------------------------------------

    @cached_property
    def settings(self) -> Doc2XSettings:
        """The connection, fetched once, the synchronous way (workers only); its key is masked in logs."""
        conn = self.get_connection(self.doc2x_conn_id)
        settings = Doc2XSettings.from_connection(conn, conn.extra_dejson)
        mask_secret(settings.api_key)  # a pasted "Bearer sk-..." password is masked whole, not the key alone
        return settings

    def get_conn(self) -> Doc2XSettings:
        """The connection's settings, read and checked once.

        There is no client to hand out: HTTP clients are shared by everything on an event loop
        (see :mod:`airflow_provider_doc2x.transport`).
        """
        return self.settings

    async def aget_settings(self) -> Doc2XSettings:
        """The connection, fetched without blocking the event loop (triggers).

        Hooks on one event loop share one lookup per connection for ``ASYNC_SETTINGS_TTL`` seconds:
        a triggerer that starts a thousand Doc2X triggers fetches the connection once, not a
        thousand times in one tick of the loop. A rotated key is picked up after the TTL. A hook
        whose settings were already read the synchronous way (a worker) uses those.
        """
        if "settings" in self.__dict__:
            return self.settings
        if self._async_settings is None:
            lookups = _async_settings.setdefault(asyncio.get_running_loop(), {})
            cached = lookups.get(self.doc2x_conn_id)
            if cached is None or cached[0] < time.monotonic() or (cached[1].done() and cached[1].exception()):
                cached = (
                    time.monotonic() + ASYNC_SETTINGS_TTL,
                    asyncio.ensure_future(self._fetch_settings()),
                )
                lookups[self.doc2x_conn_id] = cached
            self._async_settings = await asyncio.shield(cached[1])
        return self._async_settings

    async def _fetch_settings(self) -> Doc2XSettings:
        conn = await get_async_connection(self.doc2x_conn_id, hook=self)
        extra = await get_async_extra_dejson(conn)
        settings = Doc2XSettings.from_connection(conn, extra)
        # Registering a secret talks to Airflow's supervisor synchronously: never on the loop's thread.
        await asyncio.to_thread(mask_secret, settings.api_key)
        return settings

    def close(self) -> None:
        """Nothing to close: the HTTP clients are shared per event loop and closed with it."""

    async def aclose(self) -> None:
        """Nothing to close: the loop's shared client stays open for the other hooks on it."""

    # -- calls ---------------------------------------------------------------------------------

    async def _acall(
        self,
        request: protocol.Doc2XRequest,
        read: Any,
        settings: Doc2XSettings | None = None,
        *,
        pacer: Any = None,
    ) -> Any:
        settings = settings or await self.aget_settings()
        if request.bills and pacer is None:
            pacer = self.pacer(settings)
        return await transport.call(
            settings, request, read, log=self.log, pacer=pacer if request.bills else None
        )

    @staticmethod
    def pacer(settings: Doc2XSettings) -> Any:
        """The key's upload window: on this host, or in Redis with the connection's ``pacing_conn_id``."""
        return limiter_for(
            settings.base_url,
            settings.api_key,
            settings.rate_limit_images,
            settings.rate_limit_window,
            pacing_conn_id=settings.pacing_conn_id,
            upload_timeout=settings.timeout,
        )

    def _call(self, request: protocol.Doc2XRequest, read: Any) -> Any:
        settings = self.settings  # looked up here, in the caller's thread (Airflow's lookups are synchronous)
        return transport.run_sync(self._acall(request, read, settings))

    # -- the API -------------------------------------------------------------------------------

    def parse_image(self, image: ImageInput, *, source: str | None = None) -> protocol.Doc2XResult:
        """Parse one image with the synchronous endpoint (one page of quota); wait for the result."""
        data, name = read_image(image, source=source)
        return self._call(protocol.parse_request(data, source=name), protocol.read_result)

    async def aparse_image(
        self, image: bytes, *, source: str | None = None, pacer: Any = None
    ) -> protocol.Doc2XResult:
        """:meth:`parse_image` for an event loop; takes bytes so that no file is read on the loop.

        ``pacer`` replaces the key's window around the upload (see :meth:`pacer`); the operator's
        batch wraps the window to stop queued uploads and record each start.
        """
        data, name = read_image(image, source=source)
        return await self._acall(protocol.parse_request(data, source=name), protocol.read_result, pacer=pacer)

    def submit_image(self, image: ImageInput, *, source: str | None = None) -> str:
        """Submit one image to the asynchronous endpoint (one page of quota); return its uid."""
        data, name = read_image(image, source=source)
        request = protocol.submit_request(data, source=name)
        uid = self._call(request, lambda answer: protocol.read_uid(request, answer))
        self.log.info("Submitted %s to Doc2X as uid %s", name, uid)
        return uid

    async def asubmit_image(self, image: bytes, *, source: str | None = None, pacer: Any = None) -> str:
        """:meth:`submit_image` for an event loop (bytes: no file is read on the loop); ``pacer`` as in :meth:`aparse_image`."""
        data, name = read_image(image, source=source)
        request = protocol.submit_request(data, source=name)
        return await self._acall(request, lambda answer: protocol.read_uid(request, answer), pacer=pacer)

    def get_job_status(self, uid: str) -> protocol.Doc2XJobStatus:
        """The job's status, and its result once it succeeded (a failed job is a status, not an error)."""
        return self._call(protocol.status_request(uid), self._status_reader(uid, self.settings))

    async def aget_job_status(self, uid: str) -> protocol.Doc2XJobStatus:
        """The job's status, for event loops: async connection lookup, async HTTP, nothing blocking."""
        settings = await self.aget_settings()
        return await self._acall(protocol.status_request(uid), self._status_reader(uid, settings), settings)

    @staticmethod
    def _status_reader(uid: str, settings: Doc2XSettings) -> Any:
        return lambda data: protocol.read_status(uid, data, secrets=settings.secrets)

    def test_connection(self) -> tuple[bool, str]:
        """Check the URL and the key without billing: ask for the status of a job that does not exist.

        It answers within seconds (one try, short timeouts), and in words a user can act on.
        """
        try:
            settings = self.settings
        except Doc2XError as error:
            return False, error.message
        probe = dataclasses.replace(
            settings,
            max_retries=0,
            timeout=min(settings.timeout, 10.0),
            connect_timeout=min(settings.connect_timeout, 5.0),
        )
        request = protocol.status_request(CONNECTION_TEST_UID)
        try:
            transport.run_sync(self._acall(request, lambda data: data, probe))
        except Doc2XJobNotFoundError:
            pass  # the expected answer: the key was accepted
        except Doc2XAuthError as error:
            return False, (
                f"Doc2X refused the API key (HTTP {error.http_status} from {settings.base_url}): "
                "check the connection's password"
            )
        except Doc2XTransientError as error:
            return False, f"Could not reach Doc2X at {settings.base_url}: {error.message}"
        except Doc2XError as error:
            status = f" (HTTP {error.http_status})" if error.http_status else ""
            return False, f"Doc2X at {settings.base_url} answered unexpectedly{status}: {error.message}"
        return True, f"Doc2X at {settings.base_url} accepted the API key"

    # -- the PDF API (the bulk lane) --------------------------------------------------------------

    def pdf_budget(self, settings: Doc2XSettings) -> PdfBudget:
        """The key's PDFs and pages in flight in this process, on this event loop (see :class:`PdfBudget`)."""
        budgets = _pdf_budgets.setdefault(asyncio.get_running_loop(), {})
        key = (
            settings.base_url,
            settings.api_key,
            settings.pdf_max_in_flight,
            settings.pdf_max_pages_in_flight,
        )
        budget = budgets.get(key)
        if budget is None:
            budget = budgets[key] = PdfBudget(settings.pdf_max_in_flight, settings.pdf_max_pages_in_flight)
        return budget

    @contextlib.asynccontextmanager
    async def apdf_slot(self, pages: int) -> AsyncIterator[None]:
        """Hold one of the key's PDF slots and ``pages`` of its pages in flight while the block runs.

        Wrap a PDF's submission and its wait for a final status in it, so that the PDFs and pages in
        progress stay within the connection's ``pdf_max_in_flight`` and ``pdf_max_pages_in_flight``
        (what pdfdeal bounds). :meth:`asubmit_pdf` called outside one holds a slot for the
        submission alone.
        """
        budget = self.pdf_budget(await self.aget_settings())
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
        request = protocol.preupload_request(model)
        upload = await self._acall(
            request, lambda data: protocol.read_preupload(data, issued_at=time.monotonic())
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
        time of its preupload; now if not given), within the connection's retries. Otherwise the
        last :class:`Doc2XTransientError` is raised: ``presigned_url_refused`` (403: expired or
        refused) or ``upload_failed``; either way the PDF needs a new preupload.

        A PUT whose body was sent whole but whose answer was lost is never sent again:
        :class:`Doc2XSubmitUncertainError`, naming the PDF and its images (``sources``); the
        caller decides. A url that took a PDF is never used again (:class:`Doc2XInputError`).
        """
        settings = await self.aget_settings()
        issued_at = time.monotonic() if issued_at is None else issued_at
        name, images = str(path), tuple(sources)
        redacted = protocol.redact_url(url)
        if _used_urls.seen(url):
            raise Doc2XInputError(
                f"The presigned url {redacted} already took a PDF: preupload again for {name}",
                code="presigned_url_used",
                uid=uid,
                source=name,
            )
        wait = transport.Backoff(settings.retry_wait, settings.retry_wait_max)
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await transport.put_file(settings, url, path, uid=uid, source=name, sources=images)
                protocol.read_put_answer(answer, url=url, uid=uid, source=name)
                _used_urls.add(url)
                self.log.info("Uploaded %s (%d images) to Doc2X as uid %s", name, len(images), uid)
                return
            except Doc2XSubmitUncertainError:
                _used_urls.add(url)  # the store may hold the PDF: the url is spent either way
                raise
            except Doc2XTransientError as error:
                young = protocol.Doc2XPreupload(uid, url, issued_at).is_young(time.monotonic())
                if error.code == "presigned_url_refused" or not young or attempt > settings.max_retries:
                    raise
                pause = _backoff_wait(wait, attempt, error)
                self.log.warning(
                    "PUT of %s to %s failed (%s); sending it again on the same url in %.1fs (try %d of %d)",
                    name,
                    redacted,
                    error.message,
                    pause,
                    attempt + 1,
                    settings.max_retries + 1,
                )
                await asyncio.sleep(pause)

    async def asubmit_pdf(
        self,
        path: str | os.PathLike,
        *,
        pages: int,
        sources: Sequence[str] = (),
        model: str | None = None,
        before_put: Callable[[protocol.Doc2XPreupload], Awaitable[None]] | None = None,
    ) -> PdfSubmission:
        """Submit one PDF of ``pages`` pages: preupload, then PUT; preupload again when the url is refused or too old.

        Bounded by the connection's retries with back-off. Within :meth:`apdf_slot` it uses the held
        slot; outside, it holds one for the submission. A lost PUT answer raises
        :class:`Doc2XSubmitUncertainError` (its ``uid`` set) and nothing is sent again.
        ``before_put`` is awaited with each preupload before its PUT starts: where a caller records
        the uid, so that a PUT that lands and is never answered can still be found.
        """
        settings = await self.aget_settings()
        if not _holding_pdf_slot.get():
            async with self.apdf_slot(pages):
                return await self.asubmit_pdf(
                    path, pages=pages, sources=sources, model=model, before_put=before_put
                )
        wait = transport.Backoff(settings.retry_wait, settings.retry_wait_max)
        attempt = 0
        while True:
            attempt += 1
            upload = await self.apreupload(model)
            if before_put is not None:
                await before_put(upload)
            try:
                await self.aput_pdf(
                    upload.url, path, uid=upload.uid, sources=sources, issued_at=upload.issued_at
                )
            except Doc2XTransientError as error:
                if attempt > settings.max_retries:
                    raise
                pause = _backoff_wait(wait, attempt, error)
                self.log.warning(
                    "The upload of %s as uid %s failed (%s); preuploading it again in %.1fs",
                    path,
                    upload.uid,
                    error.message,
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            return PdfSubmission(upload.uid, str(path), pages, tuple(sources), uploaded_at=time.time())

    async def aget_pdf_status(self, uid: str, *, uploaded_at: float | None = None) -> protocol.Doc2XJobStatus:
        """A PDF job's status, and its pages once it succeeded (a ``failed`` status is a status, not an error).

        ``uploaded_at`` (wall-clock seconds of the PUT's 200, :attr:`PdfSubmission.uploaded_at`)
        covers the service's pickup delay: an unknown uid within ``PDF_PICKUP_GRACE_SECONDS`` of it
        is ``awaiting_pickup``, not an error. A failure shown as an envelope code is raised as its
        class; a limit code there refers to the task, so it is raised at once, not retried as a
        429 is.
        """
        settings = await self.aget_settings()
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

    def get_pdf_status(self, uid: str, *, uploaded_at: float | None = None) -> protocol.Doc2XJobStatus:
        """:meth:`aget_pdf_status` for a worker's synchronous code."""
        self.settings  # noqa: B018 - the connection is looked up here, in the caller's thread
        return transport.run_sync(self.aget_pdf_status(uid, uploaded_at=uploaded_at))

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
        the status), the PDF is submitted again after a back-off, within the connection's retries,
        with a warning: whether a refused task is billed is not documented. Any other failure is
        raised as its class.
        """
        settings = await self.aget_settings()
        wait = transport.Backoff(settings.retry_wait, settings.retry_wait_max)
        attempt = 0
        async with self.apdf_slot(pages):
            while True:
                attempt += 1
                submission = await self.asubmit_pdf(path, pages=pages, sources=sources, model=model)
                try:
                    status = await self.await_pdf(submission, poll_interval=poll_interval, timeout=timeout)
                    if status.status == protocol.STATUS_SUCCESS:
                        return status
                    raise status.failure()
                except Doc2XRateLimitError as error:
                    if attempt > settings.max_retries:
                        raise
                    pause = _backoff_wait(wait, attempt, error)
                    self.log.warning(
                        "Doc2X refused uid %s (%s) for its limits (%s); submitting it again in %.1fs as a new "
                        "task (whether a refused task is billed is not documented)",
                        submission.uid,
                        submission.source,
                        error.code,
                        pause,
                    )
                    await asyncio.sleep(pause)

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
        read = functools.partial(protocol.read_export, uid)
        export = await self._acall(protocol.export_request(uid, filename=filename), read)
        deadline = time.monotonic() + timeout
        while not export.names("md"):
            if export.is_failed:
                raise export.failure()
            if time.monotonic() > deadline:
                raise Doc2XTransientError(
                    f"Doc2X's Markdown export of uid {uid} was not ready within {timeout:g}s", uid=uid
                )
            await asyncio.sleep(poll_interval)
            export = await self._acall(protocol.export_result_request(uid), read)
        assert export.url is not None
        self.log.info("Doc2X exported uid %s to %s", uid, protocol.redact_url(export.url))
        return export.url

    async def adownload(self, url: str, cap: int | None = None) -> bytes:
        """Download a file the PDF API points to (an export zip, a page image), at most ``cap`` bytes.

        Only https urls on the vendor's storage and CDN hosts, or on the connection's own host, are
        fetched, with no key (:func:`~airflow_provider_doc2x.protocol.check_download_url`). ``cap``
        defaults to the connection's ``max_answer_bytes``.
        """
        settings = await self.aget_settings()
        return await transport.download(settings, url, cap=cap or settings.max_answer_bytes, log=self.log)


#: Seconds a url that took a PDF is remembered (its lifetime, and a margin).
_USED_URL_MEMORY = 2 * protocol.PRESIGNED_URL_LIFETIME


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


class PdfBudget:
    """PDFs and pages in flight for one key, in one process and event loop.

    At most ``max_files`` PDFs and ``max_pages`` pages held at once, first come first served (a
    big PDF at the head of the line is not overtaken). A PDF larger than ``max_pages`` alone is
    refused, as pdfdeal skips it.
    """

    def __init__(self, max_files: int, max_pages: int) -> None:
        """Start with nothing held (limits below 1 count as 1)."""
        self.max_files = max(1, max_files)
        self.max_pages = max(1, max_pages)
        self.files = 0
        self.pages = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _room(self, pages: int) -> bool:
        return self.files < self.max_files and self.pages + pages <= self.max_pages

    @contextlib.asynccontextmanager
    async def hold(self, pages: int) -> AsyncIterator[None]:
        """Wait for a PDF slot and ``pages`` pages; give them back when the block ends."""
        if not 0 < pages <= self.max_pages:
            raise Doc2XInputError(
                f"A PDF of {pages} pages cannot be submitted: the connection's pdf_max_pages_in_flight "
                f"is {self.max_pages}; pack it into smaller PDFs",
                code="parse_page_limit_exceeded",
            )
        if not self._waiting and self._room(pages):
            self._take(pages)
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append((pages, turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed the slot, then cancelled: give it back
                    self._give_back(pages)
                raise
        try:
            yield
        finally:
            self._give_back(pages)

    def _take(self, pages: int) -> None:
        self.files += 1
        self.pages += pages

    def _give_back(self, pages: int) -> None:
        self.files -= 1
        self.pages -= pages
        while self._waiting:
            pages_wanted, turn = self._waiting[0]
            if turn.done():
                self._waiting.popleft()
                continue
            if not self._room(pages_wanted):
                break
            self._waiting.popleft()
            self._take(pages_wanted)
            turn.set_result(None)


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
_pdf_budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], PdfBudget]] = (
    weakref.WeakKeyDictionary()
)
#: Set while the current task holds a PDF slot (:meth:`Doc2XHook.apdf_slot`).
_holding_pdf_slot: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "doc2x_holding_pdf_slot", default=False
)


def _status_call_retryable(error: BaseException) -> bool:
    """A status call's retry rule: a limit code in its answer (not a 429) is the task's refusal, not the call's."""
    if isinstance(error, Doc2XRateLimitError) and error.http_status != 429:
        return False
    return protocol.is_retryable(error)


def _backoff_wait(backoff: transport.Backoff, attempt: int, error: BaseException) -> float:
    """The back-off before try ``attempt + 1`` after ``error`` (Retry-After as a floor), outside tenacity."""
    state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return backoff(state)
