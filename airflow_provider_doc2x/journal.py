"""The task's journal: what its tries keep in Airflow's task state store, for both lanes.

A try records each upload before it waits (the image lane: one entry per image content; the PDF
lane: one entry per PDF and the list of the task's PDFs), so that the next try (a retry, a lost
triggerer, a manual clear) reconnects to the uids instead of paying again. Both lanes go through
this one object, so the keys, the one-call-at-a-time rule and what "no store" means are written
once.

The keys, under Airflow's own per-task-instance scope::

    doc2x/<sha256>          the image lane: {"uid": ..., "source": ..., "at": ...}, or "started",
                            "uncertain" (the answer was lost) or "failed" (a code)
    doc2x/pdf/index         the PDF lane: {"uids": [...]}, oldest first
    doc2x/pdf/<uid>         the PDF lane: one PDF's record (its pages, its state)

On Airflow before 3.3 there is no task state store: the journal is empty and keeps nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

#: Key prefix of what the task state store records per image content.
STATE_KEY_PREFIX = "doc2x/"
#: The task state store's list of the task's PDF uids, in the order they were preuploaded.
STATE_INDEX_KEY = f"{STATE_KEY_PREFIX}pdf/index"
#: Key prefix of each PDF's record.
STATE_PDF_PREFIX = f"{STATE_KEY_PREFIX}pdf/"


class TaskJournal:
    """The task state store of one try, called one call at a time off the event loop.

    :param store: Airflow's task state store, or None (Airflow < 3.3: nothing survives the try).
    :param may_hold: whether the store can hold records of an earlier try (False on a first try:
        one read per image is saved).

    Why one thread: the store talks to Airflow's supervisor, and its in-process stand-in
    (``airflow dags test``) is not safe to call from two threads at once. The thread lives while
    the journal is :meth:`open` (re-entrant: the PDF lane and the image lane it falls back to
    share it).
    """

    def __init__(self, store: Any, *, may_hold: bool) -> None:
        """Keep the store; nothing is read until asked."""
        self.store = store
        self.may_hold = may_hold and store is not None
        self._thread: ThreadPoolExecutor | None = None
        self._opened = 0
        self._lock = threading.Lock()
        self._pdf_index: list[str] | None = None

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
        return await loop.run_in_executor(self._thread, getattr(self.store, method), *args)

    async def _get(self, key: str) -> Any:
        return await self._call("get", key) if self.may_hold else None

    async def _set(self, key: str, value: Any) -> None:
        if self.store is not None:
            await self._call("set", key, value)

    # -- the image lane: one entry per image content ---------------------------------------------

    async def image(self, digest: str) -> dict[str, Any] | None:
        """What an earlier try recorded for this content (None on a first try, or nothing usable)."""
        recorded = await self._get(STATE_KEY_PREFIX + digest)
        return recorded if isinstance(recorded, dict) else None

    async def record_image(self, digest: str, value: dict[str, Any]) -> None:
        """Write this content's entry (nothing without a store)."""
        await self._set(STATE_KEY_PREFIX + digest, value)

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
        return uids

    async def add_pdf(self, uid: str) -> None:
        """Add a PDF to the task's list, before its PUT (so that a try killed mid-PUT is found)."""
        if self.store is None:
            return
        if self._pdf_index is None:
            await self.pdf_uids()
        assert self._pdf_index is not None
        self._pdf_index.append(uid)
        await self._set(STATE_INDEX_KEY, {"uids": self._pdf_index})

    async def pdf(self, uid: str) -> Any:
        """One PDF's record as the store holds it (read even on a first try: this try wrote it)."""
        if self.store is None:
            return None
        return await self._call("get", STATE_PDF_PREFIX + uid)

    async def record_pdf(self, uid: str, value: dict[str, Any]) -> None:
        """Write one PDF's record (nothing without a store)."""
        await self._set(STATE_PDF_PREFIX + uid, value)
