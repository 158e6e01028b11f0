"""A key's PDFs and pages in flight: the PDF lane's per-key limit, beside the image lane's window.

Doc2X refuses a PDF task past a key's tasks or pages in progress (``parse_task_limit_exceeded``,
``parse_concurrency_limit``) and tells so only after the upload. A :class:`PdfBudget` keeps what
this process has in flight for one key within the connection's ``pdf_max_in_flight`` and
``pdf_max_pages_in_flight`` (what pdfdeal bounds), so that few uploads are refused and none is
wasted. It lives on one event loop: the PDFs of a task share the worker's loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from collections.abc import AsyncIterator

from airflow_provider_doc2x.exceptions import Doc2XInputError

__all__ = ["PdfBudget", "pdf_budget_for"]


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


_budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[object, ...], PdfBudget]] = (
    weakref.WeakKeyDictionary()
)


def pdf_budget_for(base_url: str, api_key: str, max_files: int, max_pages: int) -> PdfBudget:
    """The running loop's budget of one key at one endpoint with these limits, shared by its hooks.

    Kept per event loop, since its waiters are the loop's futures; forgotten with the loop.
    """
    budgets = _budgets.setdefault(asyncio.get_running_loop(), {})
    key = (base_url, api_key, max_files, max_pages)
    budget = budgets.get(key)
    if budget is None:
        budget = budgets[key] = PdfBudget(max_files, max_pages)
    return budget
