"""The task's journal: what its tries keep in Airflow's task state store, for both lanes.

A try records each upload before it leaves (the image lane: each image content's start; the PDF
lane: each PDF's uid and page map, before its PUT), and what came back (a uid, a PUT answered, a lost
answer, a failure), so that the next try (a retry, a lost triggerer, a manual clear) reconnects to
the uids instead of paying again. Both lanes go through this one object, so the keys, the format,
the one-call-at-a-time rule and what "no store" means are written once.

The keys, under Airflow's own per-task-instance scope::

    doc2x/log/<n>           the image lane, n = 0, 1, 2, ...: {"version": 1, "entries":
                            [[<sha256>, <value>], ...]}, applied in order; a value is {"uid": ...,
                            "source": ..., "at": ...}, or "started", "uncertain" (the answer was
                            lost) or "failed" (a code)
    doc2x/pdf/log/<n>       the PDF lane, the same format: [[<uid>, <record>], ...], a record being
                            the PDF's pages (the sha256 of each) and its state ("put", "uploaded",
                            "uncertain"); the PDFs are oldest first in the order they first appear
    doc2x/<sha256>          the image lane of earlier releases: one value per content (read, never
                            written)
    doc2x/pdf/index         the PDF lane of earlier releases: {"uids": [...]}, and one record per
    doc2x/pdf/<uid>         PDF (read, never written)

**Why logs of batches.** Each write to the store is a database commit (through the supervisor and
the API server): one per upload start and one per answer would cost more than the upload itself
with a generous key. So each lane writes batches: the starts of the uploads that are about to be
sent are written together, in one write, and each of those uploads waits for that write before a
byte leaves (a group commit: the starts that arrive while one write runs go in the next). What comes
back is gathered and written every :data:`FLUSH_SECONDS` (or :data:`FLUSH_ENTRIES` at once), and
all of it before the lane's step returns (before the task defers or fails). So an answer reaches the
store at most about :data:`FLUSH_SECONDS` plus one write after it came: a worker killed in that
window leaves a start without its answer, and the next try asks Doc2X (a PDF's uid is known from its
start) or names the image "possibly billed twice" before it submits it again. Nothing is ever resent
silently.

The store has only get, set, delete and clear, so a try finds the batches by reading
``<prefix>0``, ``/1``, ... up to the first key that is missing; each batch is written after the one
before it (one writer), so a log has no gap. A try reads each log once; the keys of earlier
releases only on a later try, and only for what the log does not name.

On Airflow before 3.3 there is no task state store: the journal is empty and keeps nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from airflow_provider_doc2x import transport
from airflow_provider_doc2x.exceptions import Doc2XTaskStateError

T = TypeVar("T")

#: Key prefix of everything the task state store records for this provider.
STATE_KEY_PREFIX = "doc2x/"
#: Key prefix of the image lane's log of batches: ``doc2x/log/0``, ``doc2x/log/1``, ...
STATE_LOG_PREFIX = f"{STATE_KEY_PREFIX}log/"
#: Key prefix of the PDF lane's log of batches: ``doc2x/pdf/log/0``, ...
STATE_PDF_LOG_PREFIX = f"{STATE_KEY_PREFIX}pdf/log/"
#: The list of the task's PDF uids of earlier releases, oldest first (read, never written).
STATE_INDEX_KEY = f"{STATE_KEY_PREFIX}pdf/index"
#: Key prefix of each PDF's record of earlier releases (read, never written).
STATE_PDF_PREFIX = f"{STATE_KEY_PREFIX}pdf/"
#: The format of a batch of either log.
LOG_FORMAT_VERSION = 1
#: Seconds the answers that came back wait to be written together (the window of "possibly billed twice").
FLUSH_SECONDS = 0.1
#: Entries that make one write at most (and that are written at once, without waiting the interval).
FLUSH_ENTRIES = 64
#: Seconds the first start of a group waits for the others before they are written (uploads side by
#: side come a few milliseconds apart, and each write costs a database commit). The start of an
#: upload paced by the key's window is written at once: waiting would only delay it.
GATHER_SECONDS = 0.05
#: Missing batches in a row a reader looks past before it takes the log as ended (a batch that was
#: deleted, say, must not hide the ones after it, nor be written over by the next try).
GAP_BATCHES = 1
#: Seconds an interrupted step (Airflow's execution_timeout, a signal) gives its journal to write
#: what came back before the error goes on.
STEP_FLUSH_SECONDS = 30.0


def log_entries(batch: Any) -> list[tuple[str, dict[str, Any]]]:
    """The ``(key, value)`` entries of one batch of a log; none if it is not one.

    A batch of a later format is read as long as its entries are what this release knows.
    """
    if not isinstance(batch, dict) or not isinstance(batch.get("entries"), list):
        return []
    return [
        (entry[0], entry[1])
        for entry in batch["entries"]
        if isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], dict)
    ]


def _read_log(
    get: Callable[[str], Any], prefix: str, valid: Callable[[dict[str, Any]], bool] = lambda value: True
) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    number, missing = 0, 0
    while missing <= GAP_BATCHES:
        batch = get(f"{prefix}{number}")
        missing = missing + 1 if batch is None else 0
        latest.update((key, value) for key, value in log_entries(batch) if valid(value))
        number += 1
    return latest


def pdf_record_valid(value: dict[str, Any]) -> bool:
    """Whether a PDF's record holds what a new try needs (its pages' sha256 and its state).

    A record that does not is skipped, so that a newer one garbled in the store never hides the
    PDF's valid start: its uid is still asked of Doc2X.
    """
    pages = value.get("pages")
    return (
        isinstance(pages, list)
        and all(isinstance(page, str) for page in pages)
        and isinstance(value.get("state"), str)
    )


def recorded_images(get: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """Each image content's latest entry in a task state store's log, read with ``get(key)``.

    For tools and tests that look into a task's store (a store object's ``get``, or a mapping of
    what Airflow's REST API lists); the per-content keys of earlier releases are not included.
    """
    return _read_log(get, STATE_LOG_PREFIX)


def recorded_pdfs(get: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """Each PDF's latest record in a task state store, oldest first, read with ``get(key)``.

    For tools and tests; the records of earlier releases come first, and the log's are newer.
    """
    pdfs: dict[str, dict[str, Any]] = {}
    for uid in _index_uids(get(STATE_INDEX_KEY)):
        record = get(STATE_PDF_PREFIX + uid)
        if isinstance(record, dict) and pdf_record_valid(record):
            pdfs[uid] = record
    pdfs.update(_read_log(get, STATE_PDF_LOG_PREFIX, pdf_record_valid))
    return pdfs


def _index_uids(index: Any) -> list[str]:
    if not isinstance(index, dict) or not isinstance(index.get("uids"), list):
        return []
    return [uid for uid in index["uids"] if isinstance(uid, str) and "/" not in uid]


class BatchLog:
    """One log of batches in the store (the image lane's, or the PDF lane's), written by one writer.

    :param journal: the journal whose store and thread it uses.
    :param prefix: the key prefix of its batches.
    :param valid: whether an entry read back can be used; one that cannot is skipped, so that it
        never hides an older entry of its key.

    Used from one event loop at a time (the transport's); every step that queues entries ends with
    :meth:`flush` before another loop may use it.
    """

    def __init__(
        self, journal: TaskJournal, prefix: str, valid: Callable[[dict[str, Any]], bool] = lambda value: True
    ) -> None:
        """Nothing is read until asked."""
        self.journal = journal
        self.prefix = prefix
        #: Whether an entry read back is one this release can use (one that is not is skipped).
        self.valid = valid
        #: Starts that make a group written at once (the uploads that go side by side).
        self.start_group = 1
        self._view: dict[str, dict[str, Any]] | None = None  # what the store holds, latest per key
        self._reading: asyncio.Future[dict[str, dict[str, Any]]] | None = None
        self._next_batch = 0
        #: What waits to be written: (key, value, the start's future or None, when it was queued).
        self._queue: list[tuple[str, dict[str, Any], asyncio.Future[None] | None, float]] = []
        self._writing: list[tuple[str, dict[str, Any]]] = []  # the batch being written
        self._waiting = 0  # entries in the queue whose upload waits for the write
        self._waiting_since = 0.0
        self._hurry = False  # a start waits that is not to be gathered
        self._flushing = False
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def read(self) -> dict[str, dict[str, Any]]:
        """The latest value of each key the store holds (read once, then kept up to date by the writes)."""
        if self._view is None:
            if self._reading is None or self._reading.get_loop() is not asyncio.get_running_loop():
                self._reading = asyncio.ensure_future(self._read())
            view = await asyncio.shield(self._reading)
            if self._view is None:
                self._view = view
        return self._view

    async def _read(self) -> dict[str, dict[str, Any]]:
        """Every batch, up to :data:`GAP_BATCHES` missing ones in a row; the next batch goes after the last found."""
        latest: dict[str, dict[str, Any]] = {}
        number, missing = 0, 0
        while missing <= GAP_BATCHES:
            batch = await self.journal._call("get", f"{self.prefix}{number}")
            if batch is None:
                missing += 1
            else:
                missing, self._next_batch = 0, number + 1
                latest.update((key, value) for key, value in log_entries(batch) if self.valid(value))
            number += 1
        return latest

    def latest(self, key: str) -> dict[str, Any] | None:
        """A key's newest value this try knows: queued, being written, or held by the store (once read)."""
        for queued, value, _, _ in reversed(self._queue):
            if queued == key:
                return value
        for written, value in reversed(self._writing):
            if written == key:
                return value
        return None if self._view is None else self._view.get(key)

    async def started(self, key: str, value: dict[str, Any], *, gather: bool = True) -> None:
        """Record that an upload is about to be sent; return once that is in the store.

        Starts that arrive together are written in one write; with ``gather``, a start waits up to
        :data:`GATHER_SECONDS` for others (without, it goes in the next write at once).
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hurry = self._hurry or not gather
        self._enqueue(key, value, done)
        await done

    def answered(self, key: str, value: dict[str, Any]) -> None:
        """Record what came back; written with the others within :data:`FLUSH_SECONDS`, or by :meth:`flush`."""
        self._enqueue(key, value, None)

    async def flush(self) -> None:
        """Write every entry still queued; raise the error of a write that failed, if any."""
        self._flushing = True
        try:
            while self._writer is not None:
                if self._wake is not None:
                    self._wake.set()
                await asyncio.shield(self._writer)
        finally:
            self._flushing = False
        if self._failure is not None:
            raise self._failure

    def _enqueue(self, key: str, value: dict[str, Any], done: asyncio.Future[None] | None) -> None:
        if self._failure is not None and done is not None:
            done.set_exception(self._failure)  # the store failed: no more uploads are started
            return
        now = time.monotonic()
        self._queue.append((key, value, done, now))
        if done is not None:
            if not self._waiting:
                self._waiting_since = now
            self._waiting += 1
        if self._writer is None:
            self._wake = asyncio.Event()
            self._writer = asyncio.ensure_future(self._write_queue())
        elif self._waiting >= self.start_group or len(self._queue) >= FLUSH_ENTRIES or done is not None:
            assert self._wake is not None
            self._wake.set()

    def _due(self) -> float:
        """Seconds before the queue is to be written (0: now)."""
        if self._flushing or self._waiting >= self.start_group or len(self._queue) >= FLUSH_ENTRIES:
            return 0.0
        if self._waiting:
            return 0.0 if self._hurry else self._waiting_since + GATHER_SECONDS - time.monotonic()
        return self._queue[0][3] + FLUSH_SECONDS - time.monotonic()  # from the oldest entry's arrival

    async def _write_queue(self) -> None:
        """Write the queue in batches, one after another, until it is empty."""
        assert self._wake is not None
        try:
            view = await self.read()  # and the next free batch number
            while self._queue:
                wait = self._due()
                if wait > 0:
                    self._wake.clear()
                    with suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    continue
                batch = self._queue[:FLUSH_ENTRIES]
                del self._queue[:FLUSH_ENTRIES]
                # The starts left in the queue gather from their own arrival.
                self._waiting_since = next((at for _, _, done, at in self._queue if done), time.monotonic())
                self._hurry = False
                waiters = [done for _, _, done, _ in batch if done is not None]
                self._waiting -= len(waiters)
                self._writing = [(key, value) for key, value, _, _ in batch]
                try:
                    await self.journal._set(
                        f"{self.prefix}{self._next_batch}",
                        {"version": LOG_FORMAT_VERSION, "entries": [list(entry) for entry in self._writing]},
                    )
                except Exception as error:
                    self._fail_starts(error, waiters)
                    continue  # what comes back later is still written, if the store recovers
                except BaseException as error:  # cancelled, or the process is stopping: none of them is sent
                    self._fail_starts(error, waiters)
                    raise
                finally:
                    written, self._writing = self._writing, []
                self._next_batch += 1
                view.update(written)
                for done in waiters:
                    if not done.done():
                        done.set_result(None)
        except BaseException as error:
            self._fail_starts(error, [])
            raise
        finally:
            self._writer = None

    def _fail_starts(self, error: BaseException, waiters: list[asyncio.Future[None]]) -> None:
        """A write failed: the uploads that wait for it, or to start, get the error (none is sent).

        What came back for the others stays queued: it is written if the store recovers, and
        :meth:`flush` raises the first error.
        """
        if self._failure is None:
            self._failure = error
        waiters = waiters + [done for _, _, done, _ in self._queue if done is not None]
        self._queue = [item for item in self._queue if item[2] is None]
        self._waiting = 0
        for done in waiters:
            if not done.done():
                done.set_exception(error)
                done.exception()  # retrieved: flush raises it for the batch


class TaskJournal:
    """The task state store of one try, called one call at a time off the event loop.

    :param store: Airflow's task state store, or None (Airflow < 3.3: nothing survives the try).
    :param may_hold: whether the store can hold records of an earlier try (False on a first try:
        the keys of earlier releases are not read).

    Why one thread: the store talks to Airflow's supervisor, and its in-process stand-in
    (``airflow dags test``) is not safe to call from two threads at once. The thread lives while
    the journal is :meth:`open` (re-entrant: the PDF lane and the image lane it falls back to
    share it). Each lane runs its steps through :meth:`run`, which writes what a step queued before
    it returns.
    """

    def __init__(self, store: Any, *, may_hold: bool) -> None:
        """Keep the store; nothing is read until asked."""
        self.store = store
        self.may_hold = may_hold and store is not None
        self._thread: ThreadPoolExecutor | None = None
        self._opened = 0
        self._lock = threading.Lock()
        #: Writes made, and the seconds they took (the task's log says them).
        self.writes = 0
        self.write_seconds = 0.0
        #: The image lane's log (keys: image contents' sha256) and the PDF lane's (keys: PDF uids).
        self.images = BatchLog(self, STATE_LOG_PREFIX)
        self.pdfs = BatchLog(self, STATE_PDF_LOG_PREFIX, pdf_record_valid)
        self._earlier_pdfs: dict[str, dict[str, Any]] | None = None

    @property
    def keeps(self) -> bool:
        """Whether anything written survives the try (there is a store)."""
        return self.store is not None

    @contextmanager
    def open(self) -> Iterator[TaskJournal]:
        """Start the journal's thread for the calls of a block; the outermost block stops it."""
        with self._lock:
            if self._opened == 0:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="doc2x-state")
            self._opened += 1
        try:
            yield self
        finally:
            with self._lock:
                self._opened -= 1
                thread, last = self._thread, self._opened == 0
                if last:
                    self._thread = None
            if last and thread is not None:
                thread.shutdown(wait=True)

    def run(self, step: Coroutine[Any, Any, T]) -> T:
        """Run a lane's step on the transport's loop, then write what it queued (also when it failed).

        Interrupted (Airflow's execution_timeout, a signal), the step is cancelled and what came
        back is written, for at most :data:`STEP_FLUSH_SECONDS`, before the error goes on.
        """
        ended = threading.Event()

        async def journaled() -> T:
            try:
                try:
                    outcome = await step
                    await self.flush()
                except BaseException:
                    # Failed, or cancelled (in the step or in its last flush): what came back is
                    # still written before the journal's thread stops; the step's error is raised.
                    with suppress(Exception):
                        await self.flush()
                    raise
                return outcome
            finally:
                ended.set()

        with self.open():
            try:
                return transport.run_sync(journaled())
            except BaseException:
                ended.wait(STEP_FLUSH_SECONDS)
                raise

    async def flush(self) -> None:
        """Write what both logs hold queued; raise the error of a write that failed, if any."""
        if self.store is None:
            return
        try:
            await self.images.flush()
        finally:
            await self.pdfs.flush()

    async def _call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        thread = self._thread
        try:
            if thread is None:  # closed: the store is never called from another thread
                raise RuntimeError("the task's journal is closed")
            return await loop.run_in_executor(thread, getattr(self.store, method), *args)
        except Exception as error:
            what = "read" if method == "get" else "written"
            raise Doc2XTaskStateError(
                f"Airflow's task state store could not be {what} ({args[0]}): "
                f"{type(error).__name__}: {error}. Nothing more is uploaded; the task's next try "
                "reads what was recorded. Check the API server and the metadata database."
            ) from error

    async def _set(self, key: str, value: Any) -> None:
        began = time.monotonic()
        await self._call("set", key, value)
        self.writes += 1
        self.write_seconds += time.monotonic() - began

    # -- the image lane ------------------------------------------------------------------------------

    async def image(self, digest: str) -> dict[str, Any] | None:
        """What this task recorded for this content (None if nothing usable).

        The log is read once, even on a first try (a try that resumed wrote it), and kept up to
        date with what this journal writes; the key of an earlier release only on a later try, and
        only when the log does not name the content.
        """
        if self.store is None:
            return None
        recorded = (await self.images.read()).get(digest)
        if recorded is None and self.may_hold:
            # The log is newer than any key of an earlier release: once it names the content, a uid
            # there was already found unusable.
            earlier = await self._call("get", STATE_KEY_PREFIX + digest)
            if isinstance(earlier, dict):
                recorded = earlier
        return recorded

    async def started(self, digest: str, source: str, *, gather: bool = True) -> None:
        """Record that this content's upload is about to be sent; return once that is in the store."""
        if self.store is not None:
            await self.images.started(
                digest, {"started": True, "source": source, "at": time.time()}, gather=gather
            )

    def answered(self, digest: str, value: dict[str, Any]) -> None:
        """Record what came back for this content (its uid, a lost answer, a failure); written soon."""
        if self.store is not None:
            self.images.answered(digest, value)

    # -- the PDF lane ------------------------------------------------------------------------------

    async def pdf_records(self) -> dict[str, dict[str, Any]]:
        """Each PDF this task recorded and its newest record, oldest first.

        The log is read even on a first try (a try that resumed wrote it); the records of earlier
        releases only on a later try.
        """
        if self.store is None:
            return {}
        records = dict(await self._earlier())
        records.update(await self.pdfs.read())
        return records

    async def _earlier(self) -> dict[str, dict[str, Any]]:
        """The PDF records of earlier releases (read once, on a later try only)."""
        if self._earlier_pdfs is None:
            earlier: dict[str, dict[str, Any]] = {}
            if self.may_hold:
                for uid in _index_uids(await self._call("get", STATE_INDEX_KEY)):
                    record = await self._call("get", STATE_PDF_PREFIX + uid)
                    if isinstance(record, dict) and pdf_record_valid(record):
                        earlier[uid] = record
            self._earlier_pdfs = earlier
        return self._earlier_pdfs

    async def pdf(self, uid: str) -> dict[str, Any] | None:
        """One PDF's newest record this try knows (what it queued included), or None."""
        if self.store is None:
            return None
        await self.pdfs.read()
        known = self.pdfs.latest(uid) or (await self._earlier()).get(uid)
        if known is None and not self.may_hold:
            # A try that resumed after an upgrade: its PDFs may be under an earlier release's key.
            earlier = await self._call("get", STATE_PDF_PREFIX + uid)
            known = earlier if isinstance(earlier, dict) and pdf_record_valid(earlier) else None
        return known

    async def pdf_started(self, uid: str, record: dict[str, Any]) -> None:
        """Record a PDF before its PUT; return once the store holds it (its PUT may start then)."""
        if self.store is not None:
            await self.pdfs.started(uid, record)

    def pdf_answered(self, uid: str, record: dict[str, Any]) -> None:
        """Record what a PDF became (its PUT answered or lost, its fallback); written soon."""
        if self.store is not None:
            self.pdfs.answered(uid, record)
