"""When the server counts an upload in its window, as far as a key's window knows it: the learned rule.

Doc2X does not say when an upload enters its rate window: when its body arrives, or as late as its
answer. Dating each slot from its answer is safe whatever the server does, but each window then
costs the uploads' answer time: ``limit / (window + answer time)``. A 429 is not billed, so the
window can afford to find out:

- **"arrival"** (the default): a slot counts from when its upload's body most likely arrived,
  plus a moment for the server to read it (:data:`ARRIVAL_MARGIN_SECONDS`, never past its answer).
  The transport's trace says when the body was sent in full (its last bytes went into the
  socket's buffers, on this host's clock); on a slow link a large body is still on its way then.
  So the slot counts from the later of that and its answer less the quickest wait from "sent" to
  answer among the limiter's recent uploads (the server's and the way back's share of any
  answer): :class:`Arrivals`. The first upload
  of a limiter, and a slot whose body-sent time is unknown (a slot of an older release sharing
  the window, an upload whose body never went out whole), count from their answers, as before.
- **"answer"**: every slot counts from its answer; the rule of earlier releases, exactly.

At each booking under "arrival" the window also tells whether "answer" would have had room then.
When an upload booked where "answer" would have had no room is answered HTTP 429, the server counts
later than the body's arrival: the key switches to "answer" for :data:`RULE_SECONDS` (a day), in the
pacing store, so that every process of the host (and every host on the Redis) reads it at its next
booking; after that day the rule expires and the key learns again. A 429 that "answer" would have
drawn as well (another user of the key, a proxy) teaches nothing.

This module holds what the host-local and the Redis window share: the rule's names and lifetime,
the reading of its stored fields, the times slots count at, and the warning the switch logs.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

#: Slots count from when their body was sent in full (the default, until a 429 teaches otherwise).
ARRIVAL = "arrival"
#: Slots count from their answer.
ANSWER = "answer"
#: How long a learned switch to :data:`ANSWER` holds before the key learns again.
RULE_SECONDS = 86_400.0
#: Under "arrival", a slot counts this long after its body was sent (never after its answer): the
#: server reads a body a moment after the client's last write, and how long that moment is varies
#: with its load; without it, two uploads exactly one window apart may reach the server less.
ARRIVAL_MARGIN_SECONDS = 0.05

#: ``sent`` in memory: answer time -> the body-sent times of the slots answered then.
SentTimes = dict[float, list[float]]


def _is_time(value: object, latest: float) -> bool:
    # The window file's rule: only finite floats and ints in range are times (see pacing.window).
    return (type(value) is float or type(value) is int) and -latest <= value <= latest


def read_sent(value: object, *, latest: float) -> SentTimes | None:
    """A file's ``sent`` field (``[[answered at, sent at], ...]``) by answer time; None if it is not one.

    A body is sent before its answer: a pair that says otherwise is not a window's.
    """
    if value is None:
        return {}
    if not isinstance(value, list):
        return None
    sent: SentTimes = {}
    for pair in value:
        if not (type(pair) is list and len(pair) == 2):
            return None
        answered, at = pair
        if not (_is_time(answered, latest) and _is_time(at, latest) and at <= answered):
            return None
        sent.setdefault(float(answered), []).append(float(at))
    return sent


def read_rule(value: object, *, now: float) -> float | None:
    """A file's ``rule`` field: when its switch to "answer" ends (None: no rule).

    A switch that would end more than :data:`RULE_SECONDS` from now was not written by this host's
    clock as it is: it is not a rule.

    Raises:
        ValueError: the field is not a rule.
    """
    if value is None:
        return None
    until = value.get("until") if isinstance(value, dict) and value.get("count_from") == ANSWER else None
    if not _is_time(until, now + RULE_SECONDS):
        raise ValueError(f"not a rule: {value!r:.80}")
    return float(until)  # type: ignore[arg-type]


def rule_field(until: float) -> dict[str, Any]:
    """The file's ``rule`` field for a switch to "answer" that ends at ``until``."""
    return {"count_from": ANSWER, "until": until}


def sent_field(sent: SentTimes) -> list[list[float]]:
    """The file's ``sent`` field: ``[answered at, sent at]`` pairs."""
    return [[answered, at] for answered, times in sent.items() for at in times]


def prune_sent(sent: SentTimes, done: Iterable[float]) -> SentTimes:
    """The pairs whose answer is still among the answered slots ``done`` (pruned with them)."""
    left: dict[float, int] = {}
    for answered in done:
        left[answered] = left.get(answered, 0) + 1
    return {
        answered: times[: left[answered]] for answered, times in sent.items() if left.get(answered, 0) > 0
    }


def arrival_times(done: list[float], sent: SentTimes) -> list[float]:
    """The times the answered slots ``done`` count at under "arrival", sorted.

    A slot with a body-sent time counts from it (plus :data:`ARRIVAL_MARGIN_SECONDS`, never after
    its answer), any other from its answer.
    """
    unused = {answered: list(times) for answered, times in sent.items()}
    counted = []
    for answered in done:
        times = unused.get(answered)
        counted.append(min(times.pop() + ARRIVAL_MARGIN_SECONDS, answered) if times else answered)
    counted.sort()
    return counted


def wait_for_room(
    counted: list[float], in_flight: list[float], *, limit: int, window: float, now: float
) -> float:
    """Seconds until a slot fits among slots counted at ``counted`` and ``in_flight``; 0 if one fits now.

    Only slots counted after ``now - window`` take room. The limit-th newest decides: a slot dated
    ahead of the clock (stepped back) counts at its own time, waited out a window at a time.
    """
    counted = [at for at in counted if at > now - window]
    if len(counted) + len(in_flight) < limit:
        return 0.0
    times = sorted([*counted[-limit:], *in_flight])
    return min(times[-limit] - now, 0.0) + window


#: Recent uploads whose wait from "body sent" to the answer gives the quickest (:class:`Arrivals`).
ANSWER_GAPS_KEPT = 64


class Arrivals:
    """When the bodies of a limiter's uploads most likely reached the server: never before sent in full.

    "Sent in full" is when an upload's last bytes went into the socket's buffers; on a slow link a
    large body is still on its way then, a small one hardly. The quickest wait from "sent" to the
    answer among the recent uploads is about the server's and the way back's share of any answer,
    so an answer that took longer says how late its body really arrived. Without an earlier upload
    to compare, a slot counts from its answer. Shared by the threads of a process.
    """

    def __init__(self) -> None:
        """Start with no upload seen."""
        self._gaps: collections.deque[float] = collections.deque(maxlen=ANSWER_GAPS_KEPT)
        self._lock = threading.Lock()

    def arrived(self, sent: float | None, answered: float) -> float | None:
        """When the body sent (in full) at ``sent`` and answered at ``answered`` most likely arrived."""
        if sent is None:
            return None
        with self._lock:
            quickest = min(self._gaps, default=None)
            self._gaps.append(max(0.0, answered - sent))
        return answered if quickest is None else max(sent, answered - quickest)


class Booking(NamedTuple):
    """What a booking gives: the wait (0 when booked), the slot, and what the rules said of it.

    ``answer_room``: whether dating slots from their answers would have had room for it too;
    ``answer_rule``: whether the key dates its slots from their answers now (a learned switch);
    ``waited``: whether the upload waited for room before it was booked (the key is paced now).
    """

    delay: float
    slot_id: str | None
    answer_room: bool = True
    answer_rule: bool = False
    waited: bool = False


def log_switch(log: logging.Logger, digest: str, *, limit: int, window: float) -> None:
    """Say once per switch that the key now counts its slots from their answers, for how long, and the cost."""
    log.warning(
        "Doc2X pacing: key %s was answered HTTP 429 for an upload that had room in the window counted from "
        "when bodies arrive, and none counted from answers: the server counts an upload later than its "
        "arrival. This key's uploads are now dated from their answers, on every process and host that "
        "share its window, for %.0f h; then it learns again. This costs each window the uploads' answer "
        "time: at most %d uploads per %g s plus the answer time.",
        digest,
        RULE_SECONDS / 3600,
        limit,
        window,
    )
