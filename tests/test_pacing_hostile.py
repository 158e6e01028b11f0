"""
The learned pacing rule under conditions its happy path does not meet: a link slower than the
client's socket buffers, a clock stepped back after a switch, a rule in Redis that never expires, a
generous key's full window, a booking that waited past its window before its send, and an upload
whose answer comes later than a window after its body. Each test states what a user of the key is
promised; the local server and a real ``redis-server`` stand for Doc2X and the pacing store.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random

import pytest
from PIL import Image

from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.pacing import RateLimiter, RedisRateLimiter, reset_limiters
from airflow_provider_doc2x.pacing.rule import RULE_SECONDS
from airflow_provider_doc2x.pacing.window import PacedUpload
from tests.helpers import FakeClock, pacing_logs
from tests.test_pacing_redis import CONN_ID, redis_server  # noqa: F401 (the fixture)


def switches(caplog) -> list[str]:
    """The warnings that said a key switched to dating its slots from answers."""
    return [line for line in pacing_logs(caplog) if "429" in line]


def noise_png(side: int, seed: int) -> bytes:
    """A PNG that does not compress: its size on the wire is about ``3 * side**2`` bytes."""
    rnd = random.Random(seed)
    picture = Image.frombytes("RGB", (side, side), rnd.randbytes(side * side * 3))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


# A server that counts at arrival, behind a link slower than what the client's buffers hold.


def test_a_slow_link_at_a_server_that_counts_at_arrival_draws_no_429_and_keeps_the_arrival_rule(
    doc2x, make_image, monkeypatch, tmp_path, caplog
):
    """Promise 1: 0 answers 429 in steady state at a server that counts at arrival; promise 3: no switch.

    The body's last write returns once the bytes are in the socket's buffers, not once they arrived:
    a 120 kB image behind a 200 kB/s link arrives about 0.6 s after the trace says "sent", a 4 kB
    one about 0.02 s after. Dated from the trace, the small upload that follows the large one reaches
    the server less than a window after it.
    """
    limit, window = 1, 1.0
    doc2x.configure(rate_limit=limit, rate_window=window, upload_bandwidth=200_000)  # counts at arrival
    conn = doc2x.connection_json(rate_limit_images=limit, rate_limit_window=window, max_retries=5)
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", conn)
    reset_limiters()
    large, small = noise_png(200, 1), make_image().read_bytes()

    async def upload_in_turn() -> None:
        hook = Doc2XHook()
        for n in range(3):
            await hook.asubmit_image(large, source=f"large-{n}.png")
            await hook.asubmit_image(small, source=f"small-{n}.png")

    with caplog.at_level(logging.WARNING):
        asyncio.run(upload_in_turn())
    stats = doc2x.stats()
    assert (stats["billed_total"], stats["max_billed_per_image"]) == (6, 3)  # every upload, once
    assert stats["rate_limited"] == 0  # the key never went over its limit at the server
    assert switches(caplog) == []  # and the server, which counts at arrival, was not taken for a late one
    [window_file] = (tmp_path / "pacing").glob("*.json")
    assert "rule" not in json.loads(window_file.read_text())


# The rule's "until" and the host's clock.


def test_a_clock_stepped_back_a_moment_after_a_switch_keeps_the_window_and_the_rule(tmp_path, caplog):
    """Promise 4: a clock stepped back (by less than a window) wipes no window, and the key stays switched.

    The module doc: a slot dated ahead of the clock (stepped back by at most a window) is waited out,
    never wiped. A switch made a second before the step ends one second more than a day ahead of the
    stepped clock.
    """
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=tmp_path / "key.json", clock=clock)
    booking = limiter.book()
    assert booking.slot_id is not None  # the key's only slot, in flight
    limiter.learn_answer_rule()
    caplog.clear()  # (the switch's own warning)
    clock.now -= 1.0  # NTP steps the clock back by a second
    with caplog.at_level(logging.WARNING):
        again = limiter.book()
    assert again.slot_id is None  # the upload in flight still holds the key's only slot
    assert again.answer_rule  # and the key still dates its slots from their answers
    assert pacing_logs(caplog) == []


# The rule in Redis.


@pytest.mark.parametrize("ttl_ms", [None, 365 * 86_400_000], ids=["no-expiry", "a-year"])
def test_a_rule_in_redis_holds_no_longer_than_a_day(redis_server, tmp_path, ttl_ms):  # noqa: F811
    """Promise 4: the switch lasts a day, then the key learns again, whatever the rule's key holds.

    A rule key without an expiry (set by hand, or kept by a PERSIST or a restore) or with one far
    ahead is read as a switch at each booking; in the window file, a rule that ends more than a day
    ahead is not a rule.
    """
    client = redis_server.client()
    rule_key = "doc2x:pacing:test:rule"
    client.set(rule_key, json.dumps({"count_from": "answer"}), px=ttl_ms)
    clock = FakeClock()
    limiter = RedisRateLimiter(
        1,
        10.0,
        redis_conn_id=CONN_ID,
        redis_key="doc2x:pacing:test",
        state_file=tmp_path / "a.json",
        clock=clock,
    )
    assert limiter.book().answer_rule  # read as a switch
    assert 0 < client.pttl(rule_key) <= RULE_SECONDS * 1000  # which ends within a day


# A generous key's full window.


def test_a_generous_keys_full_window_in_redis_is_kept_not_started_anew(redis_server, tmp_path, caplog):  # noqa: F811
    """Promise 1 for a key of 12,000 images per window: its full window refuses a booking, with no warning.

    Each answered slot is now two members (``done:`` and ``sent:``), and a set of more than
    ``MAX_MEMBERS`` (20,000) is "not a window": from 10,001 answered slots on, the window is wiped at
    the next booking and the key goes over its limit. Release 2 held 20,000 slots.
    """
    limit = 12_000
    clock = FakeClock()
    other_host = RedisRateLimiter(
        limit, 30.0, redis_conn_id=CONN_ID, redis_key="doc2x:pacing:test", clock=clock
    )
    for n in range(limit):  # the window's answered uploads, as another host's releases leave them
        other_host.release(f"slot-{n}", ended=clock.now, sent=clock.now - 0.5)
    this_host = RedisRateLimiter(
        limit,
        30.0,
        redis_conn_id=CONN_ID,
        redis_key="doc2x:pacing:test",
        state_file=tmp_path / "b.json",
        clock=clock,
    )
    clock.now += 1.0
    with caplog.at_level(logging.WARNING):
        slot = this_host.reserve()[1]
    assert slot is None  # 12,000 uploads in the last 30 s: the key is full
    assert pacing_logs(caplog) == []


# What a 429 teaches, and when.


async def test_a_booking_sent_after_its_window_moved_on_learns_nothing_from_a_429_then(tmp_path, caplog):
    """Promise 3: a 429 that the answer rule would also have drawn (at the send) does not switch the key.

    The transport books, then waits for one of its loop's connections (``max_concurrent_uploads``)
    and confirms the slot right before the send. ``answer_room`` is the booking's: a window later,
    when the upload is sent, the answer rule has room too, and a 429 then comes from another user of
    the key or a proxy.
    """
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=tmp_path / "key.json", clock=clock)
    earlier = [limiter.book().slot_id for _ in range(2)]
    clock.now = 1004.0
    for slot in earlier:
        limiter.release(slot, ended=1004.0, sent=1001.0)  # bodies sent at 1001, answered at 1004
    clock.now = 1011.1  # room counted from the bodies' arrival, none counted from the answers
    upload = PacedUpload(limiter, limiter.book())
    assert upload.slot_id is not None and not upload.answer_room
    clock.now = 1025.0  # waited for a connection: by now the answer rule has room as well
    assert await upload.confirm()
    assert limiter.book().answer_room  # (what a booking made at the send would have said)
    with caplog.at_level(logging.WARNING):
        await upload.answered(429)
    assert switches(caplog) == []
    assert "rule" not in json.loads((tmp_path / "key.json").read_text())


# Redis and the host's file count a slot alike.


def test_redis_counts_a_slot_answered_a_window_after_its_body_from_its_arrival_as_the_file_does(
    redis_server,  # noqa: F811
    tmp_path,
):
    """The Redis window's rules are "exactly those of the host-local window" (redis_window's doc).

    A body sent at 1001 and answered at 1015 (a slow answer) counts from its arrival: at 1015 a
    window of 10 s no longer holds it. The Redis script drops a ``sent:`` member older than a window
    even while its ``done:`` is in the window, and then counts the slot from its answer.
    """
    clock = FakeClock()

    def host(name: str) -> RedisRateLimiter:
        return RedisRateLimiter(
            1,
            10.0,
            redis_conn_id=CONN_ID,
            redis_key="doc2x:pacing:test",
            state_file=tmp_path / name,
            clock=clock,
        )

    first = host("a.json")
    slot = first.book().slot_id
    clock.now = 1015.0
    first.release(slot, ended=1015.0, sent=1001.0)
    assert RateLimiter(1, 10.0, state_file=tmp_path / "a.json", clock=clock).book().slot_id is not None
    # (the host's own file, as the first host keeps it: counted from 1001.05, gone at 1011.05)
    assert host("b.json").book().slot_id is not None  # another host, through Redis: the same rule
