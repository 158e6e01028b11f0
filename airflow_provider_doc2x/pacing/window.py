"""The rolling window of one key, kept in process memory or in a private file shared by a host's processes.

A window is ``{"open": {slot id: booked at}, "done": [answered at, ...]}``: one slot per upload,
booked at the send (``open``: in flight) and moved to the answer's time at release (``done``, kept
sorted). The file is locked (``fcntl.flock``) while a process reads and rewrites it. Whatever it
holds is checked before it is believed: a file that is not a window, or a slot dated ahead of this
host's clock, starts a new window (with one warning per limiter), so no file content can crash an
upload or stall it for more than one window.

The format is compact on purpose: with a generous key (thousands of uploads per window) the file is
read and rewritten twice per upload, and a list of plain numbers is what JSON reads and writes fastest.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from airflow_provider_doc2x.pacing.private import NotPrivateError, open_private_file

log = logging.getLogger(__name__)

#: An upload still "in flight" after this long is taken for a crashed process and forgotten.
STALE_IN_FLIGHT_SECONDS = 600.0
#: A slot dated further ahead of the clock than this is not believed: the window starts anew. Nearer,
#: it waits one window at most (a clock stepped back a little).
CLOCK_TOLERANCE_SECONDS = 1.0
#: A window file longer than this is not a window (a slot takes about 70 bytes).
MAX_STATE_BYTES = 1 << 20


@dataclass
class Window:
    """The slots of a window: in flight by id (their booking time), and answered (their times, sorted)."""

    open: dict[str, float] = field(default_factory=dict)
    done: list[float] = field(default_factory=list)

    def to_json(self) -> bytes:
        """The window as the file holds it."""
        return json.dumps({"open": self.open, "done": self.done}, separators=(",", ":")).encode()


def valid_window(data: object, *, now: float, window: float) -> Window | None:
    """``data`` as a window if it is one, with no slot dated more than ``window`` ahead; else None."""
    if not isinstance(data, dict) or data.keys() != {"open", "done"}:
        return None
    booked, answered = data["open"], data["done"]
    if not isinstance(booked, dict) or not isinstance(answered, list):
        return None
    latest = now + window
    times = [*booked.values(), *answered]
    # JSON gives float for 1.0, 1e400 (inf) and NaN, int for 1 and for a 400-digit number: only finite
    # floats and ints in range are times.
    if not all((type(at) is float or type(at) is int) and -latest <= at <= latest for at in times):
        return None
    return Window(
        open={str(slot_id): float(at) for slot_id, at in booked.items()},
        done=sorted(float(at) for at in answered),
    )


class RateLimiter:
    """A rolling-window limiter: at most ``limit`` uploads whose slots fall in any ``window`` seconds.

    The server counts an upload when it arrives, somewhere between our send and its answer. So a
    slot is booked at the send (to space the sends) and moved to the answer's time when the upload
    ends (so the next window is measured from a time that is never earlier than the server's).
    While an upload is in flight, its slot counts as taken now.

    ``state_file`` (a path, or a function that gives it at first use) shares the window with the
    other processes of the host; its folder must be private to this user. Without it, or when the
    folder or file cannot be trusted, the window lives in this process's memory.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        state_file: Path | Callable[[], Path] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if limit < 1 or not window > 0 or not math.isfinite(window):
            raise ValueError(f"A rate limit needs limit >= 1 and window > 0, got {limit} per {window}s")
        self.limit = limit
        self.window = float(window)
        self.state_file = state_file
        self._clock = clock
        self._memory = Window()
        self._lock = threading.Lock()
        #: The file could not be trusted: this limiter paces in memory from then on.
        self._in_memory = state_file is None
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    def _first_warning(self, kind: str) -> bool:
        """Whether this limiter has yet to warn of this kind (then it counts as warned)."""
        with self._warned_lock:
            if kind in self._warned:
                return False
            self._warned.add(kind)
            return True

    def _state_path(self) -> Path:
        assert self.state_file is not None
        return self.state_file if isinstance(self.state_file, Path) else self.state_file()

    def _open_state(self) -> int | None:
        """The locked window file's descriptor, or None to pace in memory (with one warning)."""
        if self._in_memory:
            return None
        path = self._state_path()
        try:
            fd = open_private_file(path.parent, path.name)
        except NotPrivateError as error:
            self._in_memory = True
            log.warning(
                "Doc2X pacing: %s, so another local user could read or change the upload window there. "
                "This process paces the key on its own from now on (other processes of the host do not "
                "see its uploads). Remove %s, or set DOC2X_PACING_DIR to a folder of this user with mode 0700.",
                error,
                error.path,
            )
            return None
        except OSError as error:
            self._in_memory = True
            log.warning(
                "Doc2X pacing: the window file %s cannot be opened (%s). This process paces the key on "
                "its own from now on. Set DOC2X_PACING_DIR to a folder this user can write.",
                path,
                error,
            )
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read(self, fd: int, now: float) -> Window:
        raw = os.pread(fd, MAX_STATE_BYTES + 1, 0)
        if not raw:
            return Window()  # a new file
        try:
            slots = valid_window(json.loads(raw), now=now, window=self.window)
        except (ValueError, RecursionError):  # not JSON (or not UTF-8)
            slots = None
        if slots is None or len(raw) > MAX_STATE_BYTES:
            self._distrust(f"the window file {self._state_path()} does not hold a valid window")
            return Window()
        return slots

    def _distrust(self, what: str) -> None:
        if not self._first_warning("distrust"):
            return
        log.warning(
            "Doc2X pacing: %s (it was changed by hand or by another program, or this host's clock was "
            "set back); it starts anew. Uploads go on; a few may be answered 429 and retried.",
            what,
        )

    @contextmanager
    def _slots(self) -> Iterator[tuple[Window, float]]:
        """The window and the time, locked for this thread and, with a file, for every process."""
        with self._lock:
            fd = self._open_state()
            if fd is None:
                yield self._memory, self._clock()
                return
            try:
                now = self._clock()  # once the lock is ours: the slot is dated when it is booked
                slots = self._read(fd, now)
                yield slots, now
                data = slots.to_json()
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))  # after the write: cutting a file to nothing first is slower
            finally:
                os.close(fd)  # and with it the lock

    def reserve(self) -> tuple[float, str | None]:
        """Book a slot now if the window has room: return ``(0, slot_id)``; else ``(wait, None)``.

        An upload still in flight counts as happening now: when it ends is not known yet, so the
        window cannot be measured from its start. The caller waits and asks again. The wait is
        never longer than the window.
        """
        with self._slots() as (slots, now):
            stale = [slot_id for slot_id, at in slots.open.items() if at <= now - STALE_IN_FLIGHT_SECONDS]
            for slot_id in stale:
                del slots.open[slot_id]
            del slots.done[: bisect.bisect_right(slots.done, now - self.window)]
            in_flight = [max(at, now) for at in slots.open.values()]
            if len(slots.done) + len(in_flight) >= self.limit:
                # The limit-th newest slot decides when a new one fits: in-flight slots count as now.
                times = sorted([*slots.done[-self.limit :], *in_flight])
                ahead = times[-self.limit] - now  # > 0 only for a slot dated ahead of the clock
                if ahead > CLOCK_TOLERANCE_SECONDS:
                    self._distrust("the upload window held a slot dated ahead of this host's clock")
                    slots.open.clear()
                    slots.done.clear()
                    return self.window, None
                return min(ahead, 0.0) + self.window, None
            slot_id = uuid.uuid4().hex
            slots.open[slot_id] = now
            return 0.0, slot_id

    def release(self, slot_id: str, *, ended: float | None = None) -> None:
        """The upload ended: its slot now counts from its end, no longer as in flight.

        ``ended`` is when the answer came (this host's clock), if the caller took it before handing
        the release to a thread: the slot is not dated later than it ended, by however long the
        thread took to run. Never earlier than the answer, so the window keeps its rule.
        """
        with self._slots() as (slots, now):
            booked = slots.open.pop(slot_id, None)
            if booked is not None:
                bisect.insort(slots.done, max(booked, min(now, ended) if ended is not None else now))

    def close(self) -> None:
        """Let go of what the limiter holds open (nothing for a host-local window)."""

    @contextmanager
    def upload(self) -> Iterator[None]:
        """Wait for room in the window (blocking: workers only), then hold a slot while the upload runs."""
        while True:
            delay, slot_id = self.reserve()
            if slot_id is not None:
                break
            time.sleep(min(delay, self.window))
        try:
            yield
        finally:
            self.release(slot_id)

    @asynccontextmanager
    async def aupload(self) -> AsyncIterator[None]:
        """:meth:`upload` for an event loop: the window is read and written in a thread, the wait is async.

        A booking that the caller gave up on (cancelled) while its thread ran is released as soon as
        the thread returns, so a cancelled upload never holds a slot.
        """
        while True:
            booking = asyncio.ensure_future(asyncio.to_thread(self.reserve))
            try:
                delay, slot_id = await asyncio.shield(booking)
            except asyncio.CancelledError:
                booking.add_done_callback(self._release_abandoned)
                raise
            if slot_id is not None:
                break
            await asyncio.sleep(min(delay, self.window))
        try:
            yield
        finally:
            ended = self._clock()
            # Shielded: a cancelled caller still frees its slot (the thread runs to its end anyway).
            await asyncio.shield(asyncio.to_thread(self.release, slot_id, ended=ended))

    def _release_abandoned(self, booking: asyncio.Future[tuple[float, str | None]]) -> None:
        if booking.cancelled() or booking.exception() is not None:
            return
        slot_id = booking.result()[1]
        if slot_id is not None:
            booking.get_loop().run_in_executor(None, self.release, slot_id)
