"""
The rolling-window limiter: exact on a fake clock, shared through its file, across processes; and
its file kept private, so that no other local user can steer, stall or crash the uploads of a host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_doc2x.pacing import (
    FORMAT_VERSION,
    LEGACY_IN_FLIGHT_SECONDS,
    RateLimiter,
    key_digest,
    lease_seconds,
    limiter_for,
    pacing_dir,
    reset_limiters,
)
from tests.helpers import FakeClock, async_wait_until, pacing_logs, upload_times, wait_until

NOBODY = 65534
BASE_URL = "https://doc2x.example"
KEY = "sk-pacing-test"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another uid needs root")


@pytest.fixture(autouse=True)
def fresh_limiters(monkeypatch, tmp_path):
    monkeypatch.setenv("DOC2X_PACING_DIR", str(tmp_path / "pacing"))
    reset_limiters()
    yield
    reset_limiters()


def test_at_most_limit_uploads_in_any_window():
    clock = FakeClock()
    assert upload_times(RateLimiter(3, 10.0, clock=clock), clock, 7) == [0, 0, 0, 10, 10, 10, 20]


def test_the_window_counts_from_the_answer_not_the_send():
    clock = FakeClock()
    # Uploads of 4 s: the server may count one as late as its answer, so the next waits 10 s from there.
    assert upload_times(RateLimiter(1, 10.0, clock=clock), clock, 3, duration=4) == [0, 14, 28]


def test_an_upload_in_flight_holds_its_slot():
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, clock=clock)
    _, slot = limiter.reserve()
    clock.now += 30  # still uploading
    assert limiter.reserve() == (10.0, None)
    limiter.release(slot)
    assert limiter.reserve()[0] == 10.0


def test_two_limiters_on_one_file_pace_as_one(tmp_path):
    clock = FakeClock()
    first = RateLimiter(2, 10.0, state_file=tmp_path / "key.json", clock=clock)
    second = RateLimiter(2, 10.0, state_file=tmp_path / "key.json", clock=clock)
    for limiter in (first, second):
        limiter.release(limiter.reserve()[1])
    assert first.reserve() == (10.0, None)
    assert second.reserve() == (10.0, None)


def test_a_crashed_upload_frees_its_slot_one_window_after_its_lease(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=tmp_path / "key.json", clock=clock, upload_timeout=2.0)
    assert limiter.lease == lease_seconds(2.0) < 60
    limiter.reserve()  # never released: its process died
    clock.now += limiter.lease - 0.1
    assert limiter.reserve() == (10.0, None)  # in flight: it may still be uploading
    clock.now += 0.1
    assert limiter.reserve() == (10.0, None)  # expired: the server may have counted it until then
    clock.now += 10.0
    assert limiter.reserve()[1] is not None


def test_each_slot_keeps_the_lease_of_the_connection_that_booked_it(tmp_path):
    clock = FakeClock()
    quick = RateLimiter(1, 10.0, state_file=tmp_path / "key.json", clock=clock, upload_timeout=2.0)
    slow = RateLimiter(1, 10.0, state_file=tmp_path / "key.json", clock=clock, upload_timeout=60.0)
    quick.reserve()  # never released
    clock.now += quick.lease + 10.0
    assert slow.reserve()[1] is not None  # never released either
    booked = clock.now
    clock.now += quick.lease + 10.0
    assert quick.reserve() == (10.0, None)  # the slow connection's upload may still be on its way
    clock.now = booked + slow.lease
    assert quick.reserve() == (10.0, None)  # then it counts from its expiry, for one window
    clock.now += 10.0
    assert quick.reserve()[1] is not None


async def test_a_long_upload_renews_its_slot(tmp_path, monkeypatch):
    from airflow_provider_doc2x.pacing import window

    monkeypatch.setattr(window, "IN_FLIGHT_MARGIN_SECONDS", 0.4)
    state_file = tmp_path / "key.json"
    holder = RateLimiter(1, 0.2, state_file=state_file, upload_timeout=0.1)
    other = RateLimiter(1, 0.2, state_file=state_file, upload_timeout=0.1)
    assert holder.lease == pytest.approx(0.5)
    async with holder.aupload():
        # Held for several leases (as an upload waiting for a connection before its exchange): renewed.
        deadline = time.monotonic() + 5 * holder.lease
        while time.monotonic() < deadline:
            assert other.reserve()[1] is None
            await asyncio.sleep(holder.lease / 4)
    assert len(json.loads(state_file.read_text())["done"]) == 1


async def test_a_cancelled_upload_frees_the_slot_its_thread_booked():
    booking = threading.Event()
    entered = threading.Event()

    class SlowLimiter(RateLimiter):
        def book(self):
            entered.set()
            booking.wait(5)  # the window file is slow to lock
            return super().book()

    clock = FakeClock()
    limiter = SlowLimiter(1, 10.0, clock=clock)

    async def upload():
        async with limiter.aupload():
            raise AssertionError("the upload was cancelled before it got a slot")

    task = asyncio.create_task(upload())
    await async_wait_until(entered.is_set, message="the booking thread to start")
    task.cancel()
    await asyncio.sleep(0)
    booking.set()  # the thread books the slot after its caller gave up
    with pytest.raises(asyncio.CancelledError):
        await task
    clock.now += 10  # a released slot has left the window by now; one still in flight would not
    await async_wait_until(lambda: limiter.reserve()[1] is not None, message="the slot to be released")


# The folder and the file: private to this user.


def window_file(folder: Path) -> Path:
    return folder / f"{key_digest(BASE_URL, KEY)}.json"


def test_limiter_for_touches_nothing_before_the_first_upload(tmp_path):
    limiter = limiter_for(BASE_URL, KEY, 2, 10.0)
    assert limiter is limiter_for(BASE_URL, KEY, 2, 10.0)
    assert not (tmp_path / "pacing").exists()
    limiter.release(limiter.reserve()[1])
    window = json.loads(window_file(tmp_path / "pacing").read_text())
    assert (window["open"], len(window["done"])) == ({}, 1)
    assert KEY not in window_file(tmp_path / "pacing").read_text()


def test_reset_limiters_forgets_them():
    limiter = limiter_for(BASE_URL, KEY, 2, 10.0)
    reset_limiters()
    assert limiter_for(BASE_URL, KEY, 2, 10.0) is not limiter


def test_a_new_folder_is_0700_and_a_new_window_file_0600(tmp_path):
    mask = os.umask(0)  # nothing taken away: the modes are asked for, not left to the umask
    try:
        limiter = limiter_for(BASE_URL, KEY, 2, 10.0)
        limiter.release(limiter.reserve()[1])
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.lstat(tmp_path / "pacing").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(window_file(tmp_path / "pacing")).st_mode) == 0o600


def test_a_folder_of_ours_open_to_others_is_closed(tmp_path):
    folder = tmp_path / "pacing"
    folder.mkdir()
    folder.chmod(0o777)
    window_file(folder).write_text('{"open": {}, "done": []}')
    window_file(folder).chmod(0o666)
    limiter = limiter_for(BASE_URL, KEY, 2, 10.0)
    assert limiter.reserve()[1] is not None
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(window_file(folder)).st_mode) == 0o600
    assert len(json.loads(window_file(folder).read_text())["open"]) == 1  # still used: it is ours


@needs_root
def test_a_folder_of_another_user_is_refused_and_pacing_goes_on(tmp_path, caplog):
    folder = tmp_path / "pacing"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=window_file(folder), clock=clock)
    with caplog.at_level(logging.WARNING):
        limiter.release(limiter.reserve()[1])
        assert limiter.reserve() == (10.0, None)  # paced in memory, by the same rules
        clock.now += 10
        assert limiter.reserve()[1] is not None
    assert list(folder.iterdir()) == []
    [warning] = pacing_logs(caplog)
    assert str(folder) in warning and "uid 65534" in warning and "DOC2X_PACING_DIR" in warning


@needs_root
def test_doc2x_pacing_dir_of_another_user_is_refused(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    os.chown(folder, NOBODY, NOBODY)  # made by another local user before the workers started
    monkeypatch.setenv("DOC2X_PACING_DIR", str(folder))
    limiter = limiter_for(BASE_URL, KEY, 2, 10.0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            limiter.release(limiter.reserve()[1])
    assert list(folder.iterdir()) == []
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o777  # not ours: left alone
    assert [str(folder) in warning for warning in pacing_logs(caplog)] == [True]


def test_a_symlinked_folder_is_refused(tmp_path, caplog):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "pacing").symlink_to(real)
    limiter = limiter_for(BASE_URL, KEY, 2, 10.0)
    with caplog.at_level(logging.WARNING):
        limiter.release(limiter.reserve()[1])
    assert list(real.iterdir()) == []
    assert ["symbolic link" in warning for warning in pacing_logs(caplog)] == [True]


def test_a_symlinked_window_file_is_not_followed(tmp_path, caplog):
    folder = tmp_path / "pacing"
    folder.mkdir(mode=0o700)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    window_file(folder).symlink_to(target)
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=window_file(folder), clock=clock)
    with caplog.at_level(logging.WARNING):
        limiter.release(limiter.reserve()[1])
        assert limiter.reserve() == (10.0, None)  # paced in memory
    assert target.read_text() == "keep me"
    assert [str(window_file(folder)) in warning for warning in pacing_logs(caplog)] == [True]


@pytest.mark.parametrize(
    "contents",
    [
        "{}",
        "garbage",
        "[1, 2]",
        '{"open": [], "done": []}',
        '{"open": {"a": "1000"}, "done": []}',
        '{"open": {}, "done": [true]}',
        '{"open": {}, "done": [NaN]}',
        '{"open": {}, "done": [1e400]}',
        '{"open": {}, "done": [1' + "0" * 400 + "]}",
        '{"version": "2", "open": {}, "done": []}',
        '{"version": 0, "open": {}, "done": []}',
        '{"version": true, "open": {}, "done": []}',
        '{"version": 2.0, "open": {}, "done": []}',
        '{"version": 2, "open": {"a": 1000.0}, "done": []}',
        '{"version": 2, "open": {"a": [1000.0]}, "done": []}',
        '{"version": 2, "open": {"a": [1000.0, 1001.0, 1]}, "done": []}',
        '{"version": 2, "open": {"a": [1000.0, 999.0]}, "done": []}',
        '{"version": 2, "open": {"a": [1000.0, 1e12]}, "done": []}',
        '{"version": 2, "open": {"a": [1000.0, NaN]}, "done": []}',
        '{"version": 2, "open": {}}',
        '{"version": 1, "open": {"a": [1000.0, 1001.0]}, "done": []}',
        "[" * 100_000,
        '[{"id": 1, "at": 1000.0, "open": false}]',
        '[{"id": "a", "at": "1000", "open": false}]',
        '[{"id": "a", "at": true, "open": false}]',
        '[{"id": "a", "at": NaN, "open": false}]',
        '[{"id": "a", "at": 1e400, "open": false}]',
        '[{"id": "a", "at": 1' + "0" * 400 + ', "open": false}]',
        '[{"id": "a", "at": 1000.0, "open": 1}]',
        '[{"id": "a", "at": 1000.0}]',
        '{"id": "a", "at": 1000.0, "open": false}',
        "\udcff",
    ],
    ids=lambda contents: contents[:24].encode("ascii", "backslashreplace").decode(),
)
def test_contents_that_are_not_a_window_start_anew_with_one_warning(tmp_path, caplog, contents):
    state_file = tmp_path / "key.json"
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=state_file, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            state_file.write_bytes(contents.encode("utf-8", "surrogateescape"))
            delay, slot = limiter.reserve()
            assert (delay, slot is None) == (0.0, False)
            limiter.release(slot)
    window = json.loads(state_file.read_text())
    assert (window["version"], window["open"], len(window["done"])) == (FORMAT_VERSION, {}, 1)
    [warning] = pacing_logs(caplog)  # once per limiter, not per call
    assert str(state_file) in warning and "starts anew" in warning


def test_a_slot_dated_far_ahead_is_dropped(tmp_path, caplog):
    state_file = tmp_path / "key.json"
    state_file.write_text(json.dumps({"open": {}, "done": [1e12]}))
    limiter = RateLimiter(1, 10.0, state_file=state_file, clock=FakeClock())
    with caplog.at_level(logging.WARNING):
        assert limiter.reserve()[0] == 0.0
    assert len(pacing_logs(caplog)) == 1


# Two releases on one host: the window file's format is versioned; a reader keeps what it does not know.


def test_todays_unversioned_window_file_is_still_read(tmp_path, caplog):
    state_file = tmp_path / "key.json"
    state_file.write_text(json.dumps({"open": {"crashed": 995.0}, "done": [999.0]}))
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=state_file, clock=clock, upload_timeout=2.0)
    with caplog.at_level(logging.WARNING):
        assert limiter.reserve() == (9.0, None)  # both slots counted: the answered one until 1009
        window = json.loads(state_file.read_text())
        assert window["version"] == FORMAT_VERSION
        assert window["open"] == {"crashed": [995.0, 995.0 + LEGACY_IN_FLIGHT_SECONDS]}  # its writer's rule
        assert window["done"] == [999.0]
        clock.now += 9.0
        assert limiter.reserve()[1] is not None  # the answered one has left the window
    assert pacing_logs(caplog) == []


NEWER_FIELDS = {
    "learned": {"count_from": "arrival", "learned_at": 990.0, "days": 1},
    "pages": {"day": "2026-05-01", "used": 412, "budget": 2000},
    "empty": [],
    "precise": 0.1234567890123456789,
}


@pytest.mark.parametrize("version", [FORMAT_VERSION, FORMAT_VERSION + 1, 7])
def test_a_window_file_with_fields_of_a_later_release_is_used_and_kept(tmp_path, caplog, version):
    state_file = tmp_path / "key.json"
    written = {"version": version, "open": {"other": [998.0, 1120.0]}, "done": [999.0], **NEWER_FIELDS}
    state_file.write_text(json.dumps(written))
    clock = FakeClock()
    limiter = RateLimiter(3, 10.0, state_file=state_file, clock=clock, upload_timeout=2.0)
    with caplog.at_level(logging.WARNING):
        _, slot = limiter.reserve()
        assert slot is not None
        assert limiter.reserve() == (9.0, None)  # the later release's slots count: one in flight, one done
        limiter.release(slot)
    window = json.loads(state_file.read_text())
    assert window["version"] == version  # never downgraded
    assert {name: window[name] for name in NEWER_FIELDS} == NEWER_FIELDS  # kept as they were
    assert window["open"] == {"other": [998.0, 1120.0]}
    assert window["done"] == [999.0, 1000.0]
    assert pacing_logs(caplog) == []


@pytest.mark.parametrize(
    "slots",
    [
        {"open": {}, "done": [1060.0]},  # the host's clock was stepped back by two windows
        {"open": {"other": [1000.0, 2200.0]}, "done": []},  # a lease longer than this release allows
    ],
    ids=["answered-far-ahead", "lease-too-long"],
)
def test_a_window_started_anew_keeps_the_fields_of_a_later_release(tmp_path, caplog, slots):
    state_file = tmp_path / "key.json"
    state_file.write_text(json.dumps({"version": FORMAT_VERSION, **slots, **NEWER_FIELDS}))
    limiter = RateLimiter(3, 30.0, state_file=state_file, clock=FakeClock(), upload_timeout=2.0)
    with caplog.at_level(logging.WARNING):
        _, slot = limiter.reserve()
        limiter.release(slot)
    assert any("starts anew" in line for line in pacing_logs(caplog))  # its slots were not trusted ...
    window = json.loads(state_file.read_text())
    assert window["done"] == [1000.0]
    assert {name: window[name] for name in NEWER_FIELDS} == NEWER_FIELDS  # ... but the rest is kept


def test_a_later_release_window_this_release_cannot_read_is_left_alone(tmp_path, caplog):
    state_file = tmp_path / "key.json"
    contents = json.dumps({"version": FORMAT_VERSION + 1, "open": {"a": {"since": 998.0}}, "done": []})
    state_file.write_text(contents)
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=state_file, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            _, slot = limiter.reserve()  # paced in memory, by the same rules
            assert slot is not None
            limiter.release(slot)
            assert limiter.reserve() == (10.0, None)
            clock.now += 10.0
    assert state_file.read_text() == contents  # neither reset nor rewritten
    [warning] = pacing_logs(caplog)
    assert str(state_file) in warning and "later release" in warning and "Upgrade" in warning


# A worker killed with uploads in flight: the key is free again within the slots' lease and a window.

HOLDER = """
import asyncio, contextlib, sys
from pathlib import Path
import airflow_provider_doc2x.pacing as pacing
base_url, key, limit, window, timeout, conn_id, ready = sys.argv[1:]
limiter = pacing.limiter_for(
    base_url, key, int(limit), float(window), pacing_conn_id=conn_id or None, upload_timeout=float(timeout)
)

async def hold():
    async with contextlib.AsyncExitStack() as uploads:
        for _ in range(int(limit)):
            await uploads.enter_async_context(limiter.aupload())
        Path(ready).touch()
        await asyncio.Event().wait()  # uploads that never end: the process is killed with them in flight

asyncio.run(hold())
"""


def kill_a_worker_holding_the_key(
    tmp_path: Path, limit: int, window: float, timeout: float, conn_id: str = "", env: dict | None = None
) -> float:
    """Start a process that holds ``limit`` uploads in flight, SIGKILL it once it holds them; return when."""
    ready = tmp_path / "holder-ready"
    args = [BASE_URL, KEY, str(limit), str(window), str(timeout), conn_id, str(ready)]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *args], env=env or os.environ.copy())
    try:

        def holding() -> bool:
            if holder.poll() is not None:
                raise AssertionError(f"the holding process exited with {holder.returncode}")
            return ready.exists()

        wait_until(holding, timeout=60, message="the holding process to hold its uploads")
    finally:
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    return killed


def test_a_killed_worker_frees_the_key_within_its_lease_and_one_window(tmp_path):
    limit, window, timeout = 2, 1.0, 2.0
    killed = kill_a_worker_holding_the_key(tmp_path, limit, window, timeout)
    limiter = limiter_for(BASE_URL, KEY, limit, window, upload_timeout=timeout)
    assert limiter.reserve()[1] is None  # the killed process's uploads still hold the key
    within = killed + lease_seconds(timeout) + window - time.monotonic()  # the bound, from the kill
    wait_until(lambda: limiter.reserve()[1], timeout=within, interval=0.05, message="the first upload")


def test_the_hook_paces_with_its_connections_timeout(doc2x, monkeypatch):
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook

    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(timeout=3))
    hook = Doc2XHook()
    assert hook.pacer(hook.settings).lease == lease_seconds(3.0)


@pytest.mark.parametrize(("ahead", "warnings"), [(0.5, 0), (9.9, 0)])
def test_a_slot_dated_ahead_of_the_clock_waits_one_window_at_most(tmp_path, caplog, ahead, warnings):
    state_file = tmp_path / "key.json"
    state_file.write_text(json.dumps({"open": {}, "done": [1000.0 + ahead]}))
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=state_file, clock=clock)
    with caplog.at_level(logging.WARNING):
        assert limiter.reserve() == (10.0, None)  # never more than the window
        clock.now += 10.0
        delay, slot = limiter.reserve()
        if slot is None:  # a slot a little ahead is still in the window: its remainder is waited out
            assert delay == pytest.approx(ahead)
            clock.now += delay
            slot = limiter.reserve()[1]
        assert slot is not None
    # Up to a window ahead (a clock stepped back) is waited out; further is not a window: it starts anew.
    assert len(pacing_logs(caplog)) == warnings


def test_a_clock_set_back_keeps_the_window_and_waits_it_out(tmp_path, caplog):
    clock = FakeClock()
    limiter = RateLimiter(3, 10.0, state_file=tmp_path / "key.json", clock=clock)
    for _ in range(3):
        limiter.release(limiter.reserve()[1])
    clock.now -= 2  # NTP stepped the clock back
    with caplog.at_level(logging.WARNING):
        assert limiter.reserve() == (10.0, None)  # the window is kept, not wiped
        clock.now += 10.0
        assert limiter.reserve() == (pytest.approx(2.0), None)
        clock.now += 2.0
        assert limiter.reserve()[1] is not None
    assert pacing_logs(caplog) == []


def test_an_upload_never_sleeps_past_the_window(tmp_path):
    state_file = tmp_path / "key.json"
    limiter = RateLimiter(1, 0.2, state_file=state_file)
    done = threading.Event()

    def upload():
        state_file.write_text(json.dumps({"open": {}, "done": [time.time() + 1e6]}))
        with limiter.upload():
            pass
        state_file.write_text(json.dumps({"open": {}, "done": [time.time() + 0.19]}))
        with limiter.upload():
            done.set()

    threading.Thread(target=upload, daemon=True).start()
    assert done.wait(5)


# Where the window files are kept by default: a private folder, never a shared /tmp.


def test_the_default_folder_is_the_private_runtime_dir(tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.delenv("DOC2X_PACING_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    assert pacing_dir() == runtime / "airflow-doc2x-pacing"
    runtime.chmod(0o755)  # not private: not trusted
    assert pacing_dir() == tmp_path / "airflow" / "doc2x-pacing"


def test_the_default_folder_is_in_airflow_home(tmp_path, monkeypatch):
    monkeypatch.delenv("DOC2X_PACING_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    limiter = limiter_for(BASE_URL, KEY, 2, 10.0)
    limiter.release(limiter.reserve()[1])
    assert window_file(tmp_path / "airflow" / "doc2x-pacing").exists()
    monkeypatch.delenv("AIRFLOW_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pacing_dir() == tmp_path / "home" / "airflow" / "doc2x-pacing"


SUBMIT = "import sys\nfrom airflow_provider_doc2x.hooks.doc2x import Doc2XHook\nhook = Doc2XHook()\n[hook.submit_image(p) for p in sys.argv[1:]]"


def test_processes_sharing_a_key_stay_under_its_limit(doc2x, make_image, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(rate_limit_images=3, rate_limit_window=0.5)
    )
    doc2x.configure(rate_limit=3, rate_window=0.5)
    images = [str(make_image(title=f"Shared {n}")) for n in range(24)]
    workers = [
        subprocess.Popen([sys.executable, "-c", SUBMIT, *images[index::3]], env=os.environ.copy())
        for index in range(3)
    ]
    assert [worker.wait(timeout=300) for worker in workers] == [0, 0, 0]
    stats = doc2x.stats()
    assert stats["billed_total"] == 24
    assert stats["rate_limited"] == 0


# A worker stopped (SIGSTOP, a blocked loop) between booking its slots and sending: the slots expire
# and other workers take the key; the stopped uploads must book again before they are sent.

UPLOADER = """
import asyncio, json, sys
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.local.samples import Page, render

async def one(hook, tag, index):
    image = render(Page(title=f"{tag} {index}"), fmt="PNG", size=(200, 150))
    try:
        await hook.aparse_image(image, source=f"{tag}-{index}.png")
        print(json.dumps({"ok": index}), flush=True)
    except Exception as error:
        print(json.dumps({"error": index, "kind": type(error).__name__}), flush=True)

async def main(count, tag):
    hook = Doc2XHook()
    await asyncio.gather(*(one(hook, tag, index) for index in range(count)))

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def start_uploader(conn: str, count: int, tag: str, out: Path) -> subprocess.Popen:
    """A worker process that parses ``count`` images at once through the hook on one event loop."""
    env = {**os.environ, "AIRFLOW_CONN_DOC2X_DEFAULT": conn}
    with open(out, "w") as log:
        return subprocess.Popen([sys.executable, "-c", UPLOADER, str(count), tag], env=env, stdout=log)


def outcomes(log: Path) -> list[dict]:
    """The uploader's outcome lines (Airflow 2 logs to the same stdout)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def open_slots(folder: Path) -> set[str]:
    """The slots in flight in the host's window file of the test's only key."""
    files = list(folder.glob("*.json"))
    try:
        return set(json.loads(files[0].read_text())["open"]) if files else set()
    except ValueError:  # caught between a truncate and a write
        return set()


def test_a_stopped_worker_books_again_before_it_sends_on_an_expired_slot(doc2x, tmp_path):
    # 20 slots booked, 16 uploads at the server (the loop's gate), 4 waiting at the gate; then stopped
    # for longer than the lease and a window, while another worker takes the whole key.
    doc2x.configure(rate_limit=20, rate_window=4, upload_seconds=1.0, processing_time=0.1)
    conn = doc2x.connection_json(rate_limit_images=20, rate_limit_window=4, timeout=2, max_retries=8)
    stopped = start_uploader(conn, 24, "stopped", tmp_path / "stopped.log")
    other = None
    try:
        wait_until(
            lambda: len(open_slots(tmp_path / "pacing")) == 20 and doc2x.stats()["uploads_in_flight"] >= 16,
            timeout=60,
            interval=0.005,
            message="the first worker to hold the key's 20 slots",
        )
        os.kill(stopped.pid, signal.SIGSTOP)
        held = open_slots(tmp_path / "pacing")
        other = start_uploader(conn, 20, "other", tmp_path / "other.log")
        # The stopped worker's slots expire and the other worker's 20 uploads take the key.
        wait_until(
            lambda: (
                len(open_slots(tmp_path / "pacing") - held) == 20 and doc2x.stats()["uploads_in_flight"] >= 16
            ),
            timeout=120,
            interval=0.005,
            message="the other worker to upload once the stopped worker's slots expired",
        )
        os.kill(stopped.pid, signal.SIGCONT)
        assert stopped.wait(timeout=120) == 0 and other.wait(timeout=120) == 0
    finally:
        for process in (stopped, other):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
                process.wait()
    assert doc2x.stats()["rate_limited"] == 0
    lines = outcomes(tmp_path / "other.log")
    assert sorted(line["ok"] for line in lines if "ok" in line) == list(range(20))
    waited = outcomes(tmp_path / "stopped.log")
    # The 16 sent before the stop lost their answers to the deadline; the 4 that had not been sent
    # booked again and were parsed.
    assert len([line for line in waited if "ok" in line]) >= 4
