"""The task's journal: what its tries keep in Airflow's task state store, for both lanes.

A try records each upload before it waits (the image lane: the start and then the uid of each image
content; the PDF lane: one entry per PDF and the list of the task's PDFs), so that the next try (a
retry, a lost triggerer, a manual clear) reconnects to the uids instead of paying again. Both lanes
go through this one object, so the keys, the one-call-at-a-time rule and what "no store" means are
written once.

The keys, under Airflow's own per-task-instance scope::

    doc2x/log/<n>           the image lane, n = 0, 1, 2, ...: {"version": 1, "entries":
                            [[<sha256>, <value>], ...]}, applied in order; a value is {"uid": ...,
                            "source": ..., "at": ...}, or "started", "uncertain" (the answer was
                            lost) or "failed" (a code)
    doc2x/<sha256>          the image lane of earlier releases: one such value per content (read,
                            never written)
    doc2x/pdf/index         the PDF lane: {"uids": [...]}, oldest first
    doc2x/pdf/<uid>         the PDF lane: one PDF's record (its pages, its state)

**Why a log of batches.** Each write to the store is a database commit (through the supervisor and
the API server): one per upload start and one per uid would cost more than the upload itself with a
generous key. So the image lane writes batches: the starts of the uploads that are about to be sent
are written together, in one write, and each of those uploads waits for that write before a byte
leaves (a group commit: the starts that arrive while one write runs go in the next). The uids,
losses and failures that come back are gathered and written every :data:`FLUSH_SECONDS` (or
:data:`FLUSH_ENTRIES` at once), and all of them before the uploads' call returns (before the task
defers or fails). So an upload's uid reaches the store at most about :data:`FLUSH_SECONDS` plus one
write after its answer: a worker killed in that window leaves a start without a uid, and the next
try names the image "possibly billed twice" before it submits it again. Nothing is ever resent
silently.

The store has only get, set, delete and clear, so a try finds the batches by reading
``doc2x/log/0``, ``/1``, ... up to the first key that is missing; each batch is written after the
one before it (one writer), so the log has no gap. A new try reads the whole log once; for a content
the log does not name, or names without a uid, it also reads the content's key of earlier releases.

On Airflow before 3.3 there is no task state store: the journal is empty and keeps nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

from airflow_provider_doc2x.exceptions import Doc2XTaskStateError

#: Key prefix of what the task state store records per image content (the image lane's log, and
#: the per-content keys of earlier releases, are under it too).
STATE_KEY_PREFIX = "doc2x/"
#: Key prefix of the image lane's log of batches: ``doc2x/log/0``, ``doc2x/log/1``, ...
STATE_LOG_PREFIX = f"{STATE_KEY_PREFIX}log/"
#: The task state store's list of the task's PDF uids, in the order they were preuploaded.
STATE_INDEX_KEY = f"{STATE_KEY_PREFIX}pdf/index"
#: Key prefix of each PDF's record.
STATE_PDF_PREFIX = f"{STATE_KEY_PREFIX}pdf/"
#: The format of a batch of the image lane's log.
LOG_FORMAT_VERSION = 1
#: Seconds the uids that came back wait to be written together (the window of "possibly billed twice").
FLUSH_SECONDS = 0.1
#: Entries that make one write at most (and that are written at once, without waiting the interval).
FLUSH_ENTRIES = 64
#: Seconds the first start of a group waits for the others before they are written (uploads side by
#: side with a generous key come a few milliseconds apart, and each write costs a database commit).
#: The start of an upload paced by the key's window is written at once: waiting would only delay it.
GATHER_SECONDS = 0.05


def log_entries(batch: Any) -> list[tuple[str, dict[str, Any]]]:
    """The ``(sha256, value)`` entries of one batch of the image lane's log; none if it is not one.

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


def recorded_images(get: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """Each image content's latest entry in a task state store's log, read with ``get(key)``.

    For tools and tests that look into a task's store (a store object's ``get``, or a mapping of
    what Airflow's REST API lists); the per-content keys of earlier releases are not included.
    """
    images: dict[str, dict[str, Any]] = {}
    number = 0
    while (batch := get(f"{STATE_LOG_PREFIX}{number}")) is not None:
        images.update(log_entries(batch))
        number += 1
    return images


class TaskJournal:
    """The task state store of one try, called one call at a time off the event loop.

    :param store: Airflow's task state store, or None (Airflow < 3.3: nothing survives the try).
    :param may_hold: whether the store can hold records of an earlier try (False on a first try:
        the per-content keys of earlier releases are not read).

    Why one thread: the store talks to Airflow's supervisor, and its in-process stand-in
    (``airflow dags test``) is not safe to call from two threads at once. The thread lives while
    the journal is :meth:`open` (re-entrant: the PDF lane and the image lane it falls back to
    share it). The image lane's batches are written from the event loop of the uploads' call,
    which ends with :meth:`flush`.
    """

    def __init__(self, store: Any, *, may_hold: bool) -> None:
        """Keep the store; nothing is read until asked."""
        self.store = store
        self.may_hold = may_hold and store is not None
        self._thread: ThreadPoolExecutor | None = None
        self._opened = 0
        self._lock = threading.Lock()
        self._pdf_index: list[str] | None = None
        self._pdf_index_written = 0  # uids of the list the store holds
        self._pdf_index_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        #: Writes made, and the seconds they took (the task's log says them).
        self.writes = 0
        self.write_seconds = 0.0
        self._log: asyncio.Future[dict[str, dict[str, Any]]] | None = None
        self._next_batch = 0
        #: What waits to be written: (sha256, value, the start's future or None, when it was queued).
        self._queue: list[tuple[str, dict[str, Any], asyncio.Future[None] | None, float]] = []
        self._waiting = 0  # entries in the queue whose upload waits for the write
        self._waiting_since = 0.0
        self._hurry = False  # a start waits that is not to be gathered
        #: Starts that make a group written at once (the uploads that go side by side).
        self.start_group = 1
        self._flushing = False
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

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

    async def _call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, getattr(self.store, method), *args)
        except Exception as error:
            what = "read" if method == "get" else "written"
            raise Doc2XTaskStateError(
                f"Airflow's task state store could not be {what} ({args[0]}): "
                f"{type(error).__name__}: {error}. Nothing more is uploaded; the task's next try "
                "reads what was recorded. Check the API server and the metadata database."
            ) from error

    async def _get(self, key: str) -> Any:
        return await self._call("get", key) if self.may_hold else None

    async def _set(self, key: str, value: Any) -> None:
        if self.store is not None:
            began = time.monotonic()
            await self._call("set", key, value)
            self.writes += 1
            self.write_seconds += time.monotonic() - began

    # -- the image lane: a log of batches ----------------------------------------------------------

    async def image(self, digest: str) -> dict[str, Any] | None:
        """What this task recorded for this content (None if nothing usable).

        The log is read once, even on a first try (a try that resumed wrote it), and kept up to
        date with what this journal writes; the key of an earlier release only on a later try, and
        only when the log does not name the content.
        """
        if self.store is None:
            return None
        if self._log is None:
            self._log = asyncio.ensure_future(self._read_log())
        recorded = (await asyncio.shield(self._log)).get(digest)
        if recorded is None and self.may_hold:
            # The log is newer than any key of an earlier release: once it names the content, a uid
            # there was already found unusable.
            earlier = await self._get(STATE_KEY_PREFIX + digest)
            if isinstance(earlier, dict):
                recorded = earlier
        return recorded

    async def _read_log(self) -> dict[str, dict[str, Any]]:
        images: dict[str, dict[str, Any]] = {}
        number = 0
        while (batch := await self._call("get", f"{STATE_LOG_PREFIX}{number}")) is not None:
            images.update(log_entries(batch))
            number += 1
        self._next_batch = number
        return images

    async def started(self, digest: str, source: str, *, gather: bool = True) -> None:
        """Record that this content's upload is about to be sent; return once that is in the store.

        Starts that arrive together are written in one write; with ``gather``, a start waits up to
        :data:`GATHER_SECONDS` for others (without, it goes in the next write at once).
        """
        if self.store is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hurry = self._hurry or not gather
        self._enqueue(digest, {"started": True, "source": source, "at": time.time()}, done)
        await done

    def answered(self, digest: str, value: dict[str, Any]) -> None:
        """Record what came back for this content (its uid, a lost answer, a failure); written soon.

        Written with the others that came back within :data:`FLUSH_SECONDS`; :meth:`flush` writes
        what is left.
        """
        if self.store is not None:
            self._enqueue(digest, value, None)

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

    def _enqueue(self, digest: str, value: dict[str, Any], done: asyncio.Future[None] | None) -> None:
        if self._failure is not None and done is not None:
            done.set_exception(self._failure)  # the store failed: no more uploads are started
            return
        now = time.monotonic()
        self._queue.append((digest, value, done, now))
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
            if self._log is None:
                self._log = asyncio.ensure_future(self._read_log())
            await asyncio.shield(self._log)  # the next free batch number
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
                try:
                    await self._set(
                        f"{STATE_LOG_PREFIX}{self._next_batch}",
                        {
                            "version": LOG_FORMAT_VERSION,
                            "entries": [[digest, value] for digest, value, _, _ in batch],
                        },
                    )
                except Exception as error:
                    self._fail_starts(error, waiters)
                    continue  # the uids that come back later are still written, if the store recovers
                self._next_batch += 1
                assert self._log is not None
                self._log.result().update((digest, value) for digest, value, _, _ in batch)
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

        What came back for the others stays queued: their uids are written if the store recovers,
        and :meth:`flush` raises the first error.
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

    # -- the PDF lane: the list of the task's PDFs, and one record per PDF ---------------------

    async def pdf_uids(self) -> list[str]:
        """The uids of the PDFs this task recorded, oldest first (kept, so that adding is one write).

        Read even on a first try: a task that deferred and resumed recorded PDFs in this same try.
        """
        if self.store is None:
            return []
        index = await self._call("get", STATE_INDEX_KEY)
        uids = (
            [uid for uid in index.get("uids", []) if isinstance(uid, str)] if isinstance(index, dict) else []
        )
        if self._pdf_index is None:
            # Only the first read is kept: PDFs are added side by side, and a read that ends after
            # another PDF was added must not put back the list from before it (that PDF would drop
            # out of the list, and a new try would pay for its pages again).
            self._pdf_index = list(uids)
            self._pdf_index_written = len(uids)
        return uids

    async def add_pdf(self, uid: str) -> None:
        """Add a PDF to the task's list; return once the store holds it (its PUT may start then).

        So that a try killed mid-PUT is found. PDFs that leave side by side share writes: a PDF
        added while the list is being written waits for that write, and the next one writes every
        PDF added meanwhile at once (one write for a few PDFs, not one each).
        """
        if self.store is None:
            return
        if self._pdf_index is None:
            await self.pdf_uids()
        assert self._pdf_index is not None
        self._pdf_index.append(uid)
        wanted = len(self._pdf_index)
        async with self._index_lock():
            if self._pdf_index_written >= wanted:
                return  # written by a write that began after this PDF was added
            listed = list(self._pdf_index)
            await self._set(STATE_INDEX_KEY, {"uids": listed})
            self._pdf_index_written = len(listed)

    def _index_lock(self) -> asyncio.Lock:
        """One lock per event loop the journal is used from (an asyncio lock belongs to one loop)."""
        loop = asyncio.get_running_loop()
        if self._pdf_index_lock is None or self._pdf_index_lock[0] is not loop:
            self._pdf_index_lock = (loop, asyncio.Lock())
        return self._pdf_index_lock[1]

    async def pdf(self, uid: str) -> Any:
        """One PDF's record as the store holds it (read even on a first try: this try wrote it)."""
        if self.store is None:
            return None
        return await self._call("get", STATE_PDF_PREFIX + uid)

    async def record_pdf(self, uid: str, value: dict[str, Any]) -> None:
        """Write one PDF's record (nothing without a store)."""
        await self._set(STATE_PDF_PREFIX + uid, value)
