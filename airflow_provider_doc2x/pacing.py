"""
Pacing uploads to the key's limit: at most N images in any rolling window of W seconds.

Doc2X allows 30 images per 30 s per key and answers 429 past that. Pacing on our side means a batch
never trips the limit, so no upload is wasted and the batch runs at the limit, not below it. One
limiter exists per (base URL, key) in a process, shared by every hook and thread using that key;
the key itself is never stored, only a digest of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass


@dataclass
class Slot:
    """One upload's place in the window: booked at its start, moved to its end once answered."""

    at: float
    in_flight: bool = True


class RateLimiter:
    """
    A rolling-window limiter: at most ``limit`` uploads whose slots fall in any ``window`` seconds.

    The server counts an upload when it arrives, somewhere between our send and its answer. So a
    slot is booked at the send (to space the sends) and moved to the answer's time when the upload
    ends (so the next window is measured from a time that is never earlier than the server's).
    """

    def __init__(self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError(f"A rate limit needs limit >= 1 and window > 0, got {limit} per {window}s")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._slots: list[Slot] = []
        self._lock = threading.Lock()

    def reserve(self) -> tuple[float, Slot]:
        """Book the next free slot; return the seconds to wait before sending, and the slot."""
        with self._lock:
            now = self._clock()
            self._slots = [slot for slot in self._slots if slot.in_flight or slot.at > now - self.window]
            times = sorted(slot.at for slot in self._slots)
            start = now if len(times) < self.limit else max(now, times[-self.limit] + self.window)
            slot = Slot(start)
            self._slots.append(slot)
            return start - now, slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.at = max(slot.at, self._clock())
            slot.in_flight = False

    @contextmanager
    def upload(self) -> Iterator[None]:
        """Wait for a free slot (blocking: workers only), then hold it while the upload runs."""
        delay, slot = self.reserve()
        try:
            if delay:
                time.sleep(delay)
            yield
        finally:
            self.release(slot)

    @asynccontextmanager
    async def aupload(self) -> AsyncIterator[None]:
        """:meth:`upload` for an event loop: waits with ``asyncio.sleep``."""
        delay, slot = self.reserve()
        try:
            if delay:
                await asyncio.sleep(delay)
            yield
        finally:
            self.release(slot)


_limiters: dict[tuple[str, str, int, float], RateLimiter] = {}
_limiters_lock = threading.Lock()


def limiter_for(base_url: str, api_key: str, limit: int, window: float) -> RateLimiter:
    """The process-wide limiter of one key at one endpoint."""
    key_digest = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    registry_key = (base_url, key_digest, limit, window)
    with _limiters_lock:
        limiter = _limiters.get(registry_key)
        if limiter is None:
            limiter = _limiters[registry_key] = RateLimiter(limit, window)
        return limiter
