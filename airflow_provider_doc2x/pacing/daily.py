"""The key's daily page budget: the pages every task of every host may have billed in one day.

Doc2X bills a key by the page. A DAG gone wrong (a backfill over a year of folders, a prefix that
names a whole bucket, a loop of clears) can bill in an afternoon what was meant for a month, and
nothing on the service's side stops it before the invoice. The connection's ``daily_page_budget``
caps what this provider sends for a key in one day of ``budget_timezone``: each PDF's pages are
booked before it is sent (:meth:`DailyPageBudget.book`), and a PDF that would go past the budget is
refused, named, before a byte of it leaves the worker.

**Where it is counted.** Where the key is paced (:mod:`~airflow_provider_doc2x.pacing`): with
``pacing_conn_id``, in Redis, for every host that uses it; without, in the host's private pacing
folder, for the processes of that host alone (then each host has a budget of its own). Both are
named by the key's digest; the key itself is never written.

**It fails closed.** Pacing goes on without its store (a few 429 answers cost nothing); a budget
that cannot be counted must not let pages through, so a booking raises
:class:`~airflow_provider_doc2x.exceptions.Doc2XBudgetUnavailableError` while Redis cannot be
reached, the folder or file is not private to this user, or the file cannot be read. A booking whose
answer is lost on the way back (Redis timed out after the script ran) still counts: the budget errs
towards refusing, never towards billing.

**What it cannot know.** Pages billed for the key by other programs (the vendor's SDK, another
Airflow, another Redis), and how the service counts a page when that differs from the pages the
worker counted. It counts what this provider booked, and gives pages back only for uploads refused
unbilled (:meth:`DailyPageBudget.release`).

**The day** is the booking host's clock read in ``budget_timezone``. Hosts whose clocks disagree
count a booking made around midnight on different days; connections of one key should name the
same time zone, since their days are counted under the same dates.

**The file** ``<pacing dir>/<digest>.budget.json`` holds one JSON object::

    {"version": 1, "days": {"2026-12-07": 480, "2026-12-06": 1000}}

``days`` maps a day of the budget (an ISO date) to the pages booked that day; the last
:data:`KEEP_DAYS` days are kept. The file is locked (``fcntl.flock``) while a process reads and
rewrites it, and is private to the user as the window file is
(:mod:`~airflow_provider_doc2x.pacing.private`). ``version`` is the format the file was last written
in; ``days`` keeps its meaning in every later version, and what a later release adds goes into
fields of its own. So a reader of this release keeps every field it does not know, as it found it,
never writes a version lower than the one it read, and uses a file of a later version when its
``days`` read as this release knows them. Anything else fails closed, naming the file: a later
version whose ``days`` this release cannot read, and contents that are not a budget (not JSON,
wrong types). Starting such a file anew would forget the pages billed today; removing it by hand
does exactly that, knowingly.

**In Redis** the key ``doc2x:pacing:<digest>:budget:<YYYY-MM-DD>`` holds the pages booked that day
as a plain integer; a short Lua script checks the budget and books in one step
(:data:`BOOK_SCRIPT`), another gives pages back (:data:`RELEASE_SCRIPT`). Each key expires
:data:`REDIS_KEEP_SECONDS` after its last booking. A key that does not hold a whole number fails
closed, naming it. A later release that needs more than a number per day keeps it under keys of
another name (``doc2x:pacing:<digest>:<name>``), as the window's own set and rule already are.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from airflow_provider_doc2x.exceptions import Doc2XBudgetError, Doc2XBudgetUnavailableError, printable
from airflow_provider_doc2x.pacing.private import NotPrivateError, open_private_file
from airflow_provider_doc2x.pacing.redis_window import redis_client

__all__ = [
    "BUDGET_FORMAT_VERSION",
    "KEEP_DAYS",
    "DailyPageBudget",
    "PageBooking",
]

log = logging.getLogger(__name__)

#: The budget file's format, as this release writes it.
BUDGET_FORMAT_VERSION = 1
#: Days a budget file keeps: today, and a few before it for whoever looks.
KEEP_DAYS = 7
#: A budget file longer than this is not a budget (seven days take under 200 bytes).
MAX_BUDGET_BYTES = 64 << 10
#: A day's key in Redis lives this long after its last booking: past its day in any time zone.
REDIS_KEEP_SECONDS = 2 * 24 * 3600

#: Book ARGV[1] pages on the day's key KEYS[1] if they fit in the budget ARGV[2]; keep the key
#: ARGV[3] seconds. Returns {1, booked} when booked (booked: the day's pages, these included),
#: {0, booked} when they do not fit (nothing changed), {-1, 0} when the key holds no whole number.
BOOK_SCRIPT = """
local booked = redis.call('GET', KEYS[1])
if booked == false then booked = 0 else booked = tonumber(booked) end
if booked == nil or booked < 0 or booked ~= math.floor(booked) then return {-1, 0} end
local pages, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
if booked + pages > budget then return {0, booked} end
booked = redis.call('INCRBY', KEYS[1], pages)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, booked}
"""

#: Give ARGV[1] pages back to the day's key KEYS[1], never below zero; a missing key stays missing.
#: Returns the day's pages after it, or -1 when the key holds no whole number (nothing changed).
RELEASE_SCRIPT = """
local booked = redis.call('GET', KEYS[1])
if booked == false then return 0 end
booked = tonumber(booked)
if booked == nil or booked ~= math.floor(booked) then return -1 end
local back = math.min(tonumber(ARGV[1]), booked)
if back > 0 then return redis.call('DECRBY', KEYS[1], back) end
return booked
"""


class _Unavailable(Exception):
    """The budget's store cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class PageBooking:
    """Pages booked for one file on one day of the budget: what :meth:`DailyPageBudget.release` takes back."""

    #: The file or PDF the pages are for, as the caller named it.
    what: str
    pages: int
    #: The budget's day they count on (an ISO date in the budget's time zone).
    day: str
    #: The day's pages once these were booked, and the budget they fit in (for logs).
    booked: int
    budget: int
    booking_id: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False)

    @property
    def remaining(self) -> int:
        """Pages left for the day right after this booking."""
        return max(0, self.budget - self.booked)


class DailyPageBudget:
    """At most ``budget`` pages booked per day of ``timezone`` for one key, in Redis or in a host's file.

    With ``redis_conn_id`` (an Airflow connection of type ``redis``) the day is counted in Redis,
    for every host; else in ``state_file`` (a path, or a function that gives it at first use), whose
    folder must be private to this user. ``clock`` (seconds since the epoch) says what day it is.
    Nothing is opened or looked up until the first call.
    """

    #: Seconds a Redis call may take before the budget counts as unavailable.
    socket_timeout = 2.0

    def __init__(
        self,
        budget: int,
        *,
        digest: str,
        timezone: str = "UTC",
        redis_conn_id: str | None = None,
        state_file: Path | Callable[[], Path] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if budget < 1:
            raise ValueError(f"A daily page budget needs at least 1 page, got {budget}")
        if not redis_conn_id and state_file is None:
            raise ValueError("A daily page budget needs a place: redis_conn_id or state_file")
        self.budget = budget
        #: The key's digest (:func:`~airflow_provider_doc2x.pacing.key_digest`): its name in the store.
        self.digest = digest
        self.timezone = timezone
        self.redis_conn_id = redis_conn_id or None
        self.state_file = state_file
        self._zone = ZoneInfo(timezone)
        self._clock = clock
        self._client_lock = threading.Lock()
        self._client: Any = None
        self._scripts_of_client: tuple[Any, Any] | None = None
        self._released: set[str] = set()
        self._released_lock = threading.Lock()

    def today(self) -> str:
        """The budget's day now: the clock's date in the budget's time zone (ISO)."""
        return self.day_of(self._clock())

    def day_of(self, timestamp: float) -> str:
        """The budget's day of a moment (seconds since the epoch), in the budget's time zone (ISO)."""
        return datetime.datetime.fromtimestamp(timestamp, tz=self._zone).date().isoformat()

    def book(self, pages: int, *, what: str) -> PageBooking:
        """Book ``pages`` for ``what`` (a file or PDF) on today's budget, in one step with every other host.

        Raises:
            Doc2XBudgetError: today's pages booked so far plus these would pass the budget; nothing
                was booked.
            Doc2XBudgetUnavailableError: the store cannot be reached or read; nothing is sent (the
                pages may count all the same when Redis booked them and its answer was lost).
        """
        if pages < 1:
            raise ValueError(f"A booking needs at least 1 page, got {pages}")
        day = self.today()
        try:
            fits, booked = self._book(day, pages)
        except _Unavailable as error:
            raise Doc2XBudgetUnavailableError(
                f"{printable(what)} is not sent: the key's daily page budget cannot be counted: {error}",
                source=what,
            ) from error
        if not fits:
            raise Doc2XBudgetError(self._refusal(what, pages, booked, day), source=what)
        log.debug("Doc2X budget: %s: %d pages booked, %d of %d for %s", what, pages, booked, self.budget, day)
        return PageBooking(what=what, pages=pages, day=day, booked=booked, budget=self.budget)

    def _refusal(self, what: str, pages: int, booked: int, day: str) -> str:
        left = max(0, self.budget - booked)
        message = (
            f"{printable(what)} is not sent: its {pages} pages would pass the key's daily page budget: "
            f"{booked} of {self.budget} pages are booked for {day} ({self.timezone}), {left} are left. "
        )
        if pages > self.budget:
            message += "It is larger than the whole budget: split it, or raise "
        else:
            message += f"It can be sent after midnight ({self.timezone}), or raise "
        return message + "the connection extra daily_page_budget."

    def release(self, booking: PageBooking) -> None:
        """Give back the pages of an upload refused unbilled: a 429, a limit code, a reset before its body.

        Only on the day it was booked (a day that is over keeps its count), once per booking, and
        never below zero. A store that cannot be reached keeps the pages counted: that is logged,
        not raised, since the upload's own failure is what the caller reports.
        """
        with self._released_lock:
            if booking.booking_id in self._released:
                return
            self._released.add(booking.booking_id)
        if booking.day != self.today():
            log.info(
                "Doc2X budget: %d pages of %s are not given back: booked for %s, a day that is over",
                booking.pages,
                booking.what,
                booking.day,
            )
            return
        try:
            self._release(booking.day, booking.pages)
        except _Unavailable as error:
            log.warning(
                "Doc2X budget: the %d pages of %s, refused unbilled, could not be given back and stay "
                "counted for %s: %s",
                booking.pages,
                booking.what,
                booking.day,
                error,
            )

    def remaining(self) -> int:
        """Pages left for today (for logs and dry runs).

        Raises:
            Doc2XBudgetUnavailableError: the store cannot be reached or read.
        """
        day = self.today()
        try:
            booked = self._booked(day)
        except _Unavailable as error:
            raise Doc2XBudgetUnavailableError(
                f"The key's daily page budget cannot be read: {error}"
            ) from error
        return max(0, self.budget - booked)

    # The store: Redis when the connection names one, else the host's file.

    def _book(self, day: str, pages: int) -> tuple[bool, int]:
        """Whether the pages fit, and the day's pages after the booking (or before a refusal)."""
        if self.redis_conn_id:
            book, _ = self._scripts()
            answer = self._redis_call(
                lambda key: book(keys=[key], args=[pages, self.budget, REDIS_KEEP_SECONDS]), day
            )
            state, booked = int(answer[0]), int(answer[1])
            if state < 0:
                raise self._not_a_count(day)
            return state == 1, booked
        with self._file_days() as days:
            booked = days.get(day, 0)
            if booked + pages > self.budget:
                return False, booked
            days[day] = booked + pages
            return True, booked + pages

    def _release(self, day: str, pages: int) -> None:
        if self.redis_conn_id:
            _, release = self._scripts()
            if int(self._redis_call(lambda key: release(keys=[key], args=[pages]), day)) < 0:
                raise self._not_a_count(day)
            return
        with self._file_days() as days:
            if day in days:
                days[day] = max(0, days[day] - pages)

    def _booked(self, day: str) -> int:
        if self.redis_conn_id:
            self._scripts()
            raw = self._redis_call(lambda key: self._client.get(key), day)
            try:
                booked = 0 if raw is None else int(raw)
            except ValueError:
                raise self._not_a_count(day) from None
            return booked
        with self._file_days() as days:
            return days.get(day, 0)

    def redis_key(self, day: str) -> str:
        """The Redis key of one day's pages."""
        return f"doc2x:pacing:{self.digest}:budget:{day}"

    def _not_a_count(self, day: str) -> _Unavailable:
        return _Unavailable(
            f"the Redis key {self.redis_key(day)} (connection {self.redis_conn_id!r}) does not hold a "
            "number of pages. Nothing is sent while the day cannot be counted; delete the key to count "
            "the day anew from 0 (the pages already billed today are then not counted)."
        )

    def _scripts(self) -> tuple[Any, Any]:
        """The booking and release scripts, on a client built from the Redis connection at first use."""
        with self._client_lock:
            if self._scripts_of_client is None:
                assert self.redis_conn_id is not None
                try:
                    client = redis_client(self.redis_conn_id, self.socket_timeout)
                except Exception as error:  # a missing provider or connection: fails closed
                    raise self._redis_failed(error) from error
                self._client = client
                self._scripts_of_client = (
                    client.register_script(BOOK_SCRIPT),
                    client.register_script(RELEASE_SCRIPT),
                )
            return self._scripts_of_client

    def _redis_call(self, call: Callable[[str], Any], day: str) -> Any:
        """``call`` on the day's key, or fail closed."""
        try:
            return call(self.redis_key(day))
        except Exception as error:  # whatever fails in Redis, no page goes uncounted
            raise self._redis_failed(error) from error

    def _redis_failed(self, error: Exception) -> _Unavailable:
        self.close()  # the next call reads the connection again: it may have been fixed
        return _Unavailable(
            f"the Redis connection {self.redis_conn_id!r} failed ({type(error).__name__}: {error}). Nothing "
            "is sent while Redis cannot count the day (the budget fails closed); the task's retries try "
            "again. Fix Redis or the connection, or empty the connection extra daily_page_budget to send "
            "without a budget."
        )

    def _state_path(self) -> Path:
        assert self.state_file is not None
        return self.state_file if isinstance(self.state_file, Path) else self.state_file()

    @contextlib.contextmanager
    def _file_days(self) -> Iterator[dict[str, int]]:
        """The file's days, locked for every process of the host; rewritten when the block changed them."""
        path = self._state_path()
        try:
            fd = open_private_file(path.parent, path.name)
        except NotPrivateError as error:
            raise _Unavailable(
                f"{error}, so another local user could change the count there. Nothing is sent while it "
                f"cannot be trusted. Remove {error.path}, or set DOC2X_PACING_DIR to a folder of this "
                "user with mode 0700."
            ) from error
        except OSError as error:
            raise _Unavailable(
                f"the budget file {path} cannot be opened ({error}). Set DOC2X_PACING_DIR to a folder "
                "this user can write."
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            contents = _read_budget_file(os.pread(fd, MAX_BUDGET_BYTES + 1, 0), path)
            days = dict(contents["days"])
            yield days
            if days != contents["days"]:
                kept = sorted(days.items(), reverse=True)[:KEEP_DAYS]
                contents["days"] = dict(sorted(kept))
                data = json.dumps(contents, separators=(",", ":")).encode()
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
        except OSError as error:
            raise _Unavailable(f"the budget file {path} cannot be read or written ({error})") from error
        finally:
            os.close(fd)  # and with it the lock

    def close(self) -> None:
        """Let go of the Redis client."""
        with self._client_lock:
            client, self._client = self._client, None
            self._scripts_of_client = None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken client can fail too; nothing is lost
                log.debug("Doc2X budget: closing the Redis client failed", exc_info=True)


def _read_budget_file(raw: bytes, path: Path) -> dict[str, Any]:
    """The budget file's contents, every field kept; raises :class:`_Unavailable` for what is not a budget."""
    if not raw:
        return {"version": BUDGET_FORMAT_VERSION, "days": {}}
    data: object = None
    if len(raw) <= MAX_BUDGET_BYTES:
        with contextlib.suppress(ValueError, RecursionError):  # not JSON (or not UTF-8)
            data = json.loads(raw)
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or type(version) is not int or version < 1:
        raise _Unavailable(
            f"the budget file {path} does not hold a page budget. Nothing is sent while today's pages "
            "cannot be counted. If it was damaged, remove it: today's count then starts again at 0, "
            "without the pages already billed today."
        )
    if not _valid_days(data.get("days")):
        if version > BUDGET_FORMAT_VERSION:
            raise _Unavailable(
                f"the budget file {path} was written by a later release of airflow-provider-doc2x "
                f"(format {version}; this release reads up to {BUDGET_FORMAT_VERSION}) in a form this "
                "release cannot read. Nothing is sent until the provider is upgraded on this host."
            )
        raise _Unavailable(
            f"the budget file {path} does not hold a page budget (its days are not dates and pages). "
            "Nothing is sent while today's pages cannot be counted. If it was damaged, remove it: "
            "today's count then starts again at 0, without the pages already billed today."
        )
    return data


def _valid_days(days: object) -> bool:
    """Whether ``days`` maps ISO dates to whole, finite page counts of 0 or more."""
    if not isinstance(days, dict):
        return False
    for day, pages in days.items():
        try:
            if datetime.date.fromisoformat(day).isoformat() != day:
                return False
        except (TypeError, ValueError):
            return False
        if type(pages) is not int or pages < 0:
            return False
    return True
