"""
Pacing across hosts through Redis: the host-local window's rules, kept in a real ``redis-server``
shared by limiters that stand for different hosts (each its own DOC2X_PACING_DIR); the fallback to
the host-local window while Redis is down or hung; and worker processes of two "hosts" uploading to
the local Doc2X server under the key's limit together.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airflow_provider_doc2x.pacing import (
    FORMAT_VERSION,
    LEGACY_IN_FLIGHT_SECONDS,
    MAX_LEASE_SECONDS,
    RateLimiter,
    RedisRateLimiter,
    key_digest,
    lease_seconds,
    limiter_for,
    reset_limiters,
)
from tests.helpers import API_KEY, FakeClock, free_port, pacing_logs, upload_times, wait_until
from tests.test_pacing import kill_a_worker_holding_the_key

redis = pytest.importorskip("redis", reason="the Redis client comes with apache-airflow-providers-redis")
pytest.importorskip(
    "airflow.providers.redis.hooks.redis", reason="apache-airflow-providers-redis is not installed"
)
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not on PATH (apt-get install redis-server)"
)

CONN_ID = "pacing_redis"
PASSWORD = "s3cret-redis-pw"
BASE_URL = "https://doc2x.example"
KEY = "sk-pacing-test"


class RedisServer:
    """A ``redis-server`` of the test's own on a free loopback port, no persistence, stopped by its pid."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        assert REDIS_SERVER is not None
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port)),
                    *("--dir", str(self.directory), "--save", "", "--appendonly", "no"),
                    *("--requirepass", PASSWORD),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._answers, timeout=20, message=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError((self.directory / "redis.log").read_text()[-2000:])
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # in case a test left it stopped
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, socket_timeout=5)


@pytest.fixture
def redis_server(tmp_path, monkeypatch):
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", server.url)
    monkeypatch.setenv("DOC2X_PACING_DIR", str(tmp_path / "pacing"))
    reset_limiters()
    yield server
    reset_limiters()
    server.stop()


def in_redis(
    tmp_path: Path,
    clock: FakeClock,
    limit: int,
    window: float,
    host: str = "a",
    upload_timeout: float | None = None,
) -> RedisRateLimiter:
    """A limiter on the test key in Redis, standing for one host (its own host-local window file)."""
    return RedisRateLimiter(
        limit,
        window,
        redis_conn_id=CONN_ID,
        redis_key="doc2x:pacing:test",
        state_file=tmp_path / f"host-{host}" / "window.json",
        clock=clock,
        upload_timeout=upload_timeout,
    )


def slots_in(client: redis.Redis, key: str) -> list[bytes]:
    """The slots of a window set in Redis (its ``version`` member left out)."""
    return [member for member in client.zrange(key, 0, -1) if member != b"version"]


@pytest.mark.parametrize(
    ("limit", "count", "duration", "expected"),
    [(3, 7, 0.0, [0, 0, 0, 10, 10, 10, 20]), (1, 3, 4.0, [0, 14, 28]), (2, 5, 3.0, [0, 3, 13, 16, 26])],
)
def test_the_redis_window_keeps_the_host_windows_rules(
    redis_server, tmp_path, caplog, limit, count, duration, expected
):
    clock, host_clock = FakeClock(), FakeClock()
    shared = in_redis(tmp_path, clock, limit, 10.0)
    assert upload_times(shared, clock, count, duration) == expected
    assert upload_times(RateLimiter(limit, 10.0, clock=host_clock), host_clock, count, duration) == expected
    assert redis_server.client().zcard("doc2x:pacing:test") >= 1  # paced in Redis (and on the host)
    assert pacing_logs(caplog) == []


def test_an_upload_in_flight_holds_its_slot_in_redis(redis_server, tmp_path):
    clock = FakeClock()
    limiter = in_redis(tmp_path, clock, 1, 10.0)
    _, slot = limiter.reserve()
    clock.now += 30  # still uploading
    assert limiter.reserve() == (10.0, None)
    limiter.release(slot)
    assert limiter.reserve()[0] == 10.0
    clock.now += 10
    assert limiter.reserve()[1] is not None


def test_two_hosts_on_one_redis_key_pace_as_one(redis_server, tmp_path):
    clock = FakeClock()
    first, second = in_redis(tmp_path, clock, 2, 10.0, "a"), in_redis(tmp_path, clock, 2, 10.0, "b")
    for limiter in (first, second):
        limiter.release(limiter.reserve()[1])
    assert first.reserve() == (10.0, None)
    assert second.reserve() == (10.0, None)
    clock.now += 10
    assert second.reserve()[1] is not None


def test_a_crashed_holder_expires_in_redis_one_window_after_its_lease(redis_server, tmp_path):
    clock = FakeClock()
    crashed = in_redis(tmp_path, clock, 1, 10.0, "a", upload_timeout=2.0)
    alive = in_redis(tmp_path, clock, 1, 10.0, "b", upload_timeout=60.0)
    crashed.reserve()  # never released: its host died
    clock.now += crashed.lease - 0.1
    assert alive.reserve() == (10.0, None)  # in flight: it may still be uploading
    clock.now += 0.1
    assert alive.reserve() == (10.0, None)  # expired: the server may have counted it until then
    clock.now += 10.0
    assert alive.reserve()[1] is not None  # the other host's own, longer lease is its slot's
    clock.now += crashed.lease + 10.0
    assert crashed.reserve() == (10.0, None)
    # And a key nobody uses any more leaves Redis by itself.
    ttl = redis_server.client().pttl("doc2x:pacing:test")
    assert 0 < ttl <= (alive.lease + 10 + 1) * 1000


def test_a_long_upload_renews_its_slot_in_redis(redis_server, tmp_path):
    clock = FakeClock()
    holder = in_redis(tmp_path, clock, 1, 10.0, "a", upload_timeout=2.0)
    other = in_redis(tmp_path, clock, 1, 10.0, "b", upload_timeout=2.0)
    _, slot = holder.reserve()
    for _ in range(5):
        clock.now += holder.lease / 2
        holder.renew(slot)  # what aupload does while the upload runs
        assert other.reserve() == (10.0, None)
    holder.release(slot)
    assert other.reserve() == (10.0, None)
    clock.now += 10.0
    assert other.reserve()[1] is not None


def test_a_killed_worker_frees_the_redis_key_within_its_lease_and_one_window(redis_server, tmp_path):
    limit, window, timeout = 2, 1.0, 2.0
    env = {**os.environ, "DOC2X_PACING_DIR": str(tmp_path / "killed-host")}  # another host
    killed = kill_a_worker_holding_the_key(tmp_path, limit, window, timeout, CONN_ID, env)
    redis_key = f"doc2x:pacing:{key_digest(BASE_URL, KEY)}"
    assert len(slots_in(redis_server.client(), redis_key)) == limit  # booked in Redis, not on its host
    limiter = limiter_for(BASE_URL, KEY, limit, window, pacing_conn_id=CONN_ID, upload_timeout=timeout)
    assert limiter.reserve()[1] is None  # the killed process's uploads still hold the key
    within = killed + lease_seconds(timeout) + window - time.monotonic()  # the bound, from the kill
    wait_until(lambda: limiter.reserve()[1], timeout=within, interval=0.05, message="the first upload")


@pytest.mark.parametrize(("ahead", "warnings"), [(0.5, 0), (9.9, 0), (1e9, 1)])
def test_a_slot_dated_ahead_in_redis_waits_one_window_at_most(
    redis_server, tmp_path, caplog, ahead, warnings
):
    redis_server.client().zadd("doc2x:pacing:test", {"done:x": 1000.0 + ahead})
    clock = FakeClock()
    limiter = in_redis(tmp_path, clock, 1, 10.0)
    with caplog.at_level(logging.WARNING):
        delay, slot = limiter.reserve()
        if ahead <= 10:
            assert (delay, slot) == (10.0, None)  # never more than the window
            clock.now += 10.0
            delay, slot = limiter.reserve()
        if slot is None:  # a slot a little ahead is still in the window: its remainder is waited out
            assert delay == pytest.approx(ahead)
            clock.now += delay
            slot = limiter.reserve()[1]
        assert slot is not None
    assert len(pacing_logs(caplog)) == warnings


@pytest.mark.parametrize(
    "members",
    [
        {"done:x": 1e12},
        {"open:x": 1e12},
        {"lease:x": 1000 + MAX_LEASE_SECONDS + 20},
        {"lease:x": float("inf")},
        {"done:x": 995.0, "version": 1.5},
        {"done:x": 995.0, "version": -1},
    ],
    ids=str,
)
def test_a_redis_key_that_is_not_a_window_starts_anew(redis_server, tmp_path, caplog, members):
    client = redis_server.client()
    client.set("doc2x:pacing:test", "not a window")
    limiter = in_redis(tmp_path, FakeClock(), 1, 10.0)
    with caplog.at_level(logging.WARNING):
        assert limiter.reserve()[1] is not None
    client.delete("doc2x:pacing:test")
    client.zadd("doc2x:pacing:test", members)
    another_host = in_redis(tmp_path, FakeClock(), 1, 10.0, "b")
    assert another_host.reserve()[1] is not None
    assert client.zscore("doc2x:pacing:test", "version") == FORMAT_VERSION
    assert len(slots_in(client, "doc2x:pacing:test")) == 1
    # One warning per limiter (each stands for a host).
    assert ["not hold a valid window" in message for message in pacing_logs(caplog)] == [True, True]


# Two releases on one Redis: the window set's format is versioned; a reader keeps what it does not know.


def test_todays_unversioned_redis_window_is_still_read(redis_server, tmp_path, caplog):
    client = redis_server.client()
    client.zadd("doc2x:pacing:test", {"open:crashed": 995.0, "done:answered": 999.0})
    clock = FakeClock()
    limiter = in_redis(tmp_path, clock, 2, 10.0, upload_timeout=2.0)
    with caplog.at_level(logging.WARNING):
        assert limiter.reserve() == (9.0, None)  # both counted: the answered one until 1009
        clock.now += 9.0
        _, slot = limiter.reserve()
        assert slot is not None  # the one in flight still holds its slot, by its writer's rule
        limiter.release(slot)
        clock.now = 995.0 + LEGACY_IN_FLIGHT_SECONDS + 10.0
        assert limiter.reserve()[1] is not None
    assert client.zscore("doc2x:pacing:test", "version") == FORMAT_VERSION
    assert pacing_logs(caplog) == []


@pytest.mark.parametrize("version", [FORMAT_VERSION, FORMAT_VERSION + 1, 7])
def test_a_redis_window_with_members_of_a_later_release_is_used_and_kept(
    redis_server, tmp_path, caplog, version
):
    client = redis_server.client()
    later = {"version": version, "rule:count-from": 990.0, "budget:2026-05-01": 412.0}
    client.zadd("doc2x:pacing:test", {**later, "lease:other": 1120.0, "done:answered": 999.0})
    client.set("doc2x:pacing:test:pages", "412")  # a later release's state beside the window
    limiter = in_redis(tmp_path, FakeClock(), 3, 10.0, upload_timeout=2.0)
    with caplog.at_level(logging.WARNING):
        _, slot = limiter.reserve()
        assert slot is not None
        assert limiter.reserve() == (9.0, None)  # the later release's slots count
        limiter.release(slot)
    assert {name: client.zscore("doc2x:pacing:test", name) for name in later} == later  # not downgraded
    assert client.zscore("doc2x:pacing:test", "lease:other") == 1120.0
    assert client.get("doc2x:pacing:test:pages") == b"412"
    assert pacing_logs(caplog) == []


def test_a_redis_window_started_anew_keeps_the_members_of_a_later_release(redis_server, tmp_path, caplog):
    client = redis_server.client()
    later = {"version": FORMAT_VERSION, "rule:count-from": 990.0, "budget:2026-05-01": 412.0}
    # a lease longer than this release allows: its slots are not trusted
    client.zadd("doc2x:pacing:test", {**later, "lease:other": 1000.0 + 1200.0, "done:answered": 999.0})
    limiter = in_redis(tmp_path, FakeClock(), 3, 10.0, upload_timeout=2.0)
    with caplog.at_level(logging.WARNING):
        _, slot = limiter.reserve()
        limiter.release(slot)
    assert any("starts anew" in line for line in pacing_logs(caplog))
    assert client.zscore("doc2x:pacing:test", "lease:other") is None  # the slots went ...
    assert {name: client.zscore("doc2x:pacing:test", name) for name in later} == later  # ... the rest stayed


def test_a_later_release_redis_window_this_release_cannot_read_is_left_alone(redis_server, tmp_path, caplog):
    client = redis_server.client()
    members = {"version": FORMAT_VERSION + 1, "lease:other": 1e12, "done:answered": 999.0}
    client.zadd("doc2x:pacing:test", members)
    limiter = in_redis(tmp_path, FakeClock(), 1, 10.0)
    with caplog.at_level(logging.WARNING):
        _, slot = limiter.reserve()  # paced on the host meanwhile
        assert slot is not None
        limiter.release(slot)
    assert {
        name.decode(): score for name, score in client.zrange("doc2x:pacing:test", 0, -1, withscores=True)
    } == members
    assert (tmp_path / "host-a" / "window.json").exists()
    [warning] = pacing_logs(caplog)
    assert "doc2x:pacing:test" in warning and "later release" in warning


def test_the_redis_key_is_a_digest_never_the_api_key(redis_server, tmp_path, caplog):
    limiter = limiter_for(BASE_URL, KEY, 2, 10.0, pacing_conn_id=CONN_ID)
    with limiter.upload():
        pass
    client = redis_server.client()
    assert client.keys("*") == [f"doc2x:pacing:{key_digest(BASE_URL, KEY)}".encode()]
    members = slots_in(client, f"doc2x:pacing:{key_digest(BASE_URL, KEY)}")
    assert len(members) == 1 and members[0].startswith(b"done:")
    assert KEY.encode() not in b"".join(members)
    host_window = json.loads((tmp_path / "pacing" / f"{key_digest(BASE_URL, KEY)}.json").read_text())
    assert (len(host_window["open"]), len(host_window["done"])) == (0, 1)  # the host records it too
    assert KEY not in json.dumps(host_window)
    assert pacing_logs(caplog) == []


def test_limiter_for_looks_nothing_up_and_a_missing_connection_only_warns(redis_server, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        limiter = limiter_for(BASE_URL, KEY, 1, 10.0, pacing_conn_id="no_such_redis")
        assert caplog.records == []
        with limiter.upload():
            pass
    [warning] = pacing_logs(caplog)
    assert "'no_such_redis'" in warning
    assert (tmp_path / "pacing" / f"{key_digest(BASE_URL, KEY)}.json").exists()  # paced on the host


async def test_aupload_talks_to_redis_off_the_event_loop(redis_server, monkeypatch, caplog):
    from airflow.providers.redis.hooks.redis import RedisHook
    from redis.commands.core import Script

    threads = []
    for owner, name in ((RedisHook, "get_conn"), (Script, "__call__")):
        original = getattr(owner, name)

        def spy(*args, _original=original, **kwargs):
            threads.append(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    limiter = limiter_for(BASE_URL, KEY, 2, 0.2, pacing_conn_id=CONN_ID)
    in_window = []

    async def upload():
        async with limiter.aupload():
            in_window.append(
                len(slots_in(redis_server.client(), f"doc2x:pacing:{key_digest(BASE_URL, KEY)}"))
            )

    await asyncio.gather(*(upload() for _ in range(6)))
    assert len(in_window) == 6 and max(in_window) <= 2  # paced in Redis: never more than the limit
    assert threads and threading.get_ident() not in threads
    assert pacing_logs(caplog) == []


def test_redis_down_falls_back_to_the_host_window_with_one_warning_then_comes_back(
    redis_server, tmp_path, caplog
):
    limiter = limiter_for(BASE_URL, KEY, 2, 0.3, pacing_conn_id=CONN_ID)
    assert isinstance(limiter, RedisRateLimiter)
    limiter.fallback_seconds = 0.5
    redis_key = f"doc2x:pacing:{key_digest(BASE_URL, KEY)}"
    host_window = tmp_path / "pacing" / f"{key_digest(BASE_URL, KEY)}.json"
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            with limiter.upload():
                pass
        assert len(slots_in(redis_server.client(), redis_key)) == 2
        assert len(json.loads(host_window.read_text())["done"]) == 2  # recorded on the host too

        redis_server.stop()

        def uploads_on_the_host() -> list[int]:
            """Six uploads; in each, the slots the host's window holds (its own included)."""
            held = []
            for _ in range(6):
                with limiter.upload():
                    window = json.loads(host_window.read_text())
                    recent = [at for at in window["done"] if at > time.time() - 0.3]
                    held.append(len(window["open"]) + len(recent))
            return held

        with ThreadPoolExecutor(1) as pool:  # not stalled: the uploads end within the deadline
            held = pool.submit(uploads_on_the_host).result(timeout=30)
        assert max(held) <= 2  # paced by the host window, by the same rule
        [warning] = pacing_logs(caplog)
        assert repr(CONN_ID) in warning and PASSWORD not in warning

        redis_server.start()

        def redis_used_again() -> bool:
            with limiter.upload():
                pass
            return len(slots_in(redis_server.client(), redis_key)) >= 1

        wait_until(redis_used_again, timeout=30, interval=0.1, message="Redis to be used again")
    assert len(pacing_logs(caplog)) == 1  # one warning for the limiter, however long Redis was down
    assert any("answers again" in message for message in pacing_logs(caplog, logging.INFO))
    assert PASSWORD not in caplog.text


def test_a_hung_redis_does_not_hold_uploads(redis_server, tmp_path, caplog):
    limiter = limiter_for(BASE_URL, KEY, 5, 1.0, pacing_conn_id=CONN_ID)
    assert isinstance(limiter, RedisRateLimiter)
    limiter.socket_timeout = 0.3
    with limiter.upload():
        pass
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:

        def one_upload() -> None:
            with limiter.upload():
                pass

        with ThreadPoolExecutor(1) as pool:  # a hung Redis must not hold the upload: a deadline
            pool.submit(one_upload).result(timeout=10)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    [warning] = pacing_logs(caplog)
    assert "Timeout" in warning


# Two hosts' worker processes against the local Doc2X server: under the key's limit only with Redis.

HOST = """
import os, sys, time
from pathlib import Path
import httpx
import airflow.providers.redis.hooks.redis
from airflow_provider_doc2x.pacing import limiter_for
url, key, conn_id, barrier, *images = sys.argv[1:]
limiter = limiter_for(url, key, 3, 0.5, pacing_conn_id=conn_id or None)
Path(barrier, f"ready-{os.getpid()}").touch()
while not Path(barrier, "go").exists():
    time.sleep(0.01)
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
    for image in images:
        with limiter.upload():
            client.post("/api/v2/async/parse/img/layout", content=Path(image).read_bytes())
"""


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "each-host-alone"])
def test_two_hosts_stay_under_the_key_limit_together(redis_server, doc2x, make_image, tmp_path, shared):
    doc2x.configure(rate_limit=3, rate_window=0.5)
    images = [str(make_image(title=f"Host {n}")) for n in range(24)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    hosts = [
        subprocess.Popen(
            [
                *(sys.executable, "-c", HOST, doc2x.url, API_KEY, CONN_ID if shared else "", str(barrier)),
                *images[index::2],
            ],
            env={**os.environ, "DOC2X_PACING_DIR": str(tmp_path / f"host-{index}")},
        )
        for index in range(2)
    ]
    wait_until(lambda: len(list(barrier.glob("ready-*"))) == 2, timeout=120, message="both hosts")
    (barrier / "go").touch()
    assert [host.wait(timeout=300) for host in hosts] == [0, 0]
    stats = doc2x.stats()
    if shared:
        assert (stats["billed_total"], stats["rate_limited"]) == (24, 0)
        assert redis_server.client().exists(f"doc2x:pacing:{key_digest(doc2x.url, API_KEY)}")
    else:  # what the Redis window prevents: each host paces alone, both together trip the limit
        assert stats["rate_limited"] > 0


def test_redis_down_the_host_window_holds_what_this_host_sent_through_redis(doc2x, redis_server, tmp_path):
    from tests.test_pacing import start_uploader

    doc2x.configure(rate_limit=10, rate_window=5, upload_seconds=0.3, processing_time=0.1)
    conn = doc2x.connection_json(
        rate_limit_images=10, rate_limit_window=5, timeout=3, max_retries=8, pacing_conn_id=CONN_ID
    )
    first = start_uploader(conn, 10, "first", tmp_path / "first.log")
    assert first.wait(timeout=120) == 0
    assert doc2x.stats()["billed_total"] == 10  # the key's whole window, booked in Redis
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGKILL)
    redis_server.process.wait()
    second = start_uploader(conn, 10, "second", tmp_path / "second.log")
    assert second.wait(timeout=120) == 0
    stats = doc2x.stats()
    assert (stats["billed_total"], stats["rate_limited"]) == (20, 0)
