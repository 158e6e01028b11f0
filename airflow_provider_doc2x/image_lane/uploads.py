"""The worker's side of the image lane: every image of a task uploaded once, several side by side.

A slow or far-away link makes each upload take seconds; one upload after another would then cap a
task at one image per upload time, whatever the key's window allows. So a task keeps up to
``max_concurrent_uploads`` uploads in flight, each holding one of the key's slots (an upload in
flight holds its slot; a slot counts from the answer: :mod:`airflow_provider_doc2x.pacing`).

Everything else stays as safe as one upload at a time:

- **One billing per image.** The same content listed twice shares one upload; a content with a
  complete result under ``output_path`` is not uploaded; a uid recorded by an earlier try of the
  task (task state store) is reconnected to instead.
- **Recorded before the task waits.** Each upload is marked as started in the task state store
  before a byte leaves (the starts of uploads sent together in one write), and its uid recorded
  soon after it is answered (the uids that came back within 0.1 s in one write), in whatever
  order uploads finish; all are written before the task defers
  (:class:`~airflow_provider_doc2x.journal.TaskJournal`). A next try that finds a start without a
  uid (the worker was killed mid-upload, or within 0.1 s of the answer) or an upload whose answer
  was lost submits the image again and says in the log that it is possibly billed twice; nothing
  is ever resent silently.
- **Memory bounded by the concurrency.** An image is read (and hashed) when its turn comes, so at
  most ``max_concurrent_uploads`` image bodies are in memory at once. (Every image was checked
  from its first bytes before the first upload.)
- **A refused key or an empty quota stops the batch.** Uploads still queued do not start; those
  in flight end cleanly (their uids recorded); then the error is raised.
- **Input order.** Jobs and records come back in the order of the input, whatever the order in
  which uploads finish; progress is logged as images complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import failed_job, job
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XBudgetUnavailableError,
    Doc2XError,
    Doc2XJobFailedError,
    Doc2XJobNotFoundError,
    Doc2XProtocolError,
    Doc2XQuotaError,
    Doc2XSubmitUncertainError,
    Doc2XTaskStateError,
)
from airflow_provider_doc2x.journal import TaskJournal
from airflow_provider_doc2x.progress import Progress
from airflow_provider_doc2x.records import FETCH_ATTEMPTS, recorded_status, store_or_record
from airflow_provider_doc2x.spending import Spending
from airflow_provider_doc2x.storage.sources import ImageSource

if TYPE_CHECKING:
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.storage.results import ResultStore


class BatchStopped(Exception):
    """The batch stopped (the key was refused, or the quota ran out) before this upload started."""


@dataclass
class _GuardedWindow:
    """The key's window for one upload: nothing starts once the batch stopped; a start is recorded first."""

    window: Any
    stop: asyncio.Event
    before_send: Callable[[bool], Awaitable[None]]

    @asynccontextmanager
    async def aupload(self):
        """Hold one of the key's slots, then record the start, then let the upload go.

        A start is gathered with others unless its upload waited for room in the window: uploads
        paced by the key leave one by one, and waiting for others would only delay the send.
        """
        async with self.window.aupload() as slot:
            if self.stop.is_set():
                raise BatchStopped
            await self.before_send(not getattr(slot, "waited", False))
            yield


class ImageUploads:
    """One task's images through Doc2X's image API, as jobs (asynchronous endpoint) or records (synchronous).

    :param hook: the hook, its connection already read (``hook.settings``) in the worker's thread.
    :param journal: the task's journal in the task state store (what earlier tries uploaded).
    :param results: where results go (``output_path``), or None (XCom); with its ``overwrite``,
        nothing stored is reused.
    :param log: the task's logger.
    :param max_concurrent: uploads in flight at once; None takes the connection's
        ``max_concurrent_uploads``.
    :param spending: the task's pages, booked before each upload (its budgets); None books nothing.
    """

    def __init__(
        self,
        hook: Doc2XHook,
        *,
        journal: TaskJournal,
        results: ResultStore | None,
        log: Any,
        max_concurrent: int | None = None,
        spending: Spending | None = None,
    ) -> None:
        self.hook = hook
        self.spending = spending or Spending()
        self.settings = hook.settings
        self.journal = journal
        self.results = results
        self.log = log
        self.max_concurrent = max(1, max_concurrent or self.settings.max_concurrent_uploads)
        # The starts of the uploads that go side by side are written together.
        journal.images.start_group = max(journal.images.start_group, self.max_concurrent)

    @classmethod
    def for_task(
        cls,
        hook: Doc2XHook,
        context: Mapping[str, Any],
        *,
        results: ResultStore | None,
        log: Any,
        max_concurrent: int | None,
        spending: Spending | None = None,
    ) -> ImageUploads:
        """The image lane of a running task: its journal in the task's state store (none before Airflow 3.3)."""
        store = context.get("task_state_store")
        if store is None:
            log.info("No task state store (Airflow < 3.3): a new try of this task submits its images again")
        ti = context.get("ti")
        return cls(
            hook,
            # A first try finds nothing recorded: one state-store read per image is saved.
            journal=TaskJournal(store, may_hold=getattr(ti, "try_number", None) != 1),
            results=results,
            log=log,
            max_concurrent=max_concurrent,
            spending=spending,
        )

    def submit(self, sources: Sequence[ImageSource]) -> list[dict[str, Any]]:
        """Each image as a job of the asynchronous endpoint: reused, reconnected or submitted."""
        return self._timed(sources, self._submitted, "submitted")

    def parse(self, sources: Sequence[ImageSource]) -> list[dict[str, Any]]:
        """Each image through the synchronous endpoint (each request also waits for the parse).

        Returns one item per image, in input order: its record, or its failed job.
        """
        return self._timed(sources, self._parsed, "parsed")

    def _timed(
        self,
        sources: Sequence[ImageSource],
        outcome: Callable[[ImageSource, bytes, str, asyncio.Event], Awaitable[dict[str, Any]]],
        verb: str,
    ) -> list[dict[str, Any]]:
        """Run the batch in the journal's thread, and say in the log how long it and its writes took."""
        began, writes, write_seconds = time.monotonic(), self.journal.writes, self.journal.write_seconds
        outcomes = self.journal.run(self._run(sources, outcome, verb))
        self.log.info(
            "Doc2X: %d images %s in %.3f s (task state store: %d writes, %.3f s)",
            len(sources),
            verb,
            time.monotonic() - began,
            self.journal.writes - writes,
            self.journal.write_seconds - write_seconds,
        )
        return outcomes

    async def _run(
        self,
        sources: Sequence[ImageSource],
        outcome: Callable[[ImageSource, bytes, str, asyncio.Event], Awaitable[dict[str, Any]]],
        verb: str,
    ) -> list[dict[str, Any]]:
        stop = asyncio.Event()
        turns = asyncio.Semaphore(self.max_concurrent)
        owners: dict[str, asyncio.Future[dict[str, Any]]] = {}
        settings = self.settings
        progress = Progress(
            self.log,
            len(sources),
            verb,
            # A window that is not positive is refused, named, by the pacing: no pace to give here.
            per_second=settings.rate_limit_images / settings.rate_limit_window
            if settings.rate_limit_window > 0
            else None,
            pace=f"{settings.rate_limit_images} images per {settings.rate_limit_window:g} s",
        )

        async def one(source: ImageSource) -> dict[str, Any]:
            try:
                return await image(source)
            except BaseException:
                stop.set()  # whatever stops one image for good (not its own Doc2X error) stops the batch
                raise

        async def image(source: ImageSource) -> dict[str, Any]:
            async with turns:
                if stop.is_set():
                    raise BatchStopped
                data, digest = await asyncio.to_thread(_read_and_hash, source)
                owner = owners.get(digest)
                if owner is None:
                    owner = owners[digest] = asyncio.get_running_loop().create_future()
                    try:
                        result = await outcome(source, data, digest, stop)
                    except BaseException as error:
                        owner.set_exception(error)
                        owner.exception()  # retrieved: the duplicates re-raise it themselves
                        raise
                    owner.set_result(result)
                    progress.one_done()
                    return result
                del data  # a duplicate: its body is not kept while it waits for the first's outcome
            shared = await owner
            progress.one_done()
            return {**shared, "source": source.uri}

        outcomes = await asyncio.gather(*(one(source) for source in sources), return_exceptions=True)
        for item in outcomes:  # the error that stopped the batch, if any, before any other
            if isinstance(item, BaseException) and not isinstance(item, BatchStopped):
                raise item
        return [item for item in outcomes if isinstance(item, dict)]

    # -- one image, asynchronous endpoint --------------------------------------------------------

    async def _submitted(
        self, source: ImageSource, data: bytes, digest: str, stop: asyncio.Event
    ) -> dict[str, Any]:
        stored = await self._stored(source, digest)
        if stored is not None:
            return {**job(stored["uid"], source.uri, digest, protocol.STATUS_SUCCESS), **source.job_keys}
        reconnected = await self._reconnect(source, digest)
        if reconnected is not None:
            return {**reconnected, **source.job_keys}
        upload = _Upload(self, source, digest, stop)
        try:
            async with upload.booked():
                uid = await self.hook.asubmit_image(data, source=source.uri, pacer=upload.window())
        except Doc2XError as error:
            return {**await upload.failed(error), **source.job_keys}
        upload.record({"uid": uid, "source": source.uri, "at": time.time()})
        return {**job(uid, source.uri, digest), **source.job_keys}

    async def _stored(self, source: ImageSource, digest: str) -> dict[str, Any] | None:
        """A complete earlier result of this content under ``output_path``, if it may be reused."""
        if self.results is None or self.results.overwrite:
            return None
        record = await asyncio.to_thread(self.results.cached, digest, source.uri)
        if record is not None:
            self.log.info(
                "Cache hit: %s is already parsed in %s; not submitted", source.uri, record["markdown_path"]
            )
            return {**record, "source": source.uri}
        return None

    async def _recorded(self, source: ImageSource, digest: str) -> dict[str, Any] | None:
        """What an earlier try recorded for this content; an upload it never saw answered is named.

        Both endpoints read it: an upload whose answer was lost, or that was started and never
        answered (a killed worker), may have been billed, so sending it again is said in the log as
        "possibly billed twice", never done silently.
        """
        with _naming(source.uri):
            recorded = await self.journal.image(digest)
        if recorded is None:
            return None
        uid = recorded.get("uid")
        if (not isinstance(uid, str) or not uid) and (recorded.get("uncertain") or recorded.get("started")):
            what = "lost its answer" if recorded.get("uncertain") else "started and was never answered"
            self.spending.possibly_billed_twice(1)
            self.log.warning(
                "%s is submitted again and is possibly billed twice: an earlier try's upload of it %s",
                source.uri,
                what,
            )
        return recorded

    async def _reconnect(self, source: ImageSource, digest: str) -> dict[str, Any] | None:
        """The job an earlier try recorded for this content, if Doc2X still has it."""
        recorded = await self._recorded(source, digest)
        uid = recorded.get("uid") if recorded else None
        if not isinstance(uid, str) or not uid:
            return None
        try:
            status = await recorded_status(
                self.hook,
                lambda: self.hook.aget_job_status(uid),
                self.log,
                f"Recorded Doc2X job {uid} for {source.uri}",
            )
            if status.status == protocol.STATUS_FAILED:
                raise status.failure()
        except (Doc2XJobFailedError, Doc2XJobNotFoundError) as error:
            # Failed or expired: a new upload is the only way to a result. A failure without an
            # answer (Doc2X unreachable, say) propagates: resubmitting on a guess could pay for the
            # image twice.
            self.log.warning(
                "Recorded Doc2X job %s for %s cannot be reused (%s); submitting again", uid, source.uri, error
            )
            return None
        except Doc2XProtocolError as error:
            # An answer that stays malformed is this job's, not the task's: the image fails alone, named
            # with its uid (Doc2X may still hold its result, so it is not paid for again), and the
            # others go on.
            self.log.error(
                "Recorded Doc2X job %s for %s answered its status malformed %d times; the image fails "
                "with protocol_error: %s",
                uid,
                source.uri,
                FETCH_ATTEMPTS,
                error,
            )
            return failed_job(source.uri, digest, error, uid=uid)
        self.log.info(
            "Reconnected %s to Doc2X job %s (%r), recorded by an earlier try", source.uri, uid, status.status
        )
        self.spending.reconnected(1)
        return job(uid, source.uri, digest, status.status)

    # -- one image, synchronous endpoint ---------------------------------------------------------

    async def _parsed(
        self, source: ImageSource, data: bytes, digest: str, stop: asyncio.Event
    ) -> dict[str, Any]:
        stored = await self._stored(source, digest)
        if stored is not None:
            return stored
        # The synchronous endpoint's answer is the result: nothing to reconnect to, but an earlier
        # try's unanswered upload of this content is named before it is sent again.
        await self._recorded(source, digest)
        upload = _Upload(self, source, digest, stop)
        try:
            async with upload.booked():
                result = await self.hook.aparse_image(data, source=source.uri, pacer=upload.window())
        except Doc2XError as error:
            return await upload.failed(error)
        upload.record({"uid": result.uid, "source": source.uri, "at": time.time()})
        return await asyncio.to_thread(
            store_or_record, self.results, source.uri, digest, result, extra=source.job_keys
        )


class _Upload:
    """The bookkeeping of one upload in the task state store: started, then answered (or lost)."""

    def __init__(self, batch: ImageUploads, source: ImageSource, digest: str, stop: asyncio.Event) -> None:
        self.batch = batch
        self.source = source
        self.digest = digest
        self.stop = stop
        self.started = False

    @asynccontextmanager
    async def booked(self) -> AsyncIterator[None]:
        """Its page booked against the task's budgets before it leaves; given back if Doc2X refused it unbilled."""
        booking = await self.batch.spending.book(1, what=self.source.uri)
        try:
            yield
        except (Doc2XSubmitUncertainError, Doc2XJobFailedError):
            raise  # it may have landed, or Doc2X parsed it and failed: its page stays booked
        except Doc2XError:
            await self.batch.spending.release(booking)  # Doc2X answered and did not take it
            raise
        except BaseException:
            if not self.started:  # stopped or cancelled before a byte left
                await self.batch.spending.release(booking)
            raise

    def window(self) -> _GuardedWindow:
        """The key's window for this upload, stopping with the batch and recording the start."""
        return _GuardedWindow(self.batch.hook.pacer(self.batch.settings), self.stop, self._mark_started)

    async def _mark_started(self, gather: bool) -> None:
        if not self.started:
            with _naming(self.source.uri):
                await self.batch.journal.started(self.digest, self.source.uri, gather=gather)
            self.started = True  # only once it is recorded: a retry of the upload never goes unrecorded

    def record(self, value: dict[str, Any]) -> None:
        """Queue what came back for this content in the task's journal (nothing without a store)."""
        self.batch.journal.answered(self.digest, value)

    async def failed(self, error: Doc2XError) -> dict[str, Any]:
        """The job of an upload that failed; a refused key, an empty quota or a failed store stops the batch."""
        if isinstance(
            error, (Doc2XAuthError, Doc2XQuotaError, Doc2XTaskStateError, Doc2XBudgetUnavailableError)
        ):
            if self.started and not isinstance(error, (Doc2XTaskStateError, Doc2XBudgetUnavailableError)):
                # Refused: Doc2X did not take the image, so a next try sends it without a warning.
                self.record({"failed": error.failure_code, "source": self.source.uri, "at": time.time()})
            self.stop.set()
            raise error
        if isinstance(error, Doc2XSubmitUncertainError):
            self.record({"uncertain": True, "source": self.source.uri, "at": time.time()})
        elif self.started:
            # Doc2X answered (a refusal, a 5xx after every retry): it did not take the image.
            self.record({"failed": error.failure_code, "source": self.source.uri, "at": time.time()})
        return failed_job(self.source.uri, self.digest, error)


@contextlib.contextmanager
def _naming(uri: str) -> Iterator[None]:
    """A failure of the task state store, named with the image it stopped."""
    try:
        yield
    except Doc2XTaskStateError as error:
        if error.source is not None:
            raise
        raise Doc2XTaskStateError(error.args[0], code=error.code, source=uri) from error.__cause__


def _read_and_hash(source: ImageSource) -> tuple[bytes, str]:
    return source.read_with_digest()
