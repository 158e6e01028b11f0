"""
A long batch's progress, as its log shows it: the count, the time left at the key's pace (uploads)
or at the observed pace (the wait), a line every few seconds at most, the last one always.
"""

from __future__ import annotations

import pytest

from airflow_provider_doc2x.progress import Progress, duration
from tests.helpers import parse_operator, run_to_the_end, use_connection


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Lines:
    """A logger that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message, *args) -> None:
        self.lines.append(message % args)


def test_uploads_say_the_time_left_at_the_key_s_pace_every_ten_seconds_and_the_last_line_always():
    clock, log = Clock(), Lines()
    progress = Progress(
        log, 100, "submitted", per_second=1.0, pace="30 images per 30 s", interval=10, clock=clock
    )
    for _ in range(100):
        clock.now += 1.0
        progress.one_done()
    assert log.lines[0] == "Doc2X: 10/100 submitted; about 2 min left at the key's pace (30 images per 30 s)"
    assert log.lines[-2] == "Doc2X: 90/100 submitted; about 10 s left at the key's pace (30 images per 30 s)"
    assert log.lines[-1] == "Doc2X: 100/100 submitted"
    assert len(log.lines) == 10


def test_a_wait_says_the_time_left_at_the_pace_it_observed_since_it_began():
    clock, log = Clock(), Lines()
    progress = Progress(log, 40, "done", done=10, interval=5, clock=clock)  # 10 were done before a resume
    clock.now += 4
    progress.update(12)  # too soon for a line
    assert log.lines == []
    clock.now += 16
    progress.update(20)  # 10 more in 20 s: 20 left take 40 s
    assert log.lines == ["Doc2X: 20/40 done; about 40 s left at the observed pace"]
    clock.now += 60
    progress.update(20)  # nothing new: no line
    progress.update(40)
    assert log.lines[-1] == "Doc2X: 40/40 done"


def test_no_estimate_before_a_job_ends_and_durations_read_at_a_glance():
    clock, log = Clock(), Lines()
    progress = Progress(log, 5, "done", interval=0, clock=clock)
    assert progress.line() == "Doc2X: 0/5 done"
    assert [duration(seconds) for seconds in (0.2, 45, 90, 3600 * 2 + 5 * 60)] == [
        "1 s",
        "45 s",
        "2 min",
        "2 h 05 min",
    ]


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_task_logs_its_uploads_with_the_time_left_and_ends_with_every_image_counted(
    doc2x, make_image, monkeypatch, caplog, capfd, deferrable
):
    """Eight images on a key of 4 per second: the task's log says how long the uploads have left."""
    use_connection(monkeypatch, doc2x, rate_limit_images=4, rate_limit_window=1.0)
    monkeypatch.setenv("AIRFLOW__DOC2X__PROGRESS_INTERVAL", "0.2")
    images = [make_image(title=f"Paced {n}") for n in range(8)]
    op = parse_operator(images, deferrable=deferrable)
    records = run_to_the_end(op, {})[0] if deferrable else op.execute({})
    assert len(records) == 8
    logged = "\n".join([record.getMessage() for record in caplog.records] + list(capfd.readouterr()))
    assert "left at the key's pace (4 images per 1 s)" in logged
    assert "Doc2X: 8/8 submitted" in logged
    assert "Doc2X: 8/8 done" in logged
