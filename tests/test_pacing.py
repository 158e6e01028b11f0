"""The rolling-window limiter: exact on a fake clock, shared through its file, across processes."""

from __future__ import annotations

import os
import subprocess
import sys

from airflow_provider_doc2x.pacing import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upload_times(limiter: RateLimiter, clock: FakeClock, count: int, duration: float = 0.0) -> list[float]:
    """When each of ``count`` back-to-back uploads of ``duration`` seconds may start."""
    starts = []
    while len(starts) < count:
        delay, slot = limiter.reserve()
        if slot is None:
            clock.now += delay
            continue
        starts.append(clock.now - 1000)
        clock.now += duration
        limiter.release(slot)
    return starts


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


def test_a_crashed_upload_is_forgotten(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, state_file=tmp_path / "key.json", clock=clock)
    limiter.reserve()  # never released: its process died
    clock.now += 601
    assert limiter.reserve()[1] is not None


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
