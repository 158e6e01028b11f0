"""
Pacing uploads to the key's limit: at most N images in any rolling window of W seconds.

Doc2X allows 30 images per 30 s per key and answers 429 past that. Pacing on our side means a batch
never trips the limit, so no upload is wasted and the batch runs at the limit, not below it.

The window of a key is kept in a small file under a lock (``fcntl.flock``), shared by every thread
and process of the machine that uses the key: mapped tasks on one host, run by several worker
processes at once, pace together instead of each bursting 30 uploads. The file is named by a digest
of the base URL and the key; the key itself is never written. ``DOC2X_PACING_DIR`` chooses the
folder (default: ``<tmp>/airflow-doc2x-pacing``). Across hosts, an Airflow pool of one slot lets
one task of the key upload at a time (see the README).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

#: An upload still "in flight" after this long is taken for a crashed process and forgotten.
STALE_IN_FLIGHT_SECONDS = 600.0


class RateLimiter:
    """
    A rolling-window limiter: at most ``limit`` uploads whose slots fall in any ``window`` seconds.

    The server counts an upload when it arrives, somewhere between our send and its answer. So a
    slot is booked at the send (to space the sends) and moved to the answer's time when the upload
    ends (so the next window is measured from a time that is never earlier than the server's).
    While an upload is in flight, its slot counts as taken now.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        state_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError(f"A rate limit needs limit >= 1 and window > 0, got {limit} per {window}s")
        self.limit = limit
        self.window = window
        self.state_file = state_file
        self._clock = clock
        self._memory: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @contextmanager
    def _slots(self) -> Iterator[list[dict[str, Any]]]:
        """The window's slots, locked for this thread and, with a state file, for every process."""
        with self._lock:
            if self.state_file is None:
                yield self._memory
                return
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.state_file, "a+", encoding="utf-8") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                handle.seek(0)
                try:
                    slots = json.loads(handle.read() or "[]")
                except ValueError:
                    slots = []  # a torn file is only pacing state: start a new window
                yield slots
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(slots))

    def reserve(self) -> tuple[float, str | None]:
        """
        Book a slot now if the window has room: return ``(0, slot_id)``; else ``(wait, None)``.

        An upload still in flight counts as happening now: when it ends is not known yet, so the
        window cannot be measured from its start. The caller waits and asks again.
        """
        with self._slots() as slots:
            now = self._clock()
            slots[:] = [
                slot
                for slot in slots
                if (slot["open"] and slot["at"] > now - STALE_IN_FLIGHT_SECONDS)
                or slot["at"] > now - self.window
            ]
            times = sorted(max(slot["at"], now) if slot["open"] else slot["at"] for slot in slots)
            if len(times) >= self.limit:
                return times[-self.limit] + self.window - now, None
            slot_id = uuid.uuid4().hex
            slots.append({"id": slot_id, "at": now, "open": True})
            return 0.0, slot_id

    def release(self, slot_id: str) -> None:
        """The upload ended: its slot now counts from this moment, no longer as in flight."""
        with self._slots() as slots:
            for slot in slots:
                if slot["id"] == slot_id:
                    slot["at"] = max(slot["at"], self._clock())
                    slot["open"] = False

    @contextmanager
    def upload(self) -> Iterator[None]:
        """Wait for room in the window (blocking: workers only), then hold a slot while the upload runs."""
        while True:
            delay, slot_id = self.reserve()
            if slot_id is not None:
                break
            time.sleep(delay)
        try:
            yield
        finally:
            self.release(slot_id)

    @asynccontextmanager
    async def aupload(self) -> AsyncIterator[None]:
        """:meth:`upload` for an event loop: the state file is read in a thread, the wait is async."""
        while True:
            delay, slot_id = await asyncio.to_thread(self.reserve)
            if slot_id is not None:
                break
            await asyncio.sleep(delay)
        try:
            yield
        finally:
            await asyncio.to_thread(self.release, slot_id)


_limiters: dict[tuple[str, int, float], RateLimiter] = {}
_limiters_lock = threading.Lock()


def pacing_dir() -> Path:
    return Path(os.environ.get("DOC2X_PACING_DIR") or Path(tempfile.gettempdir()) / "airflow-doc2x-pacing")


def limiter_for(base_url: str, api_key: str, limit: int, window: float) -> RateLimiter:
    """The limiter of one key at one endpoint, shared by the threads and processes of this machine."""
    digest = hashlib.sha256(f"{base_url}\n{api_key}".encode()).hexdigest()[:24]
    state_file = pacing_dir() / f"{digest}.json"
    registry_key = (str(state_file), limit, window)
    with _limiters_lock:
        limiter = _limiters.get(registry_key)
        if limiter is None:
            limiter = _limiters[registry_key] = RateLimiter(limit, window, state_file=state_file)
        return limiter
