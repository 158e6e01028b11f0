"""
The key's daily page budget, kept where the key is paced: in the host's private pacing folder, shared
by the host's processes, or in a real ``redis-server`` shared by two "hosts" (each its own
DOC2X_PACING_DIR). Booking processes run side by side and never pass the budget together; a refusal
names the file, its pages, the pages booked, the budget, the day and the extra that raises it; a
store that cannot be trusted or reached refuses too (it fails closed). The day is injected through
the budget's clock, never waited for.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_doc2x.exceptions import (
    Doc2XBudgetError,
    Doc2XBudgetUnavailableError,
    Doc2XInputError,
    is_permanent,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.pacing import (
    KEEP_DAYS,
    DailyPageBudget,
    daily_budget_for,
    key_digest,
    reset_limiters,
)
from airflow_provider_doc2x.settings import Doc2XSettings
from tests.helpers import FakeClock, pacing_logs, wait_until

try:  # the Redis tests need the Redis provider; the host's file does not
    from tests.test_pacing_redis import (
        CONN_ID,
        PASSWORD,
        REDIS_SERVER,
        RedisServer,
        redis_server,  # noqa: F401 (the fixture)
    )
except pytest.skip.Exception:
    CONN_ID = PASSWORD = ""
    REDIS_SERVER = None
    RedisServer = None  # type: ignore[assignment,misc]

needs_redis = pytest.mark.skipif(
    RedisServer is None or REDIS_SERVER is None,
    reason="needs apache-airflow-providers-redis and redis-server on PATH",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another uid needs root")

BASE_URL = "https://doc2x.example"
KEY = "sk-daily-budget-test"
NOBODY = 65534


@pytest.fixture(autouse=True)
def fresh_budgets():
    reset_limiters()
    yield
    reset_limiters()


def at(moment: str) -> float:
    """A wall-clock time given with its offset (``2026-12-07T10:00+00:00``), as the budget's clock reads it."""
    return datetime.datetime.fromisoformat(moment).timestamp()


def clock_at(moment: str) -> FakeClock:
    clock = FakeClock()
    clock.now = at(moment)
    return clock


def on_host(folder: Path, pages: int, clock: FakeClock, timezone: str = "UTC") -> DailyPageBudget:
    """A budget of the test key in the host's file under ``folder``."""
    return DailyPageBudget(
        pages, digest="test", timezone=timezone, state_file=folder / "test.budget.json", clock=clock
    )


def settings(pages: int | None, **extra) -> Doc2XSettings:
    return Doc2XSettings(base_url=BASE_URL, api_key=KEY, daily_page_budget=pages, **extra)


# Processes that book at once, each for one page at a time, until the budget refuses them.

BOOKER = """
import json, os, sys, time
from pathlib import Path
from airflow_provider_doc2x.exceptions import Doc2XBudgetError
from airflow_provider_doc2x.pacing import daily_budget_for
from airflow_provider_doc2x.settings import Doc2XSettings
base_url, key, pages, attempts, conn_id, barrier = sys.argv[1:]
budget = daily_budget_for(
    Doc2XSettings(
        base_url=base_url, api_key=key, daily_page_budget=int(pages), pacing_conn_id=conn_id or None
    )
)
Path(barrier, f"ready-{os.getpid()}").touch()
while not Path(barrier, "go").exists():
    time.sleep(0.005)
booked, refusals = 0, []
for n in range(int(attempts)):
    try:
        budget.book(1, what=f"part-{os.getpid()}-{n}.pdf")
        booked += 1
    except Doc2XBudgetError as error:
        refusals.append(str(error))
print(json.dumps({"booked": booked, "refusals": len(refusals), "first_refusal": refusals[:1]}))
"""


def book_side_by_side(tmp_path: Path, pages: int, attempts: int, pacing_dirs: list[Path], conn_id: str = ""):
    """One booking process per pacing folder, started together; what each booked and was refused."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BOOKER, BASE_URL, KEY, str(pages), str(attempts), conn_id, str(barrier)],
            env={**os.environ, "DOC2X_PACING_DIR": str(folder)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for folder in pacing_dirs
    ]
    wait_until(
        lambda: len(list(barrier.glob("ready-*"))) == len(processes), timeout=120, message="the bookers"
    )
    (barrier / "go").touch()
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * len(processes)
    return [json.loads(output.splitlines()[-1]) for output in outputs]  # Airflow may log before it


# The host's file.


def test_two_processes_of_a_host_booking_at_once_never_pass_the_budget(tmp_path):
    folder = tmp_path / "pacing"
    results = book_side_by_side(tmp_path, pages=300, attempts=250, pacing_dirs=[folder, folder])
    assert sum(result["booked"] for result in results) == 300
    assert sum(result["refusals"] for result in results) == 200
    day = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    [refusal] = next(result["first_refusal"] for result in results if result["refusals"])
    assert f"300 of 300 pages are booked for {day} (UTC)" in refusal
    saved = json.loads((folder / f"{key_digest(BASE_URL, KEY)}.budget.json").read_text())
    assert saved == {"version": 1, "days": {day: 300}}


def test_a_refusal_names_the_file_its_pages_the_pages_booked_the_budget_the_day_and_the_extra(tmp_path):
    budget = on_host(tmp_path / "pacing", 10, clock_at("2026-12-07T10:00+00:00"))
    first = budget.book(7, what="s3://bucket/a.pdf")
    assert (first.pages, first.day, first.booked, first.remaining) == (7, "2026-12-07", 7, 3)
    with pytest.raises(Doc2XBudgetError) as refused:
        budget.book(4, what="s3://bucket/b.pdf")
    message = str(refused.value)
    assert "s3://bucket/b.pdf" in message and refused.value.source == "s3://bucket/b.pdf"
    for told in (
        "4 pages",
        "7 of 10 pages are booked for 2026-12-07 (UTC)",
        "3 are left",
        "daily_page_budget",
    ):
        assert told in message
    assert is_permanent(refused.value)  # a new try would be refused the same way today
    assert budget.remaining() == 3  # the refused pages were not booked
    assert budget.book(3, what="s3://bucket/c.pdf").remaining == 0

    with pytest.raises(Doc2XBudgetError, match="larger than the whole budget"):
        on_host(tmp_path / "other", 10, clock_at("2026-12-07T10:00+00:00")).book(11, what="big.pdf")


def test_release_gives_the_pages_back_once_and_never_below_zero(tmp_path):
    folder = tmp_path / "pacing"
    budget = on_host(folder, 10, clock_at("2026-12-07T10:00+00:00"))
    refused_unbilled = budget.book(6, what="a.pdf")
    budget.book(2, what="b.pdf")
    assert budget.remaining() == 2
    budget.release(refused_unbilled)
    assert budget.remaining() == 8
    budget.release(refused_unbilled)  # given back once only
    assert budget.remaining() == 8

    booking = budget.book(5, what="c.pdf")
    (folder / "test.budget.json").write_text(
        '{"version": 1, "days": {"2026-12-07": 1}}'
    )  # counted less meanwhile
    budget.release(booking)
    assert json.loads((folder / "test.budget.json").read_text())["days"] == {"2026-12-07": 0}
    assert budget.remaining() == 10


def test_a_new_day_starts_at_zero_and_keeps_the_day_before_as_it_was(tmp_path):
    clock = clock_at("2026-12-07T23:59+00:00")
    budget = on_host(tmp_path / "pacing", 10, clock)
    last_of_the_day = budget.book(10, what="late.pdf")
    with pytest.raises(Doc2XBudgetError):
        budget.book(1, what="one-more.pdf")
    clock.now = at("2026-12-08T00:01+00:00")
    assert budget.remaining() == 10
    assert budget.book(4, what="early.pdf").day == "2026-12-08"
    budget.release(last_of_the_day)  # its day is over: nothing is given back, to either day
    assert budget.remaining() == 6
    saved = json.loads((tmp_path / "pacing" / "test.budget.json").read_text())
    assert saved["days"] == {"2026-12-07": 10, "2026-12-08": 4}


def test_the_day_is_that_of_the_budgets_time_zone(tmp_path):
    clock = clock_at("2026-12-07T15:59+00:00")  # 23:59 in Shanghai
    shanghai = on_host(tmp_path / "shanghai", 10, clock, timezone="Asia/Shanghai")
    utc = on_host(tmp_path / "utc", 10, clock)
    assert shanghai.book(10, what="a.pdf").day == "2026-12-07"
    assert utc.book(10, what="a.pdf").day == "2026-12-07"
    clock.now = at("2026-12-07T16:01+00:00")  # a new day in Shanghai, not in UTC
    assert (shanghai.remaining(), utc.remaining()) == (10, 0)
    assert shanghai.book(3, what="b.pdf").day == "2026-12-08"
    with pytest.raises(Doc2XBudgetError, match=r"for 2026-12-07 \(UTC\)"):
        utc.book(3, what="b.pdf")


def test_the_file_keeps_the_last_days_and_what_it_does_not_know(tmp_path):
    folder = tmp_path / "pacing"
    folder.mkdir(mode=0o700)
    old_days = {f"2026-11-{day:02d}": day for day in range(1, 21)}
    (folder / "test.budget.json").write_text(
        json.dumps({"version": 2, "days": old_days, "per_dag": {"nightly": 3}})  # a later release's file
    )
    budget = on_host(folder, 100, clock_at("2026-12-07T10:00+00:00"))
    budget.book(5, what="a.pdf")
    saved = json.loads((folder / "test.budget.json").read_text())
    assert saved["version"] == 2 and saved["per_dag"] == {"nightly": 3}
    assert len(saved["days"]) == KEEP_DAYS
    assert saved["days"]["2026-12-07"] == 5 and "2026-11-20" in saved["days"]


GARBLED = [
    "not json at all",
    "[]",
    '{"days": {}}',
    '{"version": "1", "days": {}}',
    '{"version": 1, "days": {"yesterday": 3}}',
    '{"version": 1, "days": {"2026-12-07": -2}}',
    '{"version": 1, "days": {"2026-12-07": 2.5}}',
    '{"version": 1, "days": [["2026-12-07", 3]]}',
]


@pytest.mark.parametrize("contents", GARBLED)
def test_a_file_that_is_not_a_budget_fails_closed_and_is_left_alone(tmp_path, contents):
    folder = tmp_path / "pacing"
    folder.mkdir(mode=0o700)
    budget_file = folder / "test.budget.json"
    budget_file.write_text(contents)
    budget = on_host(folder, 100, clock_at("2026-12-07T10:00+00:00"))
    with pytest.raises(Doc2XBudgetUnavailableError) as unavailable:
        budget.book(1, what="a.pdf")
    message = str(unavailable.value)
    assert str(budget_file) in message and "does not hold a page budget" in message and "remove it" in message
    assert unavailable.value.source == "a.pdf"
    assert not is_permanent(unavailable.value)  # the task's retries apply once the file is fixed
    with pytest.raises(Doc2XBudgetUnavailableError):
        budget.remaining()
    assert budget_file.read_text() == contents


def test_a_later_releases_file_this_release_cannot_read_fails_closed(tmp_path):
    folder = tmp_path / "pacing"
    folder.mkdir(mode=0o700)
    contents = '{"version": 2, "days": [{"day": "2026-12-07", "pages": 40}]}'
    (folder / "test.budget.json").write_text(contents)
    budget = on_host(folder, 100, clock_at("2026-12-07T10:00+00:00"))
    with pytest.raises(Doc2XBudgetUnavailableError, match=r"later release.*format 2.*upgraded"):
        budget.book(1, what="a.pdf")
    assert (folder / "test.budget.json").read_text() == contents


def test_a_symlinked_folder_fails_closed_and_nothing_is_written(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "pacing").symlink_to(real)
    budget = on_host(tmp_path / "pacing", 100, clock_at("2026-12-07T10:00+00:00"))
    with pytest.raises(Doc2XBudgetUnavailableError, match=r"symbolic link.*DOC2X_PACING_DIR"):
        budget.book(1, what="a.pdf")
    assert list(real.iterdir()) == []


@needs_root
def test_a_folder_of_another_user_fails_closed(tmp_path):
    folder = tmp_path / "pacing"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    budget = on_host(folder, 100, clock_at("2026-12-07T10:00+00:00"))
    with pytest.raises(Doc2XBudgetUnavailableError, match=f"uid {NOBODY}") as unavailable:
        budget.book(1, what="a.pdf")
    assert str(folder) in str(unavailable.value)
    assert list(folder.iterdir()) == []


def test_daily_budget_for_keeps_the_day_in_the_pacing_folder_named_by_a_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("DOC2X_PACING_DIR", str(tmp_path / "pacing"))
    assert daily_budget_for(settings(None)) is None
    assert daily_budget_for(settings(0)) is None
    budget = daily_budget_for(settings(500, budget_timezone="Asia/Shanghai"))
    assert budget is not None and budget is daily_budget_for(settings(500, budget_timezone="Asia/Shanghai"))
    assert list(tmp_path.iterdir()) == []  # nothing touched before the first booking
    mask = os.umask(0)
    try:
        budget.book(12, what="a.pdf")
    finally:
        os.umask(mask)
    [budget_file] = (tmp_path / "pacing").iterdir()
    assert budget_file.name == f"{key_digest(BASE_URL, KEY)}.budget.json"
    assert KEY not in budget_file.read_text()
    assert stat.S_IMODE(os.lstat(tmp_path / "pacing").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(budget_file).st_mode) == 0o600
    assert budget.remaining() == 488


# The connection's extras.


def test_the_connection_reads_the_budget_and_its_time_zone(monkeypatch):
    extra = {"daily_page_budget": "2000", "budget_timezone": " Asia/Shanghai "}
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", json.dumps({"conn_type": "doc2x", "password": KEY, "extra": extra})
    )
    read = Doc2XHook().settings
    assert (read.daily_page_budget, read.budget_timezone) == (2000, "Asia/Shanghai")


@pytest.mark.parametrize(
    ("extra", "told"),
    [
        ({"daily_page_budget": -5}, "daily_page_budget=-5, which is not a number of pages"),
        ({"daily_page_budget": "lots"}, "daily_page_budget='lots', which is not a number of pages"),
        ({"daily_page_budget": 12.5}, "daily_page_budget=12.5, which is not a number of pages"),
        (
            {"budget_timezone": "Mars/Olympus"},
            "budget_timezone='Mars/Olympus', which is not an IANA time zone",
        ),
        ({"budget_timezone": "../../etc/passwd"}, "budget_timezone='../../etc/passwd', which is not an IANA"),
    ],
)
def test_a_bad_budget_extra_is_refused_by_name(monkeypatch, extra, told):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", json.dumps({"conn_type": "doc2x", "password": KEY, "extra": extra})
    )
    with pytest.raises(Doc2XInputError) as refused:
        Doc2XHook().settings
    assert told in str(refused.value) and "doc2x_default" in str(refused.value)


# Redis, shared by hosts.


def redis_day_key(budget: DailyPageBudget) -> str:
    return f"doc2x:pacing:{key_digest(BASE_URL, KEY)}:budget:{budget.today()}"


@needs_redis
def test_two_hosts_booking_at_once_in_redis_never_pass_the_budget(redis_server, tmp_path):
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    results = book_side_by_side(tmp_path, pages=300, attempts=250, pacing_dirs=hosts, conn_id=CONN_ID)
    assert sum(result["booked"] for result in results) == 300
    assert sum(result["refusals"] for result in results) == 200
    budget = daily_budget_for(settings(300, pacing_conn_id=CONN_ID))
    assert budget is not None and budget.remaining() == 0
    client = redis_server.client()
    assert client.get(redis_day_key(budget)) == b"300"
    assert 0 < client.ttl(redis_day_key(budget)) <= 2 * 24 * 3600
    assert [budget_file for host in hosts for budget_file in host.glob("*.budget.json")] == []


@needs_redis
def test_redis_refuses_with_the_numbers_and_gives_pages_back_never_below_zero(redis_server):
    budget = daily_budget_for(settings(10, pacing_conn_id=CONN_ID))
    assert budget is not None
    first = budget.book(7, what="a.pdf")
    with pytest.raises(Doc2XBudgetError, match=f"7 of 10 pages are booked for {budget.today()}") as refused:
        budget.book(4, what="b.pdf")
    assert refused.value.source == "b.pdf"
    budget.release(first)
    assert budget.remaining() == 10
    second = budget.book(5, what="c.pdf")
    redis_server.client().set(redis_day_key(budget), 2)  # counted less meanwhile
    budget.release(second)
    assert redis_server.client().get(redis_day_key(budget)) == b"0"


@needs_redis
@pytest.mark.parametrize("held", ["not a number", "1.5"])
def test_a_redis_day_that_is_not_a_count_fails_closed(redis_server, held):
    budget = daily_budget_for(settings(10, pacing_conn_id=CONN_ID))
    assert budget is not None
    redis_server.client().set(redis_day_key(budget), held)
    with pytest.raises(Doc2XBudgetUnavailableError, match=redis_day_key(budget)):
        budget.book(1, what="a.pdf")
    assert redis_server.client().get(redis_day_key(budget)) == held.encode()


@needs_redis
def test_redis_stopped_fails_closed_and_nothing_is_booked_anywhere(redis_server, tmp_path, caplog):
    budget = daily_budget_for(settings(10, pacing_conn_id=CONN_ID))
    assert budget is not None
    booked = budget.book(3, what="a.pdf")
    redis_server.stop()
    with pytest.raises(Doc2XBudgetUnavailableError) as unavailable:
        budget.book(2, what="b.pdf")
    message = str(unavailable.value)
    assert repr(CONN_ID) in message and "fails closed" in message and unavailable.value.source == "b.pdf"
    assert PASSWORD not in message
    with pytest.raises(Doc2XBudgetUnavailableError):
        budget.remaining()
    with caplog.at_level(logging.WARNING):
        budget.release(booked)  # logged, not raised
    [warning] = pacing_logs(caplog)
    assert "a.pdf" in warning and "stay counted" in warning
    pacing_dir = tmp_path / "pacing"  # the host's folder was not used in Redis's stead
    assert not pacing_dir.exists() or list(pacing_dir.glob("*.budget.json")) == []

    redis_server.start()  # an empty Redis on the same port: the budget reconnects
    assert budget.book(2, what="b.pdf").booked == 2
