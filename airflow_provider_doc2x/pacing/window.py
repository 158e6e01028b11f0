"""The rolling window of one key, kept in process memory or in a private file shared by a host's processes.

A window file holds one JSON object::

    {"version": 3, "open": {"<slot id>": [booked at, expires at], ...}, "done": [answered at, ...],
     "sent": [[answered at, body sent at], ...], "rule": {"count_from": "answer", "until": <time>}}

one slot per upload, booked at the send (``open``: in flight) and moved to the answer's time at
release (``done``, kept sorted); ``sent`` pairs an answered slot with when its body was sent in full
(the transport's trace), pruned with ``done``; ``rule``, present while it holds, is the key's learned
switch to dating slots from their answers. What a slot counts from is the key's rule
(:mod:`~airflow_provider_doc2x.pacing.rule`): by default from its body's sending (a ``done`` entry
without a pair, such as an older release's slot, from its answer); after a 429 that dating from
answers would have avoided, from its answer, for a day, for every process that reads the file. A
slot in flight counts as now under either rule. A slot in flight carries its own expiry, the longest its upload may
take (:func:`lease_seconds`: the connection's ``timeout`` plus a margin), renewed while its holder
still runs; hosts and tasks with different connections share one window. A slot whose holder died
(killed, its host lost) is not renewed: at its expiry it counts as answered then, so the key is
free again one window later, not after a fixed ten minutes. The file is locked (``fcntl.flock``)
while a process reads and rewrites it.

**Versions, and what a reader keeps.** ``version`` is the format the file was last written in. The
unversioned file of earlier releases is version 1: ``open`` maps a slot to its booking time alone,
and such a slot expires :data:`LEGACY_IN_FLIGHT_SECONDS` after it. ``open`` and ``done`` keep their
meaning in every later version (``done`` stays the answers' times); what a later release adds for a
key goes into fields of its own beside them, as version 3 added ``sent`` and ``rule``: a version 2
reader keeps them as they are and counts every slot from its answer, its own rule. So a reader of
this release:

- keeps every field it does not know, as it found it, when it rewrites the file, and never writes
  a version lower than the one it read;
- uses a file of a higher version when its ``open`` and ``done`` read as this release knows them.
  When they do not, it leaves the file untouched and this process paces the key on its own, in
  memory, with one warning to upgrade: an older release never resets or downgrades a newer one's
  window;
- starts a window anew (with one warning per limiter, keeping the fields it does not know) only
  for contents of its own version or lower that are not a window: not JSON, wrong types (in
  ``sent`` and ``rule`` too), a body sent after its answer, a rule that ends more than a day ahead, a time
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
import contextvars
import fcntl
import functools
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from airflow_provider_doc2x.pacing import rule
from airflow_provider_doc2x.pacing.private import NotPrivateError, open_private_file
from airflow_provider_doc2x.pacing.rule import Booking
from airflow_provider_doc2x.pacing.window_file import (
    FORMAT_VERSION,
    MAX_LEASE_SECONDS,
    NewerWindow,
    Window,
    anew,
    valid_window,
)

log = logging.getLogger(__name__)

#: Added to the connection's timeout: a slot is booked a moment before its exchange starts.
IN_FLIGHT_MARGIN_SECONDS = 5.0
#: A window file longer than this is not a window (an answered slot takes about 110 bytes, its
#: answer and its sending: some 19,000 slots).
MAX_STATE_BYTES = 2 << 20


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


_DISTRUSTED = (
    "Doc2X pacing: %s (it was changed by hand or by another program, or this host's clock was "
    "set back); it starts anew. Uploads go on; a few may be answered 429 and retried."
)
_NEWER = (
    "Doc2X pacing: %s was written by a later release of airflow-provider-doc2x (format %d; this "
    "release reads up to %d) in a form this release cannot use. It is left as it is, and this "
    "process paces the key on its own meanwhile. Upgrade the provider on every host that shares it."
)


class RateLimiter:
    """A rolling-window limiter: at most ``limit`` uploads whose slots fall in any ``window`` seconds.

    The server counts an upload somewhere between its body's arrival and its answer. So a slot is
    booked at the send (to space the sends) and, when the upload ends, dated by the key's rule
    (:mod:`~airflow_provider_doc2x.pacing.rule`): from when its body was sent in full, until a 429
    shows that the server counts later; then from its answer (never earlier than the server's
    count) for a day. While an upload is in flight, its slot counts as taken now; a slot whose
    holder died counts from its expiry (``upload_timeout``, the connection's timeout, sets it:
    :func:`lease_seconds`).

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
        digest: str | None = None,
    ) -> None:
        if limit < 1 or not window > 0 or not math.isfinite(window):
            raise ValueError(f"A rate limit needs limit >= 1 and window > 0, got {limit} per {window}s")
        self.limit = limit
        self.window = float(window)
        self.state_file = state_file
        #: The key's digest (:func:`~airflow_provider_doc2x.pacing.key_digest`): its name in messages.
        self.digest = digest
        #: Seconds a slot in flight is held past its booking or last renewal (see :func:`lease_seconds`).
        self.lease = lease_seconds(upload_timeout)
        self._clock = clock
        self._memory = Window()
        self._lock = threading.Lock()
        #: The file could not be trusted: this limiter paces in memory from then on.
        self._in_memory = state_file is None
        self._warned: set[str] = set()
        #: When the bodies of its uploads most likely arrived (from their recent answer waits).
        self._arrivals = rule.Arrivals()
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
        if self._first_warning("distrust"):
            log.warning(_DISTRUSTED, what)

    def _newer(self, what: str, version: int) -> None:
        if self._first_warning("newer"):
            log.warning(_NEWER, what, version, FORMAT_VERSION)

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
        """Book a slot now if the window has room: return ``(0, slot_id)``; else ``(wait, None)``."""
        booking = self.book()
        return booking.delay, booking.slot_id

    def book(self) -> Booking:
        """Book a slot now if the window has room, by the key's rule (:mod:`~airflow_provider_doc2x.pacing.rule`).

        An upload still in flight counts as happening now: when its body arrives and when it ends are
        not known yet. A slot past its expiry (its holder died) counts from its expiry. Answered
        slots count from when their bodies were sent (those of unknown sending, from their answers),
        or from their answers while the key's learned switch holds; the booking also says whether
        dating them from their answers would have had room. The caller waits ``delay`` and asks
        again; the wait is never longer than the window.
        """
        with self._slots() as (slots, now):
            booking = slots.room(now=now, limit=self.limit, window=self.window)
            if booking.delay > 0:
                return booking
            slot_id = uuid.uuid4().hex
            slots.open[slot_id] = (now, now + self.lease)
            return booking._replace(slot_id=slot_id)

    def renew(self, slot_id: str) -> bool:
        """Hold ``slot_id`` for another lease from now; whether the window still held it unexpired.

        False when the window no longer holds the slot: it expired (its holder was stopped or starved
        longer than its lease), or the window started anew. An expired slot then counts from its
        expiry, as :meth:`reserve` counts it: the window may have booked another in its place, so an
        upload that has not been sent yet must book a slot again (:meth:`PacedUpload.confirm`).
        """
        with self._slots() as (slots, now):
            return slots.renew(slot_id, now=now, lease=self.lease)

    def release(self, slot_id: str, *, ended: float | None = None, sent: float | None = None) -> None:
        """The upload ended: its slot now counts from its end, no longer as in flight.

        ``ended`` is when the answer came (this host's clock), if the caller took it before handing
        the release to a thread: the slot is not dated later than it ended, by however long the
        thread took to run. Never earlier than the answer, so the window keeps its rule. ``sent``,
        when its body was sent in full (None: unknown), is kept beside it, for the "arrival" rule.
        A slot the window no longer holds (it expired while its holder was stalled, or the window
        started anew) is counted from the answer all the same: the upload was sent.
        """
        with self._slots() as (slots, now):
            slots.answer(slot_id, min(now, ended) if ended is not None else now, sent)

    def answer_room_without(self, slot_id: str) -> bool:
        """Whether dating slots from their answers has room now for the upload holding ``slot_id``."""
        with self._slots() as (slots, now):
            return slots.answer_room_without(slot_id, now=now, limit=self.limit, window=self.window)

    def learn_answer_rule(self) -> None:
        """An upload booked where answer-dating had no room drew a 429: date this key's slots from answers.

        For :data:`~airflow_provider_doc2x.pacing.rule.RULE_SECONDS`, in the pacing store; logged once
        per switch (by whichever process makes it).
        """
        if self._switch():
            rule.log_switch(log, self._digest(), limit=self.limit, window=self.window)

    def _switch(self) -> bool:
        """Switch the key in this host's window; whether this call made the switch."""
        with self._slots() as (slots, now):
            return slots.switch(now=now, seconds=rule.RULE_SECONDS)

    def _digest(self) -> str:
        """What names the key in messages: its digest (the window file's name), never the key."""
        if self.digest is not None:
            return self.digest
        return "(paced in memory)" if self.state_file is None else self._state_path().stem

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
                arrived = self._arrivals.arrived(upload.sent_at, ended)
                release = functools.partial(self.release, upload.slot_id, ended=ended, sent=arrived)
                await asyncio.shield(asyncio.to_thread(release))

    async def _abook(self) -> Booking:
        """Wait for room in the window without blocking the loop, and book a slot."""
        waited = False
        while True:
            booking = asyncio.ensure_future(asyncio.to_thread(self.book))
            try:
                booked = await asyncio.shield(booking)
            except asyncio.CancelledError:
                booking.add_done_callback(self._release_abandoned)
                raise
            if booked.slot_id is not None:
                return booked._replace(waited=waited)
            waited = True
            await asyncio.sleep(min(booked.delay, self.window))

    async def _keep(self, upload: PacedUpload) -> None:
        """Renew the upload's slot every half lease until cancelled (the upload ended)."""
        while True:
            await asyncio.sleep(self.lease / 2)
            if upload.slot_id is not None:
                await asyncio.to_thread(self._renew_quietly, upload.slot_id)

    def _release_abandoned(self, booking: asyncio.Future[Booking]) -> None:
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

    It also carries what the key's rule learns from (:mod:`~airflow_provider_doc2x.pacing.rule`):
    when the upload's body was sent in full (:meth:`body_sent`, from the transport's trace), handed
    to the release, and whether answer-dating would have had room at the booking, which decides
    whether a 429 answer (:meth:`answered`) switches the key.
    """

    def __init__(self, limiter: RateLimiter, booking: Booking) -> None:
        self.limiter = limiter
        #: The slot held now; None between a lost slot and the next booking.
        self.slot_id: str | None = booking.slot_id
        #: Whether dating slots from their answers would have had room for this booking too.
        self.answer_room = booking.answer_room
        #: Whether it waited for room in the window before it was booked (the key is paced now).
        self.waited = booking.waited
        #: When the body was sent in full on the limiter's clock (this host's); None until then.
        self.sent_at: float | None = None

    def body_sent(self) -> None:
        """The upload's body was sent in full now (the transport's trace says so)."""
        self.sent_at = self.limiter._clock()

    async def answered(self, status: int) -> None:
        """The upload was answered HTTP ``status``: a 429 that answer-dating would have avoided switches the key."""
        if status == 429 and not self.answer_room:
            try:
                # Booked where the answer rule had no room; sent perhaps much later (it waited for a
                # connection): the answer rule must have had no room at the send either.
                if self.slot_id is not None and await asyncio.to_thread(
                    self.limiter.answer_room_without, self.slot_id
                ):
                    return
                await asyncio.to_thread(self.limiter.learn_answer_rule)
            except Exception:  # the upload is retried all the same; the next 429 teaches again
                log.debug("Doc2X pacing: recording the key's rule failed", exc_info=True)

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
        booking = await self.limiter._abook()
        self.slot_id, self.answer_room, self.sent_at = booking.slot_id, booking.answer_room, None


_paced: contextvars.ContextVar[PacedUpload | None] = contextvars.ContextVar(
    "doc2x_paced_upload", default=None
)


def paced_upload() -> PacedUpload | None:
    """The slot of the :meth:`RateLimiter.aupload` block this task runs in, if any (even through a wrapper)."""
    return _paced.get()
