"""The rolling window of one key kept in Redis, shared by every process of every worker host.

Why a script of our own rather than a rate-limiting library: the well-kept ones, ``limits``
(moving window: a Redis list of bare timestamps, whole-second windows) and ``pyrate-limiter``
(a sorted set scored by the time of acquisition, member names made inside the library), record
an acquisition as one anonymous point in time that never changes. Our window needs a slot that
counts as "now" for as long as its upload is in flight and is then re-dated to the answer's time:
neither library hands back a handle to find the slot again at release, nor counts an entry at
a moving time. Short Lua scripts do it atomically on one sorted set.

The set ``doc2x:pacing:<digest>`` holds one member per slot, scored by the Redis server's clock (so
hosts whose clocks differ still agree): ``lease:<id>`` while the upload is in flight, scored by its
expiry (the booking host's :func:`~airflow_provider_doc2x.pacing.window.lease_seconds`, renewed while
its holder runs), and ``done:<id>`` once it was answered, scored by the answer's time, beside
``sent:<id>``, scored by when its body was sent in full (handed over as an age, seconds before the
release, so that Redis's clock dates it too). A slot past its expiry (its holder died) counts from
its expiry. The rules are exactly those of the host-local window, the learned rule included
(:mod:`~airflow_provider_doc2x.pacing.rule`): an answered slot counts from its ``sent:`` score (one
without, from its answer) unless the key ``doc2x:pacing:<digest>:rule`` exists, which a switch sets
for a day (it expires by itself) and every host reads at each booking. The window's key expires by
itself once no slot can count any more.

**Versions.** The member ``version`` is scored by the set's format (that of the window file:
:data:`~airflow_provider_doc2x.pacing.window_file.FORMAT_VERSION`). The format of earlier releases, with
no ``version``, is version 1: its slots in flight are ``open:<id>`` scored by their booking time, and
expire :data:`~airflow_provider_doc2x.pacing.window_file.LEGACY_IN_FLIGHT_SECONDS` after it; they are
still counted. As in the file, a reader keeps every member it does not know and never lowers the
version; ``lease:``, ``open:`` and ``done:`` keep their meaning in later versions. Version 3 added
``sent:`` members, which a version 2 reader keeps and does not count (it dates every slot from its
answer, its own rule). When a set of a
later version holds a slot this release cannot read, it is left untouched and the host-local
window stands in for a while, with one warning to upgrade. What later releases keep for a key
beside its window (a learned rule, a daily page budget) goes into keys of its own,
``doc2x:pacing:<digest>:<name>``, which these scripts never touch. Releases before version 2 start
the set anew when it holds ``version`` or ``lease:`` members.

**Redis down, and back.** Every slot a host books in Redis it books, renews and releases in its
host-local window too (a booking needs room in both). When Redis cannot be reached or fails, the
limiter paces on the host-local window alone for a while (:attr:`RedisRateLimiter.fallback_seconds`)
before it tries Redis again, and says so once; that window already holds what this host sent in the
last window, so one host alone never goes over the limit, while Redis is down or after it returns.
Hosts do not see each other's uploads meanwhile: together they may exceed the limit, and the 429
answers are retried. When Redis answers again, the slots hosts booked on their own are not in it:
for one window more, other hosts may book up to the limit in Redis beside them, so the key may take
up to what the other hosts sent alone in that window on top of its limit; after that window Redis
holds all of it again. Uploads never fail or stall because the pacing store is down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_provider_doc2x.pacing import rule
from airflow_provider_doc2x.pacing.rule import Booking
from airflow_provider_doc2x.pacing.window import RateLimiter
from airflow_provider_doc2x.pacing.window_file import (
    FORMAT_VERSION,
    LEGACY_IN_FLIGHT_SECONDS,
    MAX_LEASE_SECONDS,
)

log = logging.getLogger(__name__)

#: A window set with more members than this is not a window (the host-local file's size bound: an
#: answered slot is two members, ``done:`` and ``sent:``).
MAX_MEMBERS = 40_000

#: What every script starts with: the key, and the time (ARGV[n]; '' for the Redis server's clock).
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local function clock(given)
    local now = tonumber(given)
    if now then return now end
    local time = redis.call('TIME')
    return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local function keep_for(seconds)
    local ms = math.ceil(seconds * 1000)
    if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function is_window()
    local kind = redis.call('TYPE', key)['ok']
    return kind == 'zset' or kind == 'none'
end
"""

#: Book a slot if the window has room. KEYS[1]: the window. ARGV: limit, window, the slot's lease,
#: the new slot's id, now ('' for the Redis server's clock), '1' when the key dates its slots from
#: their answers (its learned rule), else ''. Returns {state, value, distrusted, answer_room}: {1, now,
#: _, _} when booked, {0, wait, _, _} when full (a slot dated ahead of the clock, by one window at
#: most, is waited out), {2, version, 0, 1} for a set of a later version that this release cannot
#: read (nothing was changed); distrusted is 1 when the window held something that is not a window (a
#: slot dated more than one window ahead among it) and was started anew (its slots dropped, the
#: members it does not know kept); answer_room is 1 when dating answered slots from their answers
#: would have had room too. An answered slot ``done:<id>`` with a ``sent:<id>`` counts from the
#: earlier of its answer and its sending plus the arrival margin, unless the rule says answers.
BOOK_SCRIPT = (
    _PRELUDE
    + f"""
local version_here, legacy, max_lease, max_members = {FORMAT_VERSION}, {LEGACY_IN_FLIGHT_SECONDS!r}, {MAX_LEASE_SECONDS!r}, {MAX_MEMBERS}
local margin = {rule.ARRIVAL_MARGIN_SECONDS!r}
"""
    + """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local now = clock(ARGV[5])
local distrusted = 0
if not is_window() then
    redis.call('DEL', key)
    distrusted = 1
end
local version = tonumber(redis.call('ZSCORE', key, 'version') or '1')
local valid = version and version >= 1 and version == math.floor(version)
local newer = valid and version > version_here
if valid and redis.call('ZCARD', key) > max_members then valid = false end
local answer_rule = ARGV[6] == '1'
local others, dones, sents, gone = {}, {}, {}, {}
local horizon = window
if valid then
    local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    for i = 1, #members, 2 do
        local member, at = members[i], tonumber(members[i + 1])
        local kind = string.match(member, '^(%l+):')
        local expires = nil
        if member == 'version' or (kind ~= 'done' and kind ~= 'open' and kind ~= 'lease' and kind ~= 'sent') then
            -- not a slot, or a member of a later release: kept as it is, not counted
        elseif not at then
            valid = false
        elseif kind == 'done' or kind == 'sent' then
            if not (at <= now + window) then valid = false end
            if kind == 'sent' then
                sents[string.sub(member, 6)] = at  -- kept as long as its slot's done: (below)
            elseif at <= now - window then
                gone[#gone + 1] = member
            else
                dones[#dones + 1] = {string.sub(member, 6), at}
            end
        else
            if kind == 'open' then
                if not (at <= now + window) then valid = false end
                expires = at + legacy
            else
                if not (at <= now + window + max_lease) then valid = false end
                expires = at
            end
            if expires > now then
                if kind == 'open' then others[#others + 1] = math.max(at, now) else others[#others + 1] = now end
            elseif expires > now - window then
                others[#others + 1] = expires
            else
                gone[#gone + 1] = member
            end
            horizon = math.max(horizon, expires - now + window)
        end
        if not valid then break end
    end
end
if valid then
    local answered = {}
    for i = 1, #dones do answered[dones[i][1]] = true end
    for id, _ in pairs(sents) do
        if not answered[id] then gone[#gone + 1] = 'sent:' .. id end
    end
end
if not valid then
    if newer then return {2, tostring(version), 0, 1} end
    if redis.call('ZCARD', key) > max_members then
        redis.call('DEL', key)
    else
        -- only the slots are dropped: members of a later release (a rule, a budget) stay
        local members, slots = redis.call('ZRANGE', key, 0, -1), {}
        for i = 1, #members do
            local kind = string.match(members[i], '^(%l+):')
            if kind == 'done' or kind == 'open' or kind == 'lease' or kind == 'sent' then slots[#slots + 1] = members[i] end
        end
        for i = 1, #slots, 1000 do redis.call('ZREM', key, unpack(slots, i, math.min(i + 999, #slots))) end
    end
    others, dones, sents, gone, horizon, version, distrusted = {}, {}, {}, {}, window, 1, 1
elseif #gone > 0 then
    for i = 1, #gone, 1000 do redis.call('ZREM', key, unpack(gone, i, math.min(i + 999, #gone))) end
end
local by_answer, by_arrival = {}, {}
for i = 1, #others do
    by_answer[i] = others[i]
    by_arrival[i] = others[i]
end
for i = 1, #dones do
    local at = dones[i][2]
    by_answer[#by_answer + 1] = at
    local sent = sents[dones[i][1]]
    if sent and sent + margin < at then at = sent + margin end
    if at > now - window then by_arrival[#by_arrival + 1] = at end
end
local answer_room = 0
if #by_answer < limit then answer_room = 1 end
local times = by_arrival
if answer_rule then times = by_answer end
table.sort(times)
if #times >= limit then
    local ahead = times[#times - limit + 1] - now
    return {0, tostring(math.min(ahead, 0) + window), distrusted, answer_room}
end
redis.call('ZADD', key, now + lease, 'lease:' .. ARGV[4])
if version < version_here then redis.call('ZADD', key, version_here, 'version') end
keep_for(math.max(horizon, lease + window))
return {1, tostring(now), distrusted, answer_room}
"""
)

#: The upload of a slot still runs: hold it for another lease. KEYS[1]: the window. ARGV: the slot's
#: id, its lease, window, now ('' for the Redis server's clock). Returns 1, or 0 for a slot the
#: window no longer holds unexpired; one that expired counts from its expiry from then on, as the
#: booking script counts it.
RENEW_SCRIPT = (
    _PRELUDE
    + """
if not is_window() then return 0 end
local lease_member = 'lease:' .. ARGV[1]
local at = redis.call('ZSCORE', key, lease_member)
if not at then return 0 end
local now = clock(ARGV[4])
if tonumber(at) <= now then
    redis.call('ZREM', key, lease_member)
    redis.call('ZADD', key, at, 'done:' .. ARGV[1])
    return 0
end
local expires = math.max(tonumber(at), now + tonumber(ARGV[2]))
redis.call('ZADD', key, expires, lease_member)
keep_for(expires - now + tonumber(ARGV[3]))
return 1
"""
)

#: The upload of a slot ended: the slot counts from now, no longer as in flight. KEYS[1]: the window.
#: ARGV: the slot's id, window, now ('' for the Redis server's clock), and how many seconds before
#: now its body was sent in full ('' when unknown: then no ``sent:<id>``). A slot the window no
#: longer holds (it expired while its holder stalled, or the window started anew) counts from now
#: all the same: the upload was sent. Returns 1, or 0 when the key is not a window.
RELEASE_SCRIPT = (
    _PRELUDE
    + """
if not is_window() then return 0 end
local window = tonumber(ARGV[2])
local now = clock(ARGV[3])
redis.call('ZREM', key, 'lease:' .. ARGV[1], 'open:' .. ARGV[1])
redis.call('ZADD', key, now, 'done:' .. ARGV[1])
local sent_age = tonumber(ARGV[4])
if sent_age then redis.call('ZADD', key, now - math.max(sent_age, 0), 'sent:' .. ARGV[1]) end
keep_for(window)
return 1
"""
)


class NewerRedisWindow(Exception):
    """The window in Redis is of a later format, holding what this release cannot read."""

    def __init__(self, redis_key: str, version: int) -> None:
        super().__init__(f"{redis_key} is of format {version}")
        self.redis_key = redis_key
        self.version = version


class RedisRateLimiter(RateLimiter):
    """A :class:`RateLimiter` whose window lives in Redis, under ``redis_key``, for every worker host.

    The Redis connection (an Airflow connection of type ``redis``, read with the Redis provider's
    ``RedisHook``) is looked up at the first upload, in the calling thread: :meth:`aupload` books
    and releases in a worker thread, so the event loop never blocks on it. The host-local window
    (``state_file``, else memory) stands in while Redis is down.

    ``clock`` dates the slots in Redis; by default the Redis server's clock does. ``upload_timeout``
    (the connection's timeout) sets how long a slot in flight is held without renewal, as on the host.
    """

    #: Seconds the host-local window stands in after Redis failed, before Redis is tried again.
    fallback_seconds = 30.0
    #: Seconds a Redis call may take before it counts as failed: a hung store must not hold uploads.
    socket_timeout = 2.0

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        redis_conn_id: str,
        redis_key: str,
        state_file: Path | Callable[[], Path] | None = None,
        clock: Callable[[], float] | None = None,
        upload_timeout: float | None = None,
        digest: str | None = None,
    ) -> None:
        super().__init__(
            limit,
            window,
            state_file=state_file,
            clock=clock or time.time,
            upload_timeout=upload_timeout,
            digest=digest,
        )
        self.redis_conn_id = redis_conn_id
        self.redis_key = redis_key
        #: The key's learned rule (:mod:`~airflow_provider_doc2x.pacing.rule`), present while it holds.
        self.rule_key = f"{redis_key}:rule"
        self._redis_clock = clock
        self._connect_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._client: Any = None
        self._scripts_of_client: tuple[Any, Any, Any] | None = None
        #: ``time.monotonic()`` before which Redis is not tried again.
        self._down_until = float("-inf")
        self._down = False
        #: Slots booked on the host-local window while Redis was down.
        self._local_slots: set[str] = set()
        #: Slots booked in Redis whose release failed: released at the next booking that reaches Redis.
        self._unreleased: list[str] = []

    def _now_arg(self) -> str:
        return "" if self._redis_clock is None else repr(float(self._redis_clock()))

    def _scripts(self) -> tuple[Any, Any, Any]:
        """The booking, release and renewal scripts, on a client built from the Redis connection at first use."""
        with self._connect_lock:
            if self._client is None or self._scripts_of_client is None:
                client = redis_client(self.redis_conn_id, self.socket_timeout)
                self._scripts_of_client = (
                    client.register_script(BOOK_SCRIPT),
                    client.register_script(RELEASE_SCRIPT),
                    client.register_script(RENEW_SCRIPT),
                )
                self._client = client
            return self._scripts_of_client

    def _redis(self) -> Any:
        """The Redis client, built from the connection at first use."""
        self._scripts()
        client = self._client
        if client is None:
            raise RuntimeError(f"the Redis client of {self.redis_conn_id!r} was closed meanwhile")
        return client

    def book(self) -> Booking:
        """Book a slot on this host's window and in Redis, or on the host alone while Redis is down.

        Every slot this host books in Redis is booked, renewed and released in the host-local window
        too, by the same rules: so while Redis is down the host's window already holds what this
        host sent in the last window, and this host alone never goes over the limit, not even when
        Redis fails or comes back. A booking that Redis refuses (the key is full across hosts) is
        taken back from the host's window: it was never used. The rule learned in Redis (by any
        host) is copied into the host's window, which then keeps it while Redis is down.
        """
        here = super().book()
        if here.slot_id is None:
            return here
        if time.monotonic() >= self._down_until:
            try:
                booked, rule_seconds = self._book_in_redis(here.slot_id)
            except NewerRedisWindow as newer:  # Redis answers: it is the window that cannot be used
                with self._state_lock:
                    self._down_until = time.monotonic() + self.fallback_seconds
                self._newer(f"the upload window in Redis ({newer.redis_key})", newer.version)
            except Exception as error:  # whatever fails in the pacing store, the upload goes on
                self._redis_failed(error)
            else:
                if rule_seconds is not None and not here.answer_rule:
                    self._adopt_rule(rule_seconds)
                if booked.slot_id is None:
                    self._take_back(here.slot_id)
                return booked
        with self._state_lock:
            self._local_slots.add(here.slot_id)
        return here

    def _adopt_rule(self, seconds: float) -> None:
        """Keep the rule another host learned in this host's window too, for as long as it holds in Redis."""
        with self._slots() as (slots, now):
            if slots.rule_until is None or slots.rule_until <= now:
                slots.rule_until = now + min(seconds, rule.RULE_SECONDS)

    def _take_back(self, slot_id: str) -> None:
        """Remove a slot booked on the host's window but never used (Redis refused it)."""
        with self._slots() as (slots, _):
            slots.open.pop(slot_id, None)

    def _book_in_redis(self, slot_id: str) -> tuple[Booking, float | None]:
        """The booking in Redis, and the seconds left of the key's learned rule there (None: no rule)."""
        book, release, _ = self._scripts()
        with self._state_lock:
            unreleased, self._unreleased = self._unreleased, []
        try:
            for unreleased_id in unreleased:
                self._call(release, unreleased_id, self.window, self._now_arg(), "")
        except Exception:
            with self._state_lock:
                self._unreleased[:0] = unreleased
            raise
        left = int(self._redis().pttl(self.rule_key))  # -2: no rule; -1: a rule without expiry
        if left == -1 or left > rule.RULE_SECONDS * 1000:
            # Set by hand, or by something else: a rule never holds longer than a day from now.
            self._redis().pexpire(self.rule_key, int(rule.RULE_SECONDS * 1000))
            left = int(rule.RULE_SECONDS * 1000)
        rule_seconds = None if left < 0 else left / 1000
        flag = "1" if rule_seconds is not None else ""
        answer = self._call(book, self.limit, self.window, self.lease, slot_id, self._now_arg(), flag)
        self._redis_answered()
        state, value, distrusted, room = int(answer[0]), float(answer[1]), int(answer[2]), bool(answer[3])
        if state == 2:
            raise NewerRedisWindow(self.redis_key, int(value))
        if distrusted:
            self._distrust(f"the upload window in Redis ({self.redis_key}) did not hold a valid window")
        answer_rule = rule_seconds is not None
        if state == 1:
            return Booking(0.0, slot_id, room, answer_rule), rule_seconds
        return Booking(min(value, self.window), None, room, answer_rule), rule_seconds

    def answer_room_without(self, slot_id: str) -> bool:
        """The booking's view stands: this host's window alone does not see the other hosts' slots."""
        return False

    def _switch(self) -> bool:
        """Switch the key in Redis for every host, and on this host; whether this call made the switch.

        While Redis cannot be reached, the switch is made on this host alone.
        """
        here = super()._switch()
        if time.monotonic() < self._down_until:
            return here
        try:
            made = self._redis().set(
                self.rule_key,
                json.dumps({"count_from": rule.ANSWER}),
                nx=True,
                px=int(rule.RULE_SECONDS * 1000),
            )
        except Exception as error:  # the host's window keeps the switch
            self._redis_failed(error)
            return here
        return bool(made)

    def renew(self, slot_id: str) -> bool:
        """Hold ``slot_id`` for another lease, in Redis and on the host; whether it was still held.

        A slot booked in Redis is still held when Redis holds it unexpired; while Redis cannot be
        reached, when the host's window does (it paces meanwhile).
        """
        with self._state_lock:
            local = slot_id in self._local_slots
        held_here = super().renew(slot_id)
        if local:
            return held_here
        try:
            _, _, renew = self._scripts()
            return bool(self._call(renew, slot_id, self.lease, self.window, self._now_arg())) and held_here
        except Exception as error:  # the host's window stands in, as for a booking
            self._redis_failed(error)
            return held_here

    def release(self, slot_id: str, *, ended: float | None = None, sent: float | None = None) -> None:
        """The upload ended: on the host, and in Redis dated by Redis's own clock, shared by every host.

        Redis dates the body's sending by its own clock too: it is handed over as an age, seconds
        before now, taken on this host's clock, so hosts whose clocks differ still agree.
        """
        with self._state_lock:
            local = slot_id in self._local_slots
            self._local_slots.discard(slot_id)
        super().release(slot_id, ended=ended, sent=sent)
        if local:
            return
        try:
            _, release, _ = self._scripts()
            sent_age = "" if sent is None else repr(max(0.0, self._clock() - sent))
            self._call(release, slot_id, self.window, self._now_arg(), sent_age)
        except Exception as error:  # the slot is released at the next booking that reaches Redis
            with self._state_lock:
                self._unreleased.append(slot_id)
            self._redis_failed(error)

    def _call(self, script: Any, *args: object) -> Any:
        return script(keys=[self.redis_key], args=list(args))

    def _redis_failed(self, error: Exception) -> None:
        with self._state_lock:
            self._down_until = time.monotonic() + self.fallback_seconds
            self._down = True
        self.close()  # the next try reads the connection again: it may have been fixed
        message = (
            "Doc2X pacing: the Redis connection %r failed (%s: %s). Uploads of this key go on, paced by "
            "this host alone, and Redis is tried again every %.0fs; meanwhile the hosts together may "
            "exceed the key's limit, and the 429 answers are retried."
        )
        args = (self.redis_conn_id, type(error).__name__, error, self.fallback_seconds)
        log.log(logging.WARNING if self._first_warning("redis") else logging.INFO, message, *args)

    def _redis_answered(self) -> None:
        with self._state_lock:
            was_down, self._down = self._down, False
        if was_down:
            log.info(
                "Doc2X pacing: the Redis connection %r answers again; pacing across hosts goes on",
                self.redis_conn_id,
            )

    def close(self) -> None:
        """Let go of the Redis client."""
        with self._connect_lock:
            client, self._client = self._client, None
            self._scripts_of_client = None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken client can fail too; nothing is lost
                log.debug("Doc2X pacing: closing the Redis client failed", exc_info=True)


def redis_client(redis_conn_id: str, socket_timeout: float) -> Any:
    """A Redis client from the Airflow connection ``redis_conn_id``, its waits bounded by ``socket_timeout``.

    Raises:
        RuntimeError: the Redis provider is not installed.
        Exception: whatever looking up the connection raises (a missing connection among them).
    """
    try:
        from airflow.providers.redis.hooks.redis import RedisHook
    except ImportError as error:
        raise RuntimeError(
            "apache-airflow-providers-redis is not installed (pip install 'airflow-provider-doc2x[redis]')"
        ) from error
    client = RedisHook(redis_conn_id=redis_conn_id).get_conn()
    _bound_waits(client, socket_timeout)
    return client


def _bound_waits(client: Any, seconds: float) -> None:
    """Give a Redis client short socket timeouts and at most one immediate retry, before it connects."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if kwargs is None:  # a cluster client: its nodes keep the connection's own settings
        return
    for name in ("socket_timeout", "socket_connect_timeout"):
        kwargs[name] = seconds
        if f"orig_{name}" in kwargs:  # what redis-py 6+ restores after a maintenance notice
            kwargs[f"orig_{name}"] = seconds
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        return
    kwargs["retry"] = Retry(NoBackoff(), 1)
