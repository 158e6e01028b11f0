"""
The PDF lane's log of batches in the task state store (``doc2x/pdf/log/N``), attacked: a worker
killed at each moment of a PDF's life, a store that fails, is slow, or hands back garbage, tries
that resume and append, earlier releases' keys next to the log. Whatever happens, a PDF whose PUT
started is reconnected by its uid or its images are named "possibly billed twice": never resent
silently, and each image maps to the newest PDF that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any

import img2pdf
import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x.exceptions import Doc2XTaskStateError
from airflow_provider_doc2x.journal import (
    STATE_INDEX_KEY,
    STATE_PDF_LOG_PREFIX,
    STATE_PDF_PREFIX,
    TaskJournal,
)
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.storage.sources import sha256_of
from tests.helpers import (
    StateStore,
    first_event,
    parse_operator,
    run_to_the_end,
    use_connection,
    wait_until,
)

BILLED_TWICE = "possibly billed twice"


# -- the task's inputs and its store -----------------------------------------------------------------


def sized_pages(tmp_path, *sizes, prefix: str = "Page") -> list:
    """One JPEG page per size (each size makes its own PDF), titled ``<prefix> <n>``."""
    paths = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"{prefix.replace(' ', '-')}-{n}.jpg"
        path.write_bytes(render(Page(title=f"{prefix} {n}"), fmt="JPEG", size=size))
        paths.append(path)
    return paths


def documents(tmp_path, count: int, prefix: str = "Document") -> list:
    """``count`` one-page PDF documents (each goes to Doc2X as it is)."""
    paths = []
    for n in range(count):
        path = tmp_path / f"{prefix.replace(' ', '-')}-{n}.pdf"
        page = render(Page(title=f"{prefix} {n}"), fmt="JPEG", size=(400, 300))
        path.write_bytes(img2pdf.convert([page]))
        paths.append(path)
    return paths


def context(store, try_number: int) -> dict[str, Any]:
    return {"task_state_store": store, "ti": SimpleNamespace(try_number=try_number)}


def titles(records) -> list[str]:
    return [record["markdown"].splitlines()[0] for record in records]


def is_pdf_batch(key: str) -> bool:
    return key.startswith(STATE_PDF_LOG_PREFIX)


def holds_a_start(value: Any) -> bool:
    """A batch of the PDF lane holding a PDF's record before its PUT (no answer yet)."""
    return any(record.get("state") == "put" for _, record in value["entries"])


def holds_only_answers(value: Any) -> bool:
    return not holds_a_start(value)


class WorkerKilled(BaseException):
    """The worker's process ends here (raised from the store: nothing after it runs in this try)."""


class KilledAt(StateStore):
    """A store that raises ``error`` once, on the first write of the PDF lane that ``when`` picks."""

    def __init__(self, when, error: BaseException) -> None:
        super().__init__()
        self.when = when
        self.error: BaseException | None = error
        self.sets: list[tuple[str, Any]] = []

    def set(self, key, value, **kwargs):
        if self.error is not None and is_pdf_batch(key) and self.when(value):
            error, self.error = self.error, None
            raise error
        self.sets.append((key, value))
        super().set(key, value, **kwargs)


class Overwrites(StateStore):
    """A store that notes every batch written over an existing one, and the writes of the PDF lane."""

    def __init__(self) -> None:
        super().__init__()
        self.overwritten: list[str] = []
        self.pdf_sets: list[Any] = []

    def set(self, key, value, **kwargs):
        if is_pdf_batch(key):
            self.pdf_sets.append(value)
            if key in self.values:
                self.overwritten.append(key)
        super().set(key, value, **kwargs)


class Said(logging.Handler):
    """Every line the task logs (Airflow 3 logs through structlog to stdlib handlers too)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def billed_twice(self) -> list[str]:
        return [line for line in self.lines if BILLED_TWICE in line]


@pytest.fixture
def said():
    handler = Said()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)


def billed(lane) -> tuple[int, int]:
    stats = lane.stats()
    return stats["pdf_pages_billed"], stats["max_pdf_billed_per_page"]


# -- a worker killed at each moment of a PDF's life ---------------------------------------------------------


@pytest.mark.parametrize(
    "error", [ConnectionError("the API server went away"), WorkerKilled()], ids=["store-fails", "killed"]
)
def test_a_worker_killed_after_the_puts_were_answered_before_their_write_pays_nothing_again(
    lane, tmp_path, error
):
    """Both PUTs were answered; the write of their answers never happens: the retry reconnects by uid."""
    images = sized_pages(tmp_path, (400, 300), (300, 500), prefix="Answered")
    store = KilledAt(holds_only_answers, error)
    with pytest.raises((Doc2XTaskStateError, WorkerKilled)):
        parse_operator(images, method="pdf", deferrable=True).execute(context(store, 1))
    put_by_the_first_try = lane.stats()["puts"]
    recorded = store.pdfs()
    assert put_by_the_first_try == len(recorded) >= 1  # each PDF PUT was recorded before its PUT
    assert {record["state"] for record in recorded.values()} <= {"put", "uploaded"}
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    assert titles(records) == ["# Answered 0", "# Answered 1"]
    assert billed(lane) == (2, 1)  # no page paid twice
    assert lane.stats()["puts"] == 2  # the retry PUT only what the first try never sent


def test_a_store_that_fails_the_write_of_the_answers_stops_the_task_with_a_clear_error(lane, tmp_path):
    images = sized_pages(tmp_path, (400, 300), prefix="Clear")
    store = KilledAt(holds_only_answers, ConnectionError("the API server went away"))
    with pytest.raises(Doc2XTaskStateError) as caught:
        parse_operator(images, method="pdf", deferrable=True).execute(context(store, 1))
    message = str(caught.value)
    assert STATE_PDF_LOG_PREFIX in message and "ConnectionError" in message


def test_a_store_that_fails_before_any_put_sends_nothing_and_says_so(lane, tmp_path):
    images = sized_pages(tmp_path, (400, 300), (300, 500), (500, 500), prefix="Unsent")
    store = KilledAt(holds_a_start, ConnectionError("the API server went away"))
    with pytest.raises(Doc2XTaskStateError):
        parse_operator(images, method="pdf", deferrable=True).execute(context(store, 1))
    stats = lane.stats()
    assert (stats["puts"], stats["pdf_tasks"]) == (0, 0)  # nothing sent whose start was not stored
    assert store.pdfs() == {}


def test_a_store_whose_reads_fail_on_a_retry_stops_before_anything_is_sent(lane, tmp_path):
    images = sized_pages(tmp_path, (400, 300), prefix="Unread")

    class Unreadable(StateStore):
        def get(self, key, default=None):
            if is_pdf_batch(key):
                raise TimeoutError("the API server did not answer")
            return super().get(key, default)

    with pytest.raises(Doc2XTaskStateError) as caught:
        parse_operator(images, method="pdf", deferrable=True).execute(context(Unreadable(), 2))
    assert f"{STATE_PDF_LOG_PREFIX}0" in str(caught.value)
    assert (lane.stats()["preuploads"], lane.stats()["puts"]) == (0, 0)


def test_a_worker_killed_at_a_resume_after_its_starts_were_written_pays_nothing_again(
    lane, tmp_path, monkeypatch
):
    """One PDF in flight at a time: the resume (same try) starts the second PDF; the worker dies before its answer."""
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = sized_pages(tmp_path, (400, 300), (300, 500), prefix="Resumed")
    store = KilledAt(lambda value: False, ConnectionError("never"))
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context(store, 1))
    event = asyncio.run(first_event(deferred.value.trigger))
    # The resume (a new journal, still try 1) dies once its second PDF's PUT was answered.
    store.when, store.error = holds_only_answers, WorkerKilled()
    with pytest.raises(WorkerKilled):
        parse_operator(images, method="pdf", deferrable=True).execute_complete(context(store, 1), event)
    assert lane.stats()["puts"] == 2
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    assert titles(records) == ["# Resumed 0", "# Resumed 1"]
    assert billed(lane) == (2, 1)


def test_resumes_append_to_the_log_and_never_write_over_a_batch(lane, tmp_path, monkeypatch):
    """Three PDFs one at a time: each resume (a new journal of try 1) appends after the batches before it."""
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = sized_pages(tmp_path, (400, 300), (300, 500), (500, 500), prefix="Appended")
    store = Overwrites()
    records, deferrals = run_to_the_end(
        parse_operator(images, method="pdf", deferrable=True), context(store, 1)
    )
    assert titles(records) == [f"# Appended {n}" for n in range(3)]
    assert deferrals == 3
    assert store.overwritten == []
    keys = sorted(int(key[len(STATE_PDF_LOG_PREFIX) :]) for key in store.values if is_pdf_batch(key))
    assert keys == list(range(len(keys)))  # no gap
    assert [record["state"] for record in store.pdfs().values()] == ["uploaded"] * 3


def test_a_pdf_sent_through_the_image_lane_is_followed_there_by_the_retry(lane, tmp_path):
    """A small PDF fails; its fallback mark is written before its images leave; the worker dies; the retry
    reconnects the images through the image lane's log and pays for nothing again.
    """
    lane.configure(pdf_fail_next=1, pdf_fail_reason="parse_error")
    images = sized_pages(tmp_path, (400, 300), (400, 300), (400, 300), prefix="Fell Back")
    store = StateStore()
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context(store, 1))
    event = asyncio.run(first_event(deferred.value.trigger))
    with pytest.raises(TaskDeferred):  # the images went through the image lane; the worker dies waiting
        parse_operator(images, method="pdf", deferrable=True).execute_complete(context(store, 1), event)
    (record,) = store.pdfs().values()
    assert record["fallback"] == "image"
    assert lane.stats()["billed_total"] == 3
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    assert titles(records) == [f"# Fell Back {n}" for n in range(3)]
    stats = lane.stats()
    assert (stats["billed_total"], stats["max_billed_per_image"], stats["pdf_tasks"]) == (3, 1, 1)


def test_documents_and_packed_images_killed_after_their_puts_pay_nothing_again(lane, tmp_path):
    images = sized_pages(tmp_path, (400, 300), (300, 500), prefix="Mixed Page")
    docs = documents(tmp_path, 2, prefix="Mixed Document")
    sources = [images[0], docs[0], images[1], docs[1]]
    store = KilledAt(holds_only_answers, WorkerKilled())
    with pytest.raises(WorkerKilled):
        parse_operator(sources, method="pdf", deferrable=True).execute(context(store, 1))
    assert lane.stats()["puts"] == 4
    records, _ = run_to_the_end(parse_operator(sources, method="pdf", deferrable=True), context(store, 2))
    assert [record["markdown"].splitlines()[-1] for record in records] == [
        "# Mixed Page 0",
        "# Mixed Document 0",
        "# Mixed Page 1",
        "# Mixed Document 1",
    ]
    assert billed(lane) == (4, 1)
    assert lane.stats()["puts"] == 4


# -- what a new try reads: the log, earlier releases' keys, garbage --------------------------------------


def finished_one_at_a_time(lane, tmp_path, monkeypatch, store, prefix: str) -> list:
    """Two PDFs, one in flight at a time, run to the end: the log holds start, answer, start, answer."""
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = sized_pages(tmp_path, (400, 300), (300, 500), prefix=prefix)
    run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 1))
    assert sorted(key for key in store.values if is_pdf_batch(key)) == [
        f"{STATE_PDF_LOG_PREFIX}{n}" for n in range(4)
    ]
    assert billed(lane) == (2, 1)
    return images


def test_a_gap_in_the_log_is_not_read_as_its_end(lane, tmp_path, monkeypatch, said):
    """Batch 1 (the first PDF's answer) is missing; batch 2 holds the second PDF's start. The retry must
    find the second PDF (or stop with a clear error), not resend its page silently.
    """
    store = StateStore()
    images = finished_one_at_a_time(lane, tmp_path, monkeypatch, store, "Gap")
    del store.values[f"{STATE_PDF_LOG_PREFIX}1"]
    try:
        records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    except Doc2XTaskStateError:
        return  # a clear error: acceptable
    assert titles(records) == ["# Gap 0", "# Gap 1"]
    assert billed(lane) == (2, 1) or said.billed_twice(), f"resent silently: {lane.stats()['pdf_billed']}"


@pytest.mark.parametrize(
    "garbage",
    [{"pages": "not a list", "state": "uploaded"}, {"state": 7}, {}],
    ids=["pages-not-a-list", "state-not-a-string", "empty"],
)
def test_a_garbled_newer_record_does_not_hide_the_pdf_s_stored_start(
    lane, tmp_path, monkeypatch, said, garbage
):
    """The answer's batch of the second PDF comes back garbled; its start (batch 2) is intact."""
    store = StateStore()
    images = finished_one_at_a_time(lane, tmp_path, monkeypatch, store, "Garbled")
    answers = store.values[f"{STATE_PDF_LOG_PREFIX}3"]
    store.values[f"{STATE_PDF_LOG_PREFIX}3"] = {
        "version": 1,
        "entries": [[uid, garbage] for uid, _ in answers["entries"]],
    }
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    assert titles(records) == ["# Garbled 0", "# Garbled 1"]
    assert billed(lane) == (2, 1) or said.billed_twice(), f"resent silently: {lane.stats()['pdf_billed']}"


@pytest.mark.parametrize(
    "garbage",
    [
        "not a batch",
        ["a", "list"],
        42,
        {"version": 1, "entries": "nope"},
        {"version": 2, "entries": [{"uid": "x"}]},
    ],
    ids=["text", "list", "number", "entries-not-a-list", "version-2"],
)
def test_a_batch_that_is_not_one_is_skipped_and_never_written_over(lane, tmp_path, monkeypatch, garbage):
    """Batch 0 (the first PDF's start) is garbage: batch 1 (its answer) still names it; the retry appends."""
    store = Overwrites()
    images = finished_one_at_a_time(lane, tmp_path, monkeypatch, store, "Skipped")
    store.values[f"{STATE_PDF_LOG_PREFIX}0"] = garbage
    store.overwritten.clear()
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    assert titles(records) == ["# Skipped 0", "# Skipped 1"]
    assert billed(lane) == (2, 1)
    assert store.overwritten == []


def test_an_earlier_release_s_older_pdf_of_the_same_page_loses_to_the_log(lane, tmp_path):
    """An earlier release recorded an older PDF (now unknown to Doc2X) holding the same page as the log's:
    the retry maps the page to the log's PDF and asks Doc2X nothing about the older one.
    """
    images = sized_pages(tmp_path, (400, 300), prefix="Newest")
    store = StateStore()
    with pytest.raises(TaskDeferred):
        parse_operator(images, method="pdf", deferrable=True).execute(context(store, 1))
    (uid,) = store.pdfs()
    page = sha256_of(images[0].read_bytes())
    store.values[STATE_INDEX_KEY] = {"uids": ["older-release-uid"]}
    store.values[STATE_PDF_PREFIX + "older-release-uid"] = {
        "pages": [page],
        "state": "uploaded",
        "at": 1.0,
        "uploaded_at": 1.0,
    }
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    assert [record["uid"] for record in records] == [uid]
    assert billed(lane) == (1, 1)
    assert list(store.pdfs()) == ["older-release-uid", uid]


def test_a_fallback_mark_in_the_log_wins_over_an_earlier_release_s_record_of_the_same_pdf(lane, tmp_path):
    """An earlier release wrote a small PDF's record; it failed; the log marks it "image": the retry follows
    its images through the image lane and never packs them again.
    """
    lane.configure(pdf_fail_next=1, pdf_fail_reason="parse_error")
    images = sized_pages(tmp_path, (400, 300), (400, 300), prefix="Marked")
    store = StateStore()
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context(store, 1))
    event = asyncio.run(first_event(deferred.value.trigger))
    # What an earlier release would have written for the PDF, next to this release's log.
    ((uid, record),) = store.pdfs().items()
    store.values[STATE_INDEX_KEY] = {"uids": [uid]}
    store.values[STATE_PDF_PREFIX + uid] = record
    store.values = {key: value for key, value in store.values.items() if not is_pdf_batch(key)}
    with pytest.raises(TaskDeferred):
        parse_operator(images, method="pdf", deferrable=True).execute_complete(context(store, 2), event)
    assert store.pdfs()[uid]["fallback"] == "image"
    assert store.values[STATE_PDF_PREFIX + uid] == record  # never written
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 3))
    assert titles(records) == ["# Marked 0", "# Marked 1"]
    stats = lane.stats()
    assert (stats["billed_total"], stats["max_billed_per_image"], stats["pdf_tasks"]) == (2, 1, 1)


# -- fewer writes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["documents", "packed"])
def test_pdfs_leaving_side_by_side_share_their_start_write_with_a_fast_store(lane, tmp_path, kind):
    """Five PDFs leave at once; the store answers at once (no write under way to gather behind)."""
    if kind == "documents":
        sources = documents(tmp_path, 5, prefix="Shared")
        op = parse_operator(sources, deferrable=True)
    else:
        sources = sized_pages(
            tmp_path, (400, 300), (300, 500), (500, 500), (600, 300), (300, 600), prefix="Shared"
        )
        op = parse_operator(sources, method="pdf", deferrable=True)
    store = Overwrites()
    with pytest.raises(TaskDeferred):
        op.execute(context(store, 1))
    assert lane.stats()["puts"] == 5
    starts = [batch for batch in store.pdf_sets if holds_a_start(batch)]
    assert len(store.pdfs()) == 5
    assert len(starts) < 5, [len(batch["entries"]) for batch in starts]
    assert len(store.pdf_sets) < 10  # fewer than a start and an answer per PDF


# -- the journal itself: read-your-writes, a store that raises what is not an Exception, an interruption -----


def test_a_pdf_s_queued_record_is_what_the_try_reads_back():
    store = StateStore()
    journal = TaskJournal(store, may_hold=True)
    started = {"pages": ["p"], "state": "put", "at": 1.0}

    async def main():
        await journal.pdf_started("uid-1", started)
        journal.pdf_answered("uid-1", {**started, "state": "uploaded", "uploaded_at": 2.0})
        seen = await journal.pdf("uid-1")
        journal.pdf_answered("uid-1", {**seen, "fallback": "image"})
        latest = await journal.pdf("uid-1")
        await journal.flush()
        return seen, latest

    with journal.open():
        seen, latest = asyncio.run(main())
    assert seen["state"] == "uploaded"
    assert latest["fallback"] == "image" and latest["state"] == "uploaded"
    assert store.pdfs()["uid-1"] == latest


def test_starts_whose_write_raised_what_is_not_an_exception_do_not_wait_forever():
    """The write of a group of starts raises a BaseException: each start must end (raise), none may hang,
    and none may return as if it were stored.
    """

    class RaisesOnce(StateStore):
        def __init__(self) -> None:
            super().__init__()
            self.error: BaseException | None = WorkerKilled()

        def set(self, key, value, **kwargs):
            if self.error is not None:
                raised, self.error = self.error, None
                raise raised
            super().set(key, value, **kwargs)

    store = RaisesOnce()
    journal = TaskJournal(store, may_hold=False)
    journal.pdfs.start_group = 3

    async def start(uid: str) -> str:
        await journal.pdf_started(uid, {"pages": [uid], "state": "put", "at": 1.0})
        return uid

    async def main():
        starts = [asyncio.ensure_future(start(f"uid-{n}")) for n in range(3)]
        done, pending = await asyncio.wait(starts, timeout=5)
        for task in pending:
            task.cancel()
        return [task for task in starts if task in pending], [
            task.result() for task in done if not task.cancelled() and task.exception() is None
        ]

    with journal.open():
        pending, returned = asyncio.run(main())
    assert returned == []  # no start returned as stored
    assert pending == [], f"{len(pending)} of 3 starts still waiting for a write that ended 5 s ago"


class Interrupted(Exception):
    """What Airflow's execution timeout raises in the task's thread."""


@pytest.fixture
def execution_timeout():
    """SIGALRM raises in the task's thread, as Airflow's ``execution_timeout`` does."""

    def interrupt(*_):
        raise Interrupted("Timeout, PID: 1")

    previous = signal.signal(signal.SIGALRM, interrupt)
    yield
    signal.signal(signal.SIGALRM, previous)


def test_an_interruption_during_a_step_s_last_write_waits_for_all_of_it(execution_timeout):
    """The step queued more answers than one batch holds; the timeout strikes while the first batch is
    written. ``run`` must write them all (it waits up to 30 s) before the error goes on, from its thread.
    """
    task_thread = threading.get_ident()

    class SlowFirstWrite(StateStore):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[tuple[str, str]] = []

        def set(self, key, value, **kwargs):
            if not self.writes:
                signal.pthread_kill(task_thread, signal.SIGALRM)
                time.sleep(0.5)
            super().set(key, value, **kwargs)
            self.writes.append((key, threading.current_thread().name))

    store = SlowFirstWrite()
    journal = TaskJournal(store, may_hold=False)
    uids = [f"uid-{n:03d}" for n in range(100)]

    async def step() -> None:
        for uid in uids:
            journal.pdf_answered(uid, {"pages": [uid], "state": "uploaded", "at": 1.0, "uploaded_at": 2.0})

    with pytest.raises(Interrupted):
        journal.run(step())
    at_raise = set(store.pdfs())
    # What was not written by then: written behind the task's back, or never.
    wait_until(lambda: len(store.writes) >= 2, timeout=5, message="the second batch")
    assert at_raise == set(uids), (
        f"{len(uids) - len(at_raise)} of {len(uids)} answers not in the store when run() raised; "
        f"the writes, with their threads: {store.writes}"
    )
    assert all(thread.startswith("doc2x-state") for _, thread in store.writes), store.writes


def test_a_resume_after_an_upgrade_marks_the_pdf_an_earlier_release_recorded_in_the_same_try(lane, tmp_path):
    """Try 1's first half ran on an earlier release (its keys); the worker was upgraded during the deferral;
    the resume (still try 1) sends the failed PDF's images through the image lane: the mark must be written.
    """
    lane.configure(pdf_fail_next=1, pdf_fail_reason="parse_error")
    images = sized_pages(tmp_path, (400, 300), (400, 300), prefix="Upgraded")
    store = StateStore()
    with pytest.raises(TaskDeferred) as deferred:
        parse_operator(images, method="pdf", deferrable=True).execute(context(store, 1))
    event = asyncio.run(first_event(deferred.value.trigger))
    ((uid, record),) = store.pdfs().items()
    store.values = {key: value for key, value in store.values.items() if not is_pdf_batch(key)}
    store.values[STATE_INDEX_KEY] = {"uids": [uid]}
    store.values[STATE_PDF_PREFIX + uid] = record
    with pytest.raises(TaskDeferred):
        parse_operator(images, method="pdf", deferrable=True).execute_complete(context(store, 1), event)
    assert lane.stats()["billed_total"] == 2  # the images left through the image lane
    marked = store.pdfs()[uid].get("fallback")
    # The worker dies here; the retry still pays nothing again (the image lane's log names the images).
    records, _ = run_to_the_end(parse_operator(images, method="pdf", deferrable=True), context(store, 2))
    assert titles(records) == ["# Upgraded 0", "# Upgraded 1"]
    stats = lane.stats()
    assert (stats["billed_total"], stats["max_billed_per_image"], stats["pdf_tasks"]) == (2, 1, 1)
    assert marked == "image", f"the resume wrote no fallback mark: {record}"
