"""The rolling window of one key kept in Redis, shared by every process of every worker host.

Why a script of our own rather than a rate-limiting library: the well-kept ones, ``limits``
(moving window: a Redis list of bare timestamps, whole-second windows) and ``pyrate-limiter``
(a sorted set scored by the time of acquisition, member names made inside the library), record
an acquisition as one anonymous point in time that never changes. Our window needs a slot that
counts as "now" for as long as its upload is in flight and is then re-dated to the answer's time:
neither library hands back a handle to find the slot again at release, nor counts an entry at
a moving time. Two short Lua scripts do it atomically on one sorted set.

The set ``doc2x:pacing:<digest>`` holds one member per slot: ``open:<id>`` while the upload is in
flight, ``done:<id>`` once it was answered, scored by the slot's time (the Redis server's clock, so
hosts whose clocks differ still agree). The rules are exactly those of the host-local window; the
key expires by itself once no slot can count any more.

When Redis cannot be reached or fails, the limiter paces on the host-local window for a while
(:attr:`RedisRateLimiter.fallback_seconds`) before it tries Redis again, and says so once.
Uploads never fail or stall because the pacing store is down.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_provider_doc2x.pacing.window import (
    CLOCK_TOLERANCE_SECONDS,
    STALE_IN_FLIGHT_SECONDS,
    RateLimiter,
)

log = logging.getLogger(__name__)

#: Book a slot if the window has room. KEYS[1]: the window. ARGV: limit, window, seconds after which
#: a slot in flight is stale, the new slot's id, now ('' for the Redis server's clock), seconds a
#: slot may be dated ahead of the clock. Returns {booked, value, distrusted}: {1, now, _} when booked,
#: {0, wait, _} when full; distrusted is 1 when the window held something that is not a slot of
#: ours, or a slot dated too far ahead of the clock, and was started anew.
BOOK_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local stale = tonumber(ARGV[3])
local now = tonumber(ARGV[5])
local tolerance = tonumber(ARGV[6])
if not now then
    local clock = redis.call('TIME')
    now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
local times, gone = {}, {}
local distrusted = 0
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'zset' and kind ~= 'none' then
    redis.call('DEL', key)
    distrusted = 1
end
local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
    local member, at = members[i], tonumber(members[i + 1])
    local state = string.sub(member, 1, 5)
    if (state ~= 'open:' and state ~= 'done:') or not (at <= now + window) then
        distrusted = 1
    elseif (state == 'open:' and at > now - stale) or at > now - window then
        if state == 'open:' then at = math.max(at, now) end
        times[#times + 1] = at
    else
        gone[#gone + 1] = member
    end
end
if distrusted == 1 then
    redis.call('DEL', key)
    times = {}
elseif #gone > 0 then
    redis.call('ZREM', key, unpack(gone))
end
table.sort(times)
if #times >= limit then
    local ahead = times[#times - limit + 1] - now
    if ahead > tolerance then
        redis.call('DEL', key)
        return {0, tostring(window), 1}
    end
    return {0, tostring(math.min(ahead, 0) + window), distrusted}
end
redis.call('ZADD', key, now, 'open:' .. ARGV[4])
redis.call('PEXPIRE', key, math.ceil((math.max(stale, window) + window) * 1000))
return {1, tostring(now), distrusted}
"""

#: The upload of a slot ended: the slot counts from now, no longer as in flight. KEYS[1]: the window.
#: ARGV: the slot's id, window, stale seconds, now ('' for the Redis server's clock). Returns 1, or 0
#: for a slot the window no longer holds.
RELEASE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local open = 'open:' .. ARGV[1]
local at = redis.call('ZSCORE', key, open)
if not at then return 0 end
local window = tonumber(ARGV[2])
local stale = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if not now then
    local clock = redis.call('TIME')
    now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
redis.call('ZREM', key, open)
redis.call('ZADD', key, math.max(tonumber(at), now), 'done:' .. ARGV[1])
redis.call('PEXPIRE', key, math.ceil((math.max(stale, window) + window) * 1000))
return 1
"""


class RedisRateLimiter(RateLimiter):
    """A :class:`RateLimiter` whose window lives in Redis, under ``redis_key``, for every worker host.

    The Redis connection (an Airflow connection of type ``redis``, read with the Redis provider's
    ``RedisHook``) is looked up at the first upload, in the calling thread: :meth:`aupload` books
    and releases in a worker thread, so the event loop never blocks on it. The host-local window
    (``state_file``, else memory) stands in while Redis is down.

    ``clock`` dates the slots in Redis; by default the Redis server's clock does.
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
    ) -> None:
        super().__init__(limit, window, state_file=state_file, clock=clock or time.time)
        self.redis_conn_id = redis_conn_id
        self.redis_key = redis_key
        self._redis_clock = clock
        self._connect_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._client: Any = None
        self._book: Any = None
        self._release: Any = None
        #: ``time.monotonic()`` before which Redis is not tried again.
        self._down_until = float("-inf")
        self._down = False
        #: Slots booked on the host-local window while Redis was down.
        self._local_slots: set[str] = set()
        #: Slots booked in Redis whose release failed: released at the next booking that reaches Redis.
        self._unreleased: list[str] = []

    def _now_arg(self) -> str:
        return "" if self._redis_clock is None else repr(float(self._redis_clock()))

    def _scripts(self) -> tuple[Any, Any]:
        """The booking and release scripts, on a client built from the Redis connection at first use."""
        with self._connect_lock:
            if self._client is None:
                try:
                    from airflow.providers.redis.hooks.redis import RedisHook
                except ImportError as error:
                    raise RuntimeError(
                        "apache-airflow-providers-redis is not installed "
                        "(pip install 'airflow-provider-doc2x[redis]')"
                    ) from error
                client = RedisHook(redis_conn_id=self.redis_conn_id).get_conn()
                _bound_waits(client, self.socket_timeout)
                self._book = client.register_script(BOOK_SCRIPT)
                self._release = client.register_script(RELEASE_SCRIPT)
                self._client = client
            return self._book, self._release

    def reserve(self) -> tuple[float, str | None]:
        """Book a slot in Redis, or on the host while Redis is down (see :meth:`RateLimiter.reserve`)."""
        if time.monotonic() >= self._down_until:
            try:
                return self._reserve_in_redis()
            except Exception as error:  # whatever fails in the pacing store, the upload goes on
                self._redis_failed(error)
        delay, slot_id = super().reserve()
        if slot_id is not None:
            with self._state_lock:
                self._local_slots.add(slot_id)
        return delay, slot_id

    def _reserve_in_redis(self) -> tuple[float, str | None]:
        book, release = self._scripts()
        with self._state_lock:
            unreleased, self._unreleased = self._unreleased, []
        try:
            for slot_id in unreleased:
                self._call(release, slot_id, self.window, STALE_IN_FLIGHT_SECONDS, self._now_arg())
        except Exception:
            with self._state_lock:
                self._unreleased[:0] = unreleased
            raise
        slot_id = uuid.uuid4().hex
        answer = self._call(
            book,
            self.limit,
            self.window,
            STALE_IN_FLIGHT_SECONDS,
            slot_id,
            self._now_arg(),
            CLOCK_TOLERANCE_SECONDS,
        )
        self._redis_answered()
        booked, value, distrusted = int(answer[0]), float(answer[1]), int(answer[2])
        if distrusted:
            self._distrust(f"the upload window in Redis ({self.redis_key}) did not hold a valid window")
        if booked:
            return 0.0, slot_id
        return min(value, self.window), None

    def release(self, slot_id: str, *, ended: float | None = None) -> None:
        """The upload ended: in Redis the slot is dated by Redis's own clock, shared by every host."""
        with self._state_lock:
            local = slot_id in self._local_slots
            self._local_slots.discard(slot_id)
        if local:
            super().release(slot_id, ended=ended)
            return
        try:
            _, release = self._scripts()
            self._call(release, slot_id, self.window, STALE_IN_FLIGHT_SECONDS, self._now_arg())
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
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken client can fail too; nothing is lost
                log.debug("Doc2X pacing: closing the Redis client failed", exc_info=True)


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
