"""The local Doc2X server's limits: rolling rate windows, and slots for pages parsed at once.

Shared by the image API (:mod:`~airflow_provider_doc2x.local.image_service`) and the PDF API
(:mod:`~airflow_provider_doc2x.local.pdf_service`, :mod:`~airflow_provider_doc2x.local.pdf_tasks`);
both read their sizes from the knobs at every call, so that a change with ``POST /local/config``
applies at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from airflow_provider_doc2x.local.answers import Refused, api_error


def admit(window: deque[float], *, limit: int, seconds: float, now: float) -> None:
    """Count one request in a key's rolling window: at most ``limit`` per ``seconds``.

    Raises:
        Refused: HTTP 429 ``request_limit_exceeded`` with ``Retry-After`` (the window is unchanged).
    """
    while window and window[0] <= now - seconds:
        window.popleft()
    if len(window) >= limit:
        raise rate_limited(window[0] + seconds - now)
    window.append(now)


def rate_limited(retry_after: float) -> Refused:
    """Build the API's rate-limit refusal: HTTP 429 ``request_limit_exceeded`` with ``Retry-After``."""
    return api_error(
        "request_limit_exceeded",
        "Too many requests",
        status=429,
        headers={"Retry-After": f"{max(0.0, retry_after):.3f}"},
    )


class Slots:
    """A first-come, first-served semaphore whose size is read from a knob at every hand-over.

    Use it as ``async with slots:``. When the knob grows, call :meth:`hand_over` so that waiters
    take the new places at once.

    Args:
        capacity: returns how many may hold a slot at once now (less than 1 counts as 1).
    """

    def __init__(self, capacity: Callable[[], int]) -> None:
        """Start with no holder and nobody waiting."""
        self.capacity = capacity
        self.active = 0
        #: The most slots held at once.
        self.max_active = 0
        self.waiting: deque[asyncio.Future[None]] = deque()

    def room(self) -> bool:
        """Whether one more may hold a slot now."""
        return self.active < max(1, self.capacity())

    async def __aenter__(self) -> None:
        """Take a slot, in turn with the others waiting."""
        if self.room() and not self.waiting:
            self.take()
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a slot, then cancelled: give it on
                self.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        """Give the slot to the next in line."""
        self.release()

    def release(self) -> None:
        """Give a slot back and hand it over."""
        self.active -= 1
        self.hand_over()

    def hand_over(self) -> None:
        """Hand free slots to waiters, first come first served (waiters that gave up are skipped)."""
        while self.waiting and self.room():
            turn = self.waiting.popleft()
            if turn.done():
                continue
            self.take()
            turn.set_result(None)

    def take(self) -> None:
        """Count one more slot held."""
        self.active += 1
        self.max_active = max(self.max_active, self.active)
