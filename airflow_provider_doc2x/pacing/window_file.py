"""The window file's contents: a key's slots as :class:`Window`, and how each version of the format reads.

The format, its versions and what a reader keeps are described in
:mod:`~airflow_provider_doc2x.pacing.window`; the learned rule's fields (``sent``, ``rule``) in
:mod:`~airflow_provider_doc2x.pacing.rule`. Kept apart from the limiter so that reading a file
(what no content may crash) stands on its own.
"""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_doc2x.pacing import rule

#: The format this release writes (see the module's doc).
FORMAT_VERSION = 3
#: The unversioned format's slots in flight carry no expiry; their writers forgot them after this long.
LEGACY_IN_FLIGHT_SECONDS = 600.0
#: The longest lease a slot gets; an upload that takes longer renews its slot meanwhile. Without a
#: connection timeout (a limiter built without one), slots get this lease.
MAX_LEASE_SECONDS = 600.0
#: The fields of a window file that this release reads; any other is kept as it is.
WINDOW_FIELDS = ("version", "open", "done", "sent", "rule")


@dataclass
class Window:
    """The slots of a window, and what its file holds beside them.

    ``open``: the slots in flight by id, as ``(booked at, expires at)``; ``done``: the answered
    slots' times, sorted; ``sent``: when the bodies of answered slots were sent in full, by answer
    time; ``rule_until``: when a learned switch to dating slots from their answers ends (None: none);
    ``version``: the format the file was read in; ``extra``: the fields this release does not know,
    written back as they were read.
    """

    open: dict[str, tuple[float, float]] = field(default_factory=dict)
    done: list[float] = field(default_factory=list)
    sent: rule.SentTimes = field(default_factory=dict)
    rule_until: float | None = None
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The window as the file holds it: never in a version lower than it was read in."""
        data: dict[str, Any] = {
            "version": max(self.version, FORMAT_VERSION),
            "open": self.open,
            "done": self.done,
            "sent": rule.sent_field(self.sent),
        }
        if self.rule_until is not None:
            data["rule"] = rule.rule_field(self.rule_until)
        return json.dumps({**data, **self.extra}, separators=(",", ":")).encode()

    def room(self, *, now: float, limit: int, window: float) -> rule.Booking:
        """Whether a slot fits now, by the key's rule (a :class:`~airflow_provider_doc2x.pacing.rule.Booking` with no slot yet).

        First forgets what can no longer count: slots in flight past their expiry (their holder
        died) become answered at their expiry; answered slots (and their ``sent`` pairs) older than
        the window go; a learned rule whose day is over goes (the key learns again).
        """
        expired = [(slot_id, expires) for slot_id, (_, expires) in self.open.items() if expires <= now]
        for slot_id, expires in expired:
            del self.open[slot_id]
            bisect.insort(self.done, expires)
        del self.done[: bisect.bisect_right(self.done, now - window)]
        self.sent = rule.prune_sent(self.sent, self.done)
        if self.rule_until is not None and self.rule_until <= now:
            self.rule_until = None
        answer_rule = self.rule_until is not None
        in_flight = [max(at, now) for at, _ in self.open.values()]
        room = functools.partial(rule.wait_for_room, limit=limit, window=window, now=now)
        by_answer = room(self.done, in_flight)
        delay = by_answer if answer_rule else room(rule.arrival_times(self.done, self.sent), in_flight)
        return rule.Booking(delay, None, by_answer == 0, answer_rule)

    def answer_room_without(self, slot_id: str, *, now: float, limit: int, window: float) -> bool:
        """Whether dating slots from their answers has room now for the upload holding ``slot_id``.

        Its own slot is left out, and nothing is changed: the 429 that asks is answered moments
        after the send, so this is what the answer rule said when the upload went.
        """
        done = [at for at in self.done if at > now - window]
        done += [
            expires
            for held, (_, expires) in self.open.items()
            if held != slot_id and now - window < expires <= now
        ]
        in_flight = [
            max(at, now) for held, (at, expires) in self.open.items() if held != slot_id and expires > now
        ]
        return rule.wait_for_room(sorted(done), in_flight, limit=limit, window=window, now=now) == 0

    def renew(self, slot_id: str, *, now: float, lease: float) -> bool:
        """Hold ``slot_id`` for ``lease`` seconds from now; False if not held (an expired one is answered then)."""
        held = self.open.get(slot_id)
        if held is None:
            return False
        if held[1] <= now:
            del self.open[slot_id]
            bisect.insort(self.done, held[1])
            return False
        self.open[slot_id] = (held[0], max(held[1], now + lease))
        return True

    def answer(self, slot_id: str, answered: float, sent: float | None) -> None:
        """Date the slot ``slot_id`` from its answer (never before its booking), its body's sending beside it."""
        held = self.open.pop(slot_id, None)
        if held is not None:
            answered = max(held[0], answered)
        bisect.insort(self.done, answered)
        if sent is not None and held is not None:
            self.sent.setdefault(answered, []).append(min(max(sent, held[0]), answered))

    def switch(self, *, now: float, seconds: float) -> bool:
        """Date slots from their answers for ``seconds`` from now; False if that rule already holds."""
        if self.rule_until is not None and self.rule_until > now:
            return False
        self.rule_until = now + seconds
        return True


@dataclass(frozen=True)
class NewerWindow:
    """A window of a later format whose slots this release cannot read: left as it is."""

    version: int


def is_time(value: object, latest: float) -> bool:
    """Whether a value read from JSON is a time no later than ``latest`` (nor earlier than its opposite)."""
    # JSON gives float for 1.0, 1e400 (inf) and NaN, int for 1 and for a 400-digit number: only finite
    # floats and ints in range are times.
    return (type(value) is float or type(value) is int) and -latest <= value <= latest


def _slots_of(booked: object, answered: object, version: int, *, now: float, window: float) -> Window | None:
    """The slots of a file's ``open`` and ``done`` as this release reads them; None if they are not."""
    if not isinstance(booked, dict) or not isinstance(answered, list):
        return None
    latest = now + window
    if not all(is_time(at, latest) for at in answered):
        return None
    slots: dict[str, tuple[float, float]] = {}
    if version == 1:  # booking times alone: the slot expired LEGACY_IN_FLIGHT_SECONDS later
        for slot_id, at in booked.items():
            if not is_time(at, latest):
                return None
            slots[slot_id] = (float(at), float(at) + LEGACY_IN_FLIGHT_SECONDS)
    else:
        furthest = latest + MAX_LEASE_SECONDS
        for slot_id, entry in booked.items():
            if not (type(entry) is list and len(entry) == 2):
                return None
            at, expires = entry
            if not (is_time(at, latest) and is_time(expires, furthest) and at <= expires):
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
    sent = rule.read_sent(data.get("sent"), latest=now + window)
    until: float | None = None
    try:
        # A day ahead of a clock stepped back by up to a window is still a rule, as slots allow.
        until = rule.read_rule(data.get("rule"), now=now + window)
    except ValueError:
        sent = None  # a rule that is not one: the window is not one either
    if slots is None or sent is None:
        return NewerWindow(version) if version > FORMAT_VERSION else None
    slots.sent, slots.rule_until = sent, until
    slots.extra = {name: value for name, value in data.items() if name not in WINDOW_FIELDS}
    return slots


def anew(data: object) -> Window:
    """An empty window that keeps what the file held beside its slots (a later release's fields).

    Why: slots this release cannot trust are dropped, but a budget or a learned rule that a later
    release keeps in the same file is not this release's to wipe.
    """
    if not isinstance(data, dict):
        return Window()
    version = data.get("version")
    kept = {name: value for name, value in data.items() if name not in WINDOW_FIELDS}
    if type(version) is int and version > FORMAT_VERSION:
        return Window(version=version, extra=kept)
    return Window(extra=kept)
