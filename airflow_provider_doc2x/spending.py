"""A task's pages: booked before each upload leaves (its ``max_pages``, the key's daily budget), and its usage.

The plan (:mod:`~airflow_provider_doc2x.plan`) refuses a run that would bill more than
``max_pages`` before anything is sent. What a plan cannot know (a PDF that failed and is tried
again in smaller PDFs, an upload sent again after its answer was lost) is bounded here: each
upload of the image lane books one page, each PDF its pages, before it is sent, and an upload that
Doc2X refused unbilled (a 429 past every retry, a limit code, a failure before the body arrived)
gives its pages back. An upload whose answer was lost keeps them: it may have been billed.

The key's ``daily_page_budget`` is booked the same way, in the store that paces the key
(:mod:`~airflow_provider_doc2x.pacing.daily`), so that the tasks of every host share it; it fails
closed. When a budget runs out mid-task, nothing new is sent: what is in flight finishes, and each
source not sent is named with the code ``budget_exceeded``.

The pages booked are the task's ``pages_billed``. With what the lanes count (reconnections, uploads
possibly billed twice), the answers 429 absorbed and the time spent, they make the task's
:class:`~airflow_provider_doc2x.usage.Usage`, carried across deferrals by the trigger (back in its
event) and reported at its end (:func:`~airflow_provider_doc2x.usage.report_usage`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x import transport
from airflow_provider_doc2x.exceptions import Doc2XBudgetError
from airflow_provider_doc2x.pacing.daily import PageBooking
from airflow_provider_doc2x.usage import Usage, report_usage


class DailyBudget(Protocol):
    """The key's daily page budget (:class:`~airflow_provider_doc2x.pacing.daily.DailyPageBudget`)."""

    def book(self, pages: int, *, what: str) -> Any:
        """Book pages for today, or raise ``Doc2XBudgetError`` / ``Doc2XBudgetUnavailableError``."""

    def release(self, booking: Any) -> None:
        """Give back the pages of an upload refused unbilled."""

    def today(self) -> str:
        """The budget's day now."""

    def day_of(self, timestamp: float) -> str:
        """The budget's day of a moment."""


@dataclass
class Booking:
    """Pages booked for one upload: in the task's count, and in the key's day when there is a budget."""

    pages: int
    daily: Any = None
    released: bool = False


class Spending:
    """The pages one task books before its uploads leave, and what it cost and saved.

    :param max_pages: the task's cap, or None.
    :param daily: the key's daily budget, or None.
    :param carried: what the task's earlier executions carried across a deferral (:meth:`carried`).
    """

    def __init__(
        self,
        *,
        max_pages: int | None = None,
        daily: DailyBudget | None = None,
        carried: Any = None,
        longest_deferral: float = 86400.0,
    ) -> None:
        """Start this execution's share; nothing is booked until an upload asks.

        ``longest_deferral`` bounds the wait a carried ``deferred_at`` may add (the deferral's own
        timeout): a figure read back from the database never makes the usage absurd.
        """
        self.max_pages = max_pages
        self.daily = daily
        self.reported = False
        carried = carried if isinstance(carried, dict) else {}
        self.usage = Usage.of(carried.get("usage"))
        if max_pages is not None:  # never booked past it: a larger figure is not the task's own
            self.usage.pages_billed = min(self.usage.pages_billed, max_pages)
        deferred_at = carried.get("deferred_at")
        if isinstance(deferred_at, (int, float)) and not isinstance(deferred_at, bool):
            self.usage.wait_seconds += min(max(0.0, time.time() - deferred_at), longest_deferral)
        self._began = time.monotonic()
        self._rate_limited = transport.RATE_LIMITED.value
        self._waited = 0.0

    @property
    def booked(self) -> int:
        """Pages the task booked so far (its tries before a deferral included), less those given back."""
        return self.usage.pages_billed

    async def book(self, pages: int, *, what: str) -> Booking:
        """Book ``pages`` for the upload of ``what``; raise a budget error naming it when it would overrun one."""
        if self.max_pages is not None and self.booked + pages > self.max_pages:
            raise Doc2XBudgetError(
                f"{what} was not sent: its {pages} pages would take the task past max_pages="
                f"{self.max_pages} ({self.booked} pages booked already). Raise max_pages on the task",
                source=what,
            )
        self.usage.pages_billed += pages  # before the await: uploads side by side cannot overrun it together
        try:
            daily = await asyncio.to_thread(self.daily.book, pages, what=what) if self.daily else None
        except BaseException:
            self.usage.pages_billed -= pages
            raise
        return Booking(pages, daily)

    async def release(self, booking: Booking) -> None:
        """Give back the pages of an upload Doc2X refused unbilled (once)."""
        if booking.released:
            return
        booking.released = True
        self.usage.pages_billed -= booking.pages
        if self.daily is not None and booking.daily is not None:
            await asyncio.to_thread(self.daily.release, booking.daily)

    async def unbilled(self, pages: int, *, what: str, sent_at: float) -> None:
        """Give back the pages of a PDF Doc2X took, then refused for the key's limits (it is sent again).

        The key's day gives them back only if the PDF was sent on the day it is now (its booking
        came moments before): pages of a day that is over stay counted there.
        """
        self.usage.pages_billed = max(0, self.usage.pages_billed - pages)
        daily = self.daily
        if daily is None:
            return
        day = daily.day_of(sent_at)
        if day == daily.today():
            await asyncio.to_thread(daily.release, PageBooking(what, pages, day, booked=0, budget=0))

    def reconnected(self, pages: int) -> None:
        """Pages of jobs an earlier try recorded, taken up again without a new upload."""
        self.usage.pages_reconnected += pages

    def possibly_billed_twice(self, pages: int) -> None:
        """Pages sent again after an earlier try's upload of them was never answered."""
        self.usage.pages_possibly_billed_twice += pages

    def waited(self, seconds: float) -> None:
        """Time the worker spent waiting for Doc2X (not deferred)."""
        self._waited += seconds
        self.usage.wait_seconds += seconds

    def _close_share(self) -> None:
        """Add this execution's answers 429 and its time in the worker (less its waits) to the usage."""
        self.usage.rate_limited += max(0, transport.RATE_LIMITED.value - self._rate_limited)
        self.usage.upload_seconds += max(0.0, time.monotonic() - self._began - self._waited)
        self._began, self._rate_limited, self._waited = time.monotonic(), transport.RATE_LIMITED.value, 0.0

    def carried(self) -> dict[str, Any]:
        """What the task carries across a deferral (through its trigger, back in the event): its usage so far."""
        self._close_share()
        return {"usage": self.usage.to_json(), "deferred_at": time.time()}

    @contextmanager
    def reporting(self, *, context: Any, log: Any, model: str, lane: str) -> Iterator[None]:
        """Say the usage of a task that stops on an error (an empty quota, a store down) before its records."""
        try:
            yield
        except TaskDeferred:
            raise
        except BaseException:
            if not self.reported:
                self.report([], context=context, log=log, model=model, lane=lane)
            raise

    def report(
        self, outcomes: list[dict[str, Any]], *, context: Any, log: Any, model: str, lane: str
    ) -> None:
        """Say the task's usage at its end (log, XCom, metrics): reused and failed pages read from its outcomes."""
        self.reported = True
        self._close_share()
        self.usage.pages_reused = sum(_pages(outcome) for outcome in outcomes if outcome.get("cached"))
        self.usage.pages_failed = sum(
            _pages(outcome) for outcome in outcomes if outcome.get("status") is not None
        )
        report_usage(self.usage, context=context, log=log, model=model, lane=lane)


def _pages(outcome: dict[str, Any]) -> int:
    """Pages of one outcome: a record's pages, a document's job's ``pages``, else one."""
    pages = outcome.get("pages")
    if isinstance(pages, list) and pages:
        return len(pages)
    if (
        isinstance(pages, int)
        and not isinstance(pages, bool)
        and pages > 0
        and outcome.get("page_idx") is None
    ):
        return pages
    return 1
