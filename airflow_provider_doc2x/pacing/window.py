"""The rolling window of one key, kept in process memory or in a private file shared by a host's processes.

A window file holds one JSON object::

    {"version": 2, "open": {"<slot id>": [booked at, expires at], ...}, "done": [answered at, ...]}

one slot per upload, booked at the send (``open``: in flight) and moved to the answer's time at
release (``done``, kept sorted). A slot in flight carries its own expiry, the longest its upload may
take (:func:`lease_seconds`: the connection's ``timeout`` plus a margin), renewed while its holder
still runs; hosts and tasks with different connections share one window. A slot whose holder died
(killed, its host lost) is not renewed: at its expiry it counts as answered then, so the key is
free again one window later, not after a fixed ten minutes. The file is locked (``fcntl.flock``)
while a process reads and rewrites it.

**Versions, and what a reader keeps.** ``version`` is the format the file was last written in. The
unversioned file of earlier releases is version 1: ``open`` maps a slot to its booking time alone,
and such a slot expires :data:`LEGACY_IN_FLIGHT_SECONDS` after it. ``open`` and ``done`` keep their
meaning in every later version; what a later release adds for a key (a learned rule, a daily page
budget) goes into fields of its own beside them. So a reader of this release:

- keeps every field it does not know, as it found it, when it rewrites the file, and never writes
  a version lower than the one it read;
- uses a file of a higher version when its ``open`` and ``done`` read as this release knows them.
  When they do not, it leaves the file untouched and this process paces the key on its own, in
  memory, with one warning to upgrade: an older release never resets or downgrades a newer one's
  window;
- starts a window anew (with one warning per limiter, keeping the fields it does not know) only
  for contents of its own version or lower that are not a window: not JSON, wrong types, a time
  that is not a finite number, an answered slot or a booking dated more than one window ahead of
  this host's clock, an expiry more than one window plus :data:`MAX_LEASE_SECONDS` ahead. So no file content can crash an upload, and
  none holds uploads back for longer than :data:`MAX_LEASE_SECONDS` plus two windows (a slot in
  flight with the longest lease there is, then counted for one window from its expiry). The folder
  is private to the user (:mod:`~airflow_provider_doc2x.pacing.private`): only the user's own
  programs can write such a file.

**Clocks.** The file is dated by this host's wall clock (``time.time``), which every process of the
host shares and which means the same after a reboot. A slot dated ahead of it (the clock was stepped
back, by at most one window: further is not a window) is waited out: it counts at its own time,
so the window is never wiped for it. A step forward while uploads are in flight shortens their
slots' leases by the step: a step longer than what is left of a lease (at most the connection's
timeout plus 5 s) lets those slots count as answered at their expiry, so up to ``limit`` uploads
more may start within that window, and the server's 429s are retried.

Releases before version 2 start anew any file that holds more than ``open`` and ``done``: run one
release per host (and per Redis) while such a release is still deployed.

The format is compact on purpose: with a generous key (thousands of uploads per window) the file is
read and rewritten twice per upload, and lists of plain numbers are what JSON reads and writes fastest.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
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
from typing import Any

from airflow_provider_doc2x.pacing.private import NotPrivateError, open_private_file

log = logging.getLogger(__name__)

#: The format this release writes (see the module's doc).
FORMAT_VERSION = 2
#: The unversioned format's slots in flight carry no expiry; their writers forgot them after this long.
LEGACY_IN_FLIGHT_SECONDS = 600.0
#: Added to the connection's timeout: a slot is booked a moment before its exchange starts.
IN_FLIGHT_MARGIN_SECONDS = 5.0
#: The longest lease a slot gets; an upload that takes longer renews its slot meanwhile. Without a
#: connection timeout (a limiter built without one), slots get this lease.
MAX_LEASE_SECONDS = 600.0
#: A window file longer than this is not a window (a slot takes about 70 bytes).
MAX_STATE_BYTES = 1 << 20
#: The fields of a window file that this release reads; any other is kept as it is.
_WINDOW_FIELDS = ("version", "open", "done")


def lease_seconds(upload_timeout: float | None) -> float:
    """How long a slot in flight is held without renewal: the upload's deadline plus a margin.

    The transport runs each upload's whole exchange (connect, send, answer) under the connection's
    ``timeout`` and books a new slot for each retry, so one slot never spans more than one exchange.
    A holder that still runs renews its slot (see :meth:`RateLimiter.aupload`), so an upload that
    waited before its exchange started keeps its slot; a holder that died frees it at the lease's end.
    """
    if upload_timeout is None or not upload_timeout > 0 or not math.isfinite(upload_timeout):
        return MAX_LEASE_SECONDS
    return min(float(upload_timeout) + IN_FLIGHT_MARGIN_SECONDS, MAX_LEASE_SECONDS)


@dataclass
class Window:
    """The slots of a window, and what its file holds beside them.

    ``open``: the slots in flight by id, as ``(booked at, expires at)``; ``done``: the answered
    slots' times, sorted; ``version``: the format the file was read in; ``extra``: the fields this
    release does not know, written back as they were read.
    """

    open: dict[str, tuple[float, float]] = field(default_factory=dict)
    done: list[float] = field(default_factory=list)
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The window as the file holds it: never in a version lower than it was read in."""
        data = {"version": max(self.version, FORMAT_VERSION), "open": self.open, "done": self.done}
        return json.dumps({**data, **self.extra}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class NewerWindow:
    """A window of a later format whose slots this release cannot read: left as it is."""

    version: int


def _is_time(value: object, latest: float) -> bool:
    # JSON gives float for 1.0, 1e400 (inf) and NaN, int for 1 and for a 400-digit number: only finite
    # floats and ints in range are times.
    return (type(value) is float or type(value) is int) and -latest <= value <= latest


def _slots_of(booked: object, answered: object, version: int, *, now: float, window: float) -> Window | None:
    """The slots of a file's ``open`` and ``done`` as this release reads them; None if they are not."""
    if not isinstance(booked, dict) or not isinstance(answered, list):
        return None
    latest = now + window
    if not all(_is_time(at, latest) for at in answered):
        return None
    slots: dict[str, tuple[float, float]] = {}
    if version == 1:  # booking times alone: the slot expired LEGACY_IN_FLIGHT_SECONDS later
        for slot_id, at in booked.items():
            if not _is_time(at, latest):
                return None
            slots[slot_id] = (float(at), float(at) + LEGACY_IN_FLIGHT_SECONDS)
    else:
        furthest = latest + MAX_LEASE_SECONDS
        for slot_id, entry in booked.items():
            if not (type(entry) is list and len(entry) == 2):
                return None
            at, expires = entry
            if not (_is_time(at, latest) and _is_time(expires, furthest) and at <= expires):
                return None
            slots[slot_id] = (float(at), float(expires))
    return Window(open=slots, done=sorted(float(at) for at in answered), version=version)


def valid_window(data: object, *, now: float, window: float) -> Window | NewerWindow | None:
    """``data`` as a window, with no slot dated more than ``window`` ahead (expiries: a lease more).

    A :class:`NewerWindow` when it is of a later format whose ``open`` or ``done`` this release cannot
    read (to be left alone); None when it is not a window (to be started anew). Fields this release
    does not know are kept in :attr:`Window.extra`.
    """
    if not isinstance(data, dict):
        return None
    version = data.get("version", 1)
    if type(version) is not int or version < 1:
        return None
    slots = _slots_of(data.get("open"), data.get("done"), version, now=now, window=window)
    if slots is None:
        return NewerWindow(version) if version > FORMAT_VERSION else None
    slots.extra = {name: value for name, value in data.items() if name not in _WINDOW_FIELDS}
    return slots


def anew(data: object) -> Window:
    """An empty window that keeps what the file held beside its slots (a later release's fields).

    Why: slots this release cannot trust are dropped, but a budget or a learned rule that a later
    release keeps in the same file is not this release's to wipe.
    """
    if not isinstance(data, dict):
        return Window()
    version = data.get("version")
    kept = {name: value for name, value in data.items() if name not in _WINDOW_FIELDS}
    if type(version) is int and version > FORMAT_VERSION:
        return Window(version=version, extra=kept)
    return Window(extra=kept)


class RateLimiter:
    """A rolling-window limiter: at most ``limit`` uploads whose slots fall in any ``window`` seconds.

    The server counts an upload when it arrives, somewhere between our send and its answer. So a
    slot is booked at the send (to space the sends) and moved to the answer's time when the upload
    ends (so the next window is measured from a time that is never earlier than the server's).
    While an upload is in flight, its slot counts as taken now; a slot whose holder died counts from
    its expiry (``upload_timeout``, the connection's timeout, sets it: :func:`lease_seconds`).

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
        upload_timeout: float | None = None,
    ) -> None:
        if limit < 1 or not window > 0 or not math.isfinite(window):
            raise ValueError(f"A rate limit needs limit >= 1 and window > 0, got {limit} per {window}s")
        self.limit = limit
        self.window = float(window)
        self.state_file = state_file
        #: Seconds a slot in flight is held past its booking or last renewal (see :func:`lease_seconds`).
        self.lease = lease_seconds(upload_timeout)
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

    def _read(self, fd: int, now: float) -> Window | None:
        """The file's window; None for a later format's window that this release must leave alone."""
        raw = os.pread(fd, MAX_STATE_BYTES + 1, 0)
        if not raw:
            return Window()  # a new file
        data: object = None
        if len(raw) <= MAX_STATE_BYTES:
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON (or not UTF-8)
                data = None
        slots = valid_window(data, now=now, window=self.window)
        if isinstance(slots, NewerWindow):
            self._newer(f"the window file {self._state_path()}", slots.version)
            return None
        if slots is None:
            self._distrust(f"the window file {self._state_path()} does not hold a valid window")
            return anew(data)
        return slots

    def _distrust(self, what: str) -> None:
        if not self._first_warning("distrust"):
            return
        log.warning(
            "Doc2X pacing: %s (it was changed by hand or by another program, or this host's clock was "
            "set back); it starts anew. Uploads go on; a few may be answered 429 and retried.",
            what,
        )

    def _newer(self, what: str, version: int) -> None:
        if not self._first_warning("newer"):
            return
        log.warning(
            "Doc2X pacing: %s was written by a later release of airflow-provider-doc2x (format %d; this "
            "release reads up to %d) in a form this release cannot use. It is left as it is, and this "
            "process paces the key on its own meanwhile. Upgrade the provider on every host that shares it.",
            what,
            version,
            FORMAT_VERSION,
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
                if slots is None:  # a later release's window: untouched, this process paces alone
                    yield self._memory, now
                    return
                yield slots, now
                data = slots.to_json()
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))  # after the write: cutting a file to nothing first is slower
            finally:
                os.close(fd)  # and with it the lock

    def reserve(self) -> tuple[float, str | None]:
        """Book a slot now if the window has room: return ``(0, slot_id)``; else ``(wait, None)``.

        An upload still in flight counts as happening now: when it ends is not known yet, so the
        window cannot be measured from its start. A slot past its expiry (its holder died) counts
        from its expiry. The caller waits and asks again. The wait is never longer than the window.
        """
        with self._slots() as (slots, now):
            expired = [(slot_id, expires) for slot_id, (_, expires) in slots.open.items() if expires <= now]
            for slot_id, expires in expired:
                del slots.open[slot_id]
                bisect.insort(slots.done, expires)
            del slots.done[: bisect.bisect_right(slots.done, now - self.window)]
            in_flight = [max(at, now) for at, _ in slots.open.values()]
            if len(slots.done) + len(in_flight) >= self.limit:
                # The limit-th newest slot decides when a new one fits: in-flight slots count as now, a
                # slot dated ahead of the clock (stepped back) at its own time, waited out a window at a time.
                times = sorted([*slots.done[-self.limit :], *in_flight])
                return min(times[-self.limit] - now, 0.0) + self.window, None
            slot_id = uuid.uuid4().hex
            slots.open[slot_id] = (now, now + self.lease)
            return 0.0, slot_id

    def renew(self, slot_id: str) -> bool:
        """Hold ``slot_id`` for another lease from now; whether the window still held it unexpired.

        False when the window no longer holds the slot: it expired (its holder was stopped or starved
        longer than its lease), or the window started anew. An expired slot then counts from its
        expiry, as :meth:`reserve` counts it: the window may have booked another in its place, so an
        upload that has not been sent yet must book a slot again (:meth:`PacedUpload.confirm`).
        """
        with self._slots() as (slots, now):
            held = slots.open.get(slot_id)
            if held is None:
                return False
            if held[1] <= now:
                del slots.open[slot_id]
                bisect.insort(slots.done, held[1])
                return False
            slots.open[slot_id] = (held[0], max(held[1], now + self.lease))
            return True

    def release(self, slot_id: str, *, ended: float | None = None) -> None:
        """The upload ended: its slot now counts from its end, no longer as in flight.

        ``ended`` is when the answer came (this host's clock), if the caller took it before handing
        the release to a thread: the slot is not dated later than it ended, by however long the
        thread took to run. Never earlier than the answer, so the window keeps its rule. A slot the
        window no longer holds (it expired while its holder was stalled, or the window started
        anew) is counted from the answer all the same: the upload was sent.
        """
        with self._slots() as (slots, now):
            held = slots.open.pop(slot_id, None)
            answered = min(now, ended) if ended is not None else now
            bisect.insort(slots.done, answered if held is None else max(held[0], answered))

    def close(self) -> None:
        """Let go of what the limiter holds open (nothing for a host-local window)."""

    def _renew_quietly(self, slot_id: str) -> bool:
        try:
            return self.renew(slot_id)
        except Exception:  # a renewal that fails leaves the slot to its lease; the upload goes on
            log.debug("Doc2X pacing: renewing an upload's slot failed", exc_info=True)
            return False

    @contextmanager
    def upload(self) -> Iterator[None]:
        """Wait for room in the window (blocking: workers only), then hold a slot while the upload runs."""
        while True:
            delay, slot_id = self.reserve()
            if slot_id is not None:
                break
            time.sleep(min(delay, self.window))
        ended = threading.Event()

        def keep() -> None:
            while not ended.wait(self.lease / 2):
                self._renew_quietly(slot_id)

        threading.Thread(target=keep, name="doc2x-pacing-renew", daemon=True).start()
        try:
            yield
        finally:
            ended.set()
            self.release(slot_id)

    @asynccontextmanager
    async def aupload(self) -> AsyncIterator[PacedUpload]:
        """:meth:`upload` for an event loop: the window is read and written in a thread, the wait is async.

        Yields the :class:`PacedUpload`, also given by :func:`paced_upload` to code that runs inside
        the block in the same task: the transport confirms the slot right before the send, since it
        may wait between booking and sending (for a connection) longer than a lease. While the block
        runs, the slot is renewed every half lease. A booking that the caller gave up on (cancelled)
        while its thread ran is released as soon as the thread returns, so a cancelled upload never
        holds a slot.
        """
        upload = PacedUpload(self, await self._abook())
        keeper = asyncio.ensure_future(self._keep(upload))
        token = _paced.set(upload)
        try:
            yield upload
        finally:
            _paced.reset(token)
            keeper.cancel()
            ended = self._clock()
            if upload.slot_id is not None:
                # Shielded: a cancelled caller still frees its slot (the thread runs to its end anyway).
                await asyncio.shield(asyncio.to_thread(self.release, upload.slot_id, ended=ended))

    async def _abook(self) -> str:
        """Wait for room in the window without blocking the loop, and book a slot."""
        while True:
            booking = asyncio.ensure_future(asyncio.to_thread(self.reserve))
            try:
                delay, slot_id = await asyncio.shield(booking)
            except asyncio.CancelledError:
                booking.add_done_callback(self._release_abandoned)
                raise
            if slot_id is not None:
                return slot_id
            await asyncio.sleep(min(delay, self.window))

    async def _keep(self, upload: PacedUpload) -> None:
        """Renew the upload's slot every half lease until cancelled (the upload ended)."""
        while True:
            await asyncio.sleep(self.lease / 2)
            if upload.slot_id is not None:
                await asyncio.to_thread(self._renew_quietly, upload.slot_id)

    def _release_abandoned(self, booking: asyncio.Future[tuple[float, str | None]]) -> None:
        if booking.cancelled() or booking.exception() is not None:
            return
        slot_id = booking.result()[1]
        if slot_id is not None:
            booking.get_loop().run_in_executor(None, self.release, slot_id)


class PacedUpload:
    """The slot one upload holds in its key's window, from :meth:`RateLimiter.aupload`.

    Booking and sending are apart: the transport books, then waits for one of its loop's
    connections. A process that is stopped meanwhile, an event loop that is blocked, or renewals
    that wait behind a saturated thread pool let the slot's lease run out; the window then no longer
    counts it and may give its place to another upload. So right before the send the transport calls
    :meth:`confirm`, and on False books again (:meth:`book_again`, waiting its turn): an upload is
    never sent on a slot the window no longer counts.
    """

    def __init__(self, limiter: RateLimiter, slot_id: str) -> None:
        self.limiter = limiter
        #: The slot held now; None between a lost slot and the next booking.
        self.slot_id: str | None = slot_id

    async def confirm(self) -> bool:
        """Whether the slot is still held, renewed for a whole lease from about now.

        A confirmation that itself took longer than :data:`IN_FLIGHT_MARGIN_SECONDS` (the part of a
        lease beyond the exchange's deadline) is asked again, so the exchange that follows ends
        within the lease it renewed.
        """
        while self.slot_id is not None:
            asked = time.monotonic()
            if not await asyncio.to_thread(self.limiter._renew_quietly, self.slot_id):
                self.slot_id = None  # not released: the window no longer counts it, and it was not sent
                break
            if time.monotonic() - asked <= IN_FLIGHT_MARGIN_SECONDS:
                return True
        return False

    async def book_again(self) -> None:
        """Book a new slot for this upload, waiting for room in the window as the first booking did."""
        self.slot_id = await self.limiter._abook()


_paced: contextvars.ContextVar[PacedUpload | None] = contextvars.ContextVar(
    "doc2x_paced_upload", default=None
)


def paced_upload() -> PacedUpload | None:
    """The slot of the :meth:`RateLimiter.aupload` block this task runs in, if any (even through a wrapper)."""
    return _paced.get()
