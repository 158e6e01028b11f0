"""
The window's learned rule: slots dated from their bodies' arrival, until a 429 that dating them from
their answers would have avoided switches the key to answers for a day, in the pacing store that
every process (and, through Redis, every host) reads. On an injected clock where the rule's own
logic is the question, through the transport and the local server where a server is involved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import pytest

from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.pacing import (
    FORMAT_VERSION,
    RateLimiter,
    RedisRateLimiter,
    key_digest,
    reset_limiters,
)
from airflow_provider_doc2x.pacing.rule import ARRIVAL_MARGIN_SECONDS as MARGIN
from airflow_provider_doc2x.pacing.rule import RULE_SECONDS
from airflow_provider_doc2x.pacing.window import PacedUpload
from tests.helpers import API_KEY, FakeClock, pacing_logs
from tests.test_pacing_redis import CONN_ID, redis_server  # noqa: F401 (the fixture)


def switches(caplog) -> list[str]:
    """The warnings that said a key switched to dating its slots from answers."""
    return [line for line in pacing_logs(caplog) if "429" in line]


def upload(limiter: RateLimiter, clock: FakeClock, *, sent_after: float, answered_after: float) -> None:
    """One upload on the injected clock: booked now, its body sent, then answered."""
    booked = clock.now
    slot = limiter.reserve()[1]
    assert slot is not None
    clock.now = booked + answered_after
    limiter.release(slot, ended=clock.now, sent=booked + sent_after)
    clock.now = booked


def test_the_arrival_rule_dates_a_slot_from_when_its_body_was_sent(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=tmp_path / "key.json", clock=clock)
    for _ in range(2):
        upload(limiter, clock, sent_after=1.0, answered_after=4.0)  # bodies sent at 1001, answered at 1004
    clock.now = 1004.0
    assert limiter.reserve() == (
        pytest.approx(7.0 + MARGIN),
        None,
    )  # the next window starts at 1011, not 1014
    clock.now = 1011.0 + MARGIN
    assert limiter.reserve()[1] is not None
    window = json.loads((tmp_path / "key.json").read_text())
    assert window["done"] == [1004.0, 1004.0]  # the answers, as every release reads them
    assert sorted(window["sent"]) == [[1004.0, 1001.0], [1004.0, 1001.0]]


def test_a_slot_whose_body_sent_time_is_unknown_counts_from_its_answer(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=tmp_path / "key.json", clock=clock)
    slot = limiter.reserve()[1]
    clock.now += 4.0
    limiter.release(slot, ended=clock.now)  # an older release's slot, or a body that never went out whole
    assert limiter.reserve() == (10.0, None)


def test_the_answer_rule_dates_every_slot_from_its_answer_as_before(tmp_path, caplog):
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=tmp_path / "key.json", clock=clock, digest="d1g35t")
    for _ in range(2):
        upload(limiter, clock, sent_after=1.0, answered_after=4.0)
    with caplog.at_level(logging.WARNING):
        limiter.learn_answer_rule()
    clock.now = 1004.0
    assert limiter.reserve() == (10.0, None)  # from the answers: the next window starts at 1014
    [switch] = switches(caplog)
    assert "d1g35t" in switch and "24 h" in switch


async def test_a_429_that_the_answer_rule_would_have_avoided_switches_the_key_once(tmp_path, caplog):
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=tmp_path / "key.json", clock=clock, digest="d1g35t")
    for _ in range(2):
        upload(limiter, clock, sent_after=1.0, answered_after=4.0)
    clock.now = 1011.0 + MARGIN  # room counted from the bodies' arrival, none counted from the answers
    with caplog.at_level(logging.WARNING):
        uploads = [PacedUpload(limiter, limiter.book()) for _ in range(2)]  # both on their way
        for booked in uploads:
            assert booked.slot_id is not None and not booked.answer_room
        for booked in uploads:
            await booked.answered(429)
    assert len(switches(caplog)) == 1  # once per switch, however many 429s tell it
    assert json.loads((tmp_path / "key.json").read_text())["rule"] == {
        "count_from": "answer",
        "until": 1011.0 + MARGIN + RULE_SECONDS,
    }


async def test_a_429_that_the_answer_rule_would_have_drawn_too_teaches_nothing(tmp_path, caplog):
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=tmp_path / "key.json", clock=clock)
    with caplog.at_level(logging.WARNING):
        booked = PacedUpload(limiter, limiter.book())
        assert booked.answer_room  # an empty window: the 429 came from another user of the key
        await booked.answered(429)
    assert switches(caplog) == []
    assert "rule" not in json.loads((tmp_path / "key.json").read_text())


def test_the_switch_expires_after_its_day_and_the_key_learns_again(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=tmp_path / "key.json", clock=clock)
    limiter.learn_answer_rule()
    clock.now += RULE_SECONDS - 10
    upload(limiter, clock, sent_after=1.0, answered_after=4.0)
    clock.now += 4.0
    assert limiter.book()[:2] == (10.0, None)  # still from the answer
    clock.now += 6.0  # the day is over
    assert limiter.book()[:2] == (pytest.approx(1.0 + MARGIN), None)  # from the body's arrival again
    assert "rule" not in json.loads((tmp_path / "key.json").read_text())


SWITCH = """
import logging, sys
from pathlib import Path
from airflow_provider_doc2x.pacing import RateLimiter
logging.basicConfig(level=logging.WARNING)
RateLimiter(2, 10.0, state_file=Path(sys.argv[1]), digest="d1g35t").learn_answer_rule()
"""


def test_a_switch_made_by_another_process_holds_at_this_process_next_booking(tmp_path, caplog):
    state_file = tmp_path / "key.json"
    limiter = RateLimiter(2, 10.0, state_file=state_file)
    assert not limiter.book().answer_rule
    other = subprocess.run([sys.executable, "-c", SWITCH, str(state_file)], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    said = other.stdout + other.stderr
    assert "d1g35t" in said and "429" in said  # the process that switched said so
    assert limiter.book().answer_rule
    with caplog.at_level(logging.WARNING):
        limiter.learn_answer_rule()  # already switched: nothing to say again
    assert switches(caplog) == []


def test_a_switch_made_on_one_host_holds_on_every_host_of_the_redis(redis_server, tmp_path, caplog):  # noqa: F811
    clock = FakeClock()
    key = f"doc2x:pacing:{key_digest('https://doc2x.example', API_KEY)}"

    def host(name: str) -> RedisRateLimiter:
        return RedisRateLimiter(
            1,
            10.0,
            redis_conn_id=CONN_ID,
            redis_key=key,
            state_file=tmp_path / name / "key.json",
            clock=clock,
        )

    first, second = host("first"), host("second")
    upload(first, clock, sent_after=1.0, answered_after=4.0)
    clock.now = 1004.0
    assert second.reserve() == (pytest.approx(7.0 + MARGIN), None)  # counted in Redis from the body's arrival
    with caplog.at_level(logging.WARNING):
        first.learn_answer_rule()
        first.learn_answer_rule()
        assert 0 < redis_server.client().pttl(f"{key}:rule") <= RULE_SECONDS * 1000
        assert second.book()[:3] == (10.0, None, False)  # the other host reads it in Redis ...
        local = json.loads((tmp_path / "second" / "key.json").read_text())
        assert local["rule"]["count_from"] == "answer"  # ... and keeps it while Redis is down
        second.learn_answer_rule()
    assert len(switches(caplog)) == 1


def test_a_release_2_window_file_is_read_and_its_slots_count_from_their_answers(tmp_path, caplog):
    state_file = tmp_path / "key.json"
    state_file.write_text(json.dumps({"version": 2, "open": {"other": [998.0, 1100.0]}, "done": [999.0]}))
    clock = FakeClock()
    limiter = RateLimiter(3, 10.0, state_file=state_file, clock=clock)
    with caplog.at_level(logging.WARNING):
        upload(limiter, clock, sent_after=0.5, answered_after=1.0)
        assert limiter.reserve() == (9.0, None)  # one in flight, one answered at 999, one sent at 1000.5
    window = json.loads(state_file.read_text())
    assert (window["version"], window["done"], window["sent"]) == (
        FORMAT_VERSION,
        [999.0, 1001.0],
        [[1001.0, 1000.5]],
    )
    assert pacing_logs(caplog) == []


def read_as_release_2(data: dict, *, now: float, window: float) -> tuple[dict, list, dict]:
    """A window file as release 2 reads it: ``open`` and ``done`` by its rules, every other field kept."""
    latest = now + window

    def is_time(value: object, bound: float) -> bool:
        return type(value) in (int, float) and -bound <= value <= bound

    assert type(data["version"]) is int and data["version"] >= 1
    assert isinstance(data["open"], dict) and isinstance(data["done"], list)
    assert all(is_time(at, latest) for at in data["done"])
    for entry in data["open"].values():
        assert type(entry) is list and len(entry) == 2
        assert is_time(entry[0], latest) and is_time(entry[1], latest + 600.0) and entry[0] <= entry[1]
    return (
        data["open"],
        sorted(data["done"]),
        {k: v for k, v in data.items() if k not in ("version", "open", "done")},
    )


def test_a_file_of_this_release_reads_as_release_2_reads_it_and_keeps_its_meaning(tmp_path):
    state_file = tmp_path / "key.json"
    clock = FakeClock()
    limiter = RateLimiter(3, 10.0, state_file=state_file, clock=clock, upload_timeout=2.0)
    upload(limiter, clock, sent_after=1.0, answered_after=3.0)
    limiter.reserve()  # in flight
    limiter.learn_answer_rule()
    data = json.loads(state_file.read_text())
    booked, done, kept = read_as_release_2(data, now=clock.now, window=10.0)
    assert done == [1003.0]  # answer times: release 2 counts the slot from its answer, its own rule
    assert len(booked) == 1
    # Release 2 rewrites the file with the fields it does not know as they were: this release reads them on.
    state_file.write_text(json.dumps({"version": data["version"], "open": booked, "done": done, **kept}))
    assert limiter.book().answer_rule
    assert json.loads(state_file.read_text())["sent"] == [[1003.0, 1001.0]]


@pytest.mark.parametrize(
    "fields",
    [
        {"rule": "answer"},
        {"rule": {"count_from": "answer", "until": "tomorrow"}},
        {"rule": {"count_from": "answer", "until": 1e12}},
        {"rule": {"count_from": "sometimes", "until": 1100.0}},
        {"sent": {"1004.0": 1001.0}},
        {"sent": [[1004.0]]},
        {"sent": [["1004.0", 1001.0]]},
        {"sent": [[1004.0, 1009.0]]},
    ],
    ids=[
        "rule-str",
        "until-str",
        "until-far",
        "count-from",
        "sent-dict",
        "sent-short",
        "sent-str",
        "sent-late",
    ],
)
def test_a_rule_or_sent_field_that_is_not_one_starts_the_window_anew_with_one_warning(
    tmp_path, caplog, fields
):
    state_file = tmp_path / "key.json"
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, state_file=state_file, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            state_file.write_text(
                json.dumps({"version": FORMAT_VERSION, "open": {}, "done": [1004.0], **fields})
            )
            booking = limiter.book()
            assert booking.slot_id is not None and not booking.answer_rule
            limiter.release(booking.slot_id)
    [warning] = pacing_logs(caplog)
    assert "starts anew" in warning
    window = json.loads(state_file.read_text())
    assert (window["done"], window["sent"], "rule" in window) == ([1000.0], [], False)


# Through the transport, against the local server.


def test_an_upload_records_when_its_body_was_sent_beside_its_answer(doc2x, make_image, tmp_path):
    """The first upload of a limiter counts from its answer; the next from its body's arrival.

    The quickest wait from "sent" to the answer seen so far is the server's and the way back's
    share: an answer that took no longer says the body arrived when it was sent.
    """
    doc2x.configure(answer_seconds=0.3)
    hook = Doc2XHook()
    hook.submit_image(make_image())
    hook.submit_image(make_image())
    [window_file] = (tmp_path / "pacing").glob("*.json")
    window = json.loads(window_file.read_text())
    [[first_answered, first], [answered, sent]] = sorted(window["sent"])
    assert sorted(window["done"]) == [first_answered, answered]
    assert first == first_answered and sent < answered


async def submit_all(images: list, source: str) -> None:
    hook = Doc2XHook()
    await asyncio.gather(
        *(hook.asubmit_image(image.read_bytes(), source=f"{source}-{n}") for n, image in enumerate(images))
    )


def test_a_server_that_counts_at_the_answer_switches_the_key_once_then_draws_no_more_429s(
    doc2x, make_image, monkeypatch, tmp_path, caplog
):
    """Answers that come sooner than any before make slots counted from arrival too early for it."""
    limit, window = 4, 1.0
    doc2x.configure(rate_limit=limit, rate_window=window, rate_counted_at="answer", answer_seconds=0.5)
    conn = doc2x.connection_json(rate_limit_images=limit, rate_limit_window=window, max_retries=20)
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", conn)
    reset_limiters()
    with caplog.at_level(logging.WARNING):
        asyncio.run(submit_all([make_image() for _ in range(8)], "slow answers"))
        doc2x.configure(answer_seconds=0.0)
        asyncio.run(submit_all([make_image() for _ in range(16)], "quick answers"))
        learning = doc2x.stats()
        asyncio.run(submit_all([make_image() for _ in range(12)], "then"))
    stats = doc2x.stats()
    assert 0 < learning["rate_limited"] <= limit  # counted from arrival, the server refused a few
    assert stats["rate_limited"] == learning["rate_limited"]  # none once the key switched
    assert (stats["billed_total"], stats["max_billed_per_image"]) == (36, 1)
    [switch] = switches(caplog)
    [window_file] = (tmp_path / "pacing").glob("*.json")  # named by the key's digest
    assert window_file.stem in switch and API_KEY not in switch
    assert json.loads(window_file.read_text())["rule"]["count_from"] == "answer"


def test_a_429_from_another_user_of_the_key_teaches_nothing(doc2x, make_image, monkeypatch, tmp_path, caplog):
    doc2x.configure(rate_limit=2, rate_window=30.0)
    conn = doc2x.connection_json(rate_limit_images=2, rate_limit_window=30.0, max_retries=0)
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", conn)
    monkeypatch.setenv("DOC2X_PACING_DIR", str(tmp_path / "another-host"))
    reset_limiters()
    asyncio.run(submit_all([make_image(), make_image()], "elsewhere"))  # the key's whole window, elsewhere
    monkeypatch.setenv("DOC2X_PACING_DIR", str(tmp_path / "pacing"))
    reset_limiters()
    with caplog.at_level(logging.WARNING), pytest.raises(Exception, match=r"429|limit"):
        asyncio.run(submit_all([make_image()], "here"))
    assert doc2x.stats()["rate_limited"] == 1
    assert switches(caplog) == []
    [window_file] = (tmp_path / "pacing").glob("*.json")
    assert "rule" not in json.loads(window_file.read_text())
    assert not RateLimiter(2, 30.0, state_file=window_file).book().answer_rule
