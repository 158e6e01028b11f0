"""
Partial success, progress lines and the task's list of PDFs, attacked through the public interface.

``allowed_failures`` must never let a task succeed while an image may still be paid for again
(an upload whose answer was lost, a result that could not be fetched, an answer that stayed
malformed): a success means no retry reconnects to the job, and the next run pays for it again.
The failures must be named (source, uid, code, trace id), never recorded, and never collide;
progress lines never go backwards; each PDF is in the stored list before its PUT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from pathlib import Path

import img2pdf
import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XTaskStateError
from airflow_provider_doc2x.failures import FAILURES_XCOM_KEY
from airflow_provider_doc2x.journal import STATE_PDF_LOG_PREFIX, TaskJournal
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.progress import Progress
from airflow_provider_doc2x.storage.sources import sha256_of
from tests.helpers import (
    API_KEY,
    StateStore,
    TaskInstance,
    event_jobs,
    first_event,
    parse_operator,
    run_to_the_end,
    use_connection,
)
from tests.helpers.storage import use_for_memory

FAIL = "<!-- doc2x-fail: parse_error -->"


def run(op, ti, store: StateStore | None = None):
    context = {"ti": ti, **({"task_state_store": store} if store is not None else {})}
    if op.deferrable:
        return run_to_the_end(op, context)[0]
    return op.execute(context)


def pdf_of_pages(path: Path, pages: list[Page]) -> Path:
    """A PDF of these pages as JPEGs (the local engine reads their Markdown, and a fail marker, back)."""
    path.write_bytes(img2pdf.convert([render(page, fmt="JPEG", size=(400, 300)) for page in pages]))
    return path


def images_sent(doc2x) -> int:
    """Images sent to the image API, by either endpoint."""
    requests = doc2x.stats()["requests"]
    return requests.get("submit", 0) + requests.get("parse", 0)


class Lines(logging.Handler):
    """The lines a logger wrote (the progress lines)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# -- a job that may still be paid for again never lets the task succeed ------------------------------------


def test_an_upload_whose_answer_was_lost_fails_the_task_whatever_the_allowance(
    doc2x, make_image, monkeypatch
):
    """Doc2X took (and billed) the image, its answer never came: a success means the next run pays again."""
    use_connection(monkeypatch, doc2x, timeout=1.0)
    doc2x.configure(stall_next=1, stall_seconds=4)
    images = [make_image(title="Lost Answer"), make_image(title="Good One"), make_image(title="Good Two")]
    op = parse_operator(images, deferrable=True, allowed_failures=1)
    with pytest.raises(Doc2XError, match="upload_answer_lost"):
        run(op, TaskInstance(), StateStore())


def test_a_result_that_could_not_be_fetched_fails_the_task_whatever_the_allowance(
    doc2x, make_image, tmp_path, monkeypatch
):
    """The job succeeded (paid); only the fetch of its result failed: a new try fetches it for nothing."""
    use_connection(monkeypatch, doc2x, max_retries=0)  # one gateway error is one failed call
    images = [make_image(title="Not Fetched"), make_image(title="Fetched"), make_image(title="Fetched Too")]
    op = parse_operator(images, deferrable=True, allowed_failures=1, output_path=str(tmp_path / "out"))
    ti = TaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    event = asyncio.run(first_event(deferred.value.trigger))
    assert [job["status"] for job in event_jobs(event, ti)] == ["success"] * 3
    doc2x.configure(fail_next=1)  # the gateway fails the first result fetch of the resumed task
    with pytest.raises(Doc2XError):
        op.execute_complete({"ti": ti}, event)


def test_a_status_that_stays_malformed_fails_the_task_whatever_the_allowance(doc2x, make_image):
    """Doc2X may hold the result of a job whose answers were garbled: a new try reconnects, a new run pays."""
    garbled = make_image(title="Garbled")
    doc2x.configure(malformed_status=[sha256_of(garbled.read_bytes())])
    op = parse_operator([garbled, make_image(title="Fine")], deferrable=True, allowed_failures=1)
    with pytest.raises(Doc2XError, match="protocol_error"):
        run(op, TaskInstance())


def test_a_job_still_processing_at_the_deadline_fails_the_task_whatever_the_allowance(doc2x, make_image):
    doc2x.configure(processing_time=30)
    images = [make_image(title="Slow"), make_image(title="Bad", paragraphs=[FAIL])]
    op = parse_operator(images, deferrable=True, allowed_failures=0.5, timeout=1)
    with pytest.raises(Doc2XError, match="2 images were not parsed"):
        run(op, TaskInstance())


def test_a_pdf_still_processing_at_the_deadline_fails_the_task_whatever_the_allowance(lane, make_image):
    lane.configure(pdf_page_seconds=30)
    images = [make_image("slow.jpg", title="Slow"), make_image("bad.jpg", title="Bad", paragraphs=[FAIL])]
    op = parse_operator(images, method="pdf", deferrable=True, allowed_failures=0.5, timeout=1)
    with pytest.raises(Doc2XError):
        run(op, TaskInstance())


# -- what is said of each failure --------------------------------------------------------------------------


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_failed_job_is_named_with_doc2x_s_trace_id(doc2x, make_image, deferrable):
    """The README promises each failure's trace id (what Doc2X's support asks for)."""
    bad = make_image(title="Bad", paragraphs=[FAIL])
    ti = TaskInstance()
    run(parse_operator([make_image(title="Good"), bad], deferrable=deferrable, allowed_failures=1), ti)
    (failure,) = ti.xcom[FAILURES_XCOM_KEY]
    assert failure["source"] == str(bad) and failure["code"] == "parse_error"
    assert isinstance(failure["trace_id"], str) and failure["trace_id"]


def test_an_upload_refused_after_its_retries_fails_the_task_whatever_the_allowance(
    doc2x, make_image, monkeypatch
):
    """A transient refusal is not a bad page: the task fails and Airflow's retry sends it again (nothing was billed)."""
    use_connection(monkeypatch, doc2x, max_retries=0, max_concurrent_uploads=1)
    doc2x.configure(fail_next=1)  # the first upload gets a gateway's 503, not retried
    refused = make_image(title="Refused")
    with pytest.raises(Doc2XError, match=r"1 of 2 images were not parsed") as caught:
        run(
            parse_operator([refused, make_image(title="Good")], deferrable=True, allowed_failures=1),
            TaskInstance(),
        )
    assert str(refused) in str(caught.value) and "transient_error" in str(caught.value)


@pytest.mark.parametrize("method", ["async", "sync"])
def test_the_same_content_under_two_names_that_fails_names_both_and_records_neither(
    doc2x, make_image, tmp_path, method
):
    bad = make_image("bad.png", title="Bad Twice", paragraphs=[FAIL])
    twin = tmp_path / "twin.png"
    twin.write_bytes(bad.read_bytes())
    good = make_image(title="Good")
    kwargs = {"output_path": str(tmp_path / "out"), "incremental": True, "method": method}
    ti = TaskInstance()
    records = run(
        parse_operator([bad, good, twin], deferrable=method == "async", allowed_failures=2, **kwargs), ti
    )
    assert [record["source"] for record in records] == [str(good)]
    assert sorted(failure["source"] for failure in ti.xcom[FAILURES_XCOM_KEY]) == sorted(
        [str(bad), str(twin)]
    )
    sent = images_sent(doc2x)
    assert sent == 2  # the twin shares the bad one's upload
    run(
        parse_operator([bad, good, twin], deferrable=method == "async", allowed_failures=2, **kwargs),
        TaskInstance(),
    )
    assert images_sent(doc2x) == sent + 1  # the content sent again once, the good one not at all


@pytest.mark.parametrize("method", ["async", "sync", "pdf"])
def test_a_document_that_fails_as_a_whole_is_one_failure_named_by_its_source(
    lane, make_image, tmp_path, method
):
    pages = [
        Page(title="Clause One"),
        Page(title="Clause Two"),
        Page(title="Clause Three", paragraphs=[FAIL]),
    ]
    document = pdf_of_pages(tmp_path / "contract.pdf", pages)
    good = [make_image(f"good-{n}.jpg", title=f"Good {n}") for n in range(2)]
    ti = TaskInstance()
    images = [good[0], document, good[1]]
    op = parse_operator(images, method=method, deferrable=method != "sync", allowed_failures=1)
    records = run(op, ti)
    assert [record["source"] for record in records] == [str(path) for path in good]
    (failure,) = ti.xcom[FAILURES_XCOM_KEY]
    assert failure["source"] == str(document)


def test_failures_and_records_keep_the_input_order_with_the_manifest_answering_some(
    doc2x, make_image, tmp_path
):
    known = [make_image(title=f"Known {n}") for n in range(3)]
    kwargs = {"output_path": str(tmp_path / "out"), "incremental": True, "deferrable": True}
    run(parse_operator(known, **kwargs), TaskInstance())
    bad = [make_image(title=f"Bad {n}", paragraphs=[FAIL]) for n in range(2)]
    new = [make_image(title=f"New {n}") for n in range(2)]
    order = [new[0], known[0], bad[0], known[1], new[1], bad[1], known[2]]
    ti = TaskInstance()
    records = run(parse_operator(order, allowed_failures=2, **kwargs), ti)
    assert [record["source"] for record in records] == [str(p) for p in order if p not in bad]
    assert [failure["source"] for failure in ti.xcom[FAILURES_XCOM_KEY]] == [str(p) for p in bad]


@pytest.mark.parametrize(("allowed", "total", "fails"), [(0.999, 1, True), (0.5, 3, False), (0.34, 3, False)])
def test_a_fraction_at_the_edge_of_a_tiny_batch(doc2x, make_image, allowed, total, fails):
    images = [make_image(title="Bad", paragraphs=[FAIL])] + [
        make_image(title=f"Good {n}") for n in range(total - 1)
    ]
    op = parse_operator(images, deferrable=True, allowed_failures=allowed)
    if fails:
        with pytest.raises(Doc2XError):
            run(op, TaskInstance())
    else:
        assert len(run(op, TaskInstance())) == total - 1


def test_the_failures_files_of_tries_mapped_tasks_and_runs_never_collide_on_an_object_store(
    doc2x, make_image, tmp_path
):
    use_for_memory(MemoryFileSystem)
    bad = make_image(title="Bad", paragraphs=[FAIL])
    out = f"memory://doc2x-failures-hostile/{tmp_path.name}/out"
    tis = [
        TaskInstance(),
        TaskInstance(try_number=2),
        TaskInstance(map_index=0),
        TaskInstance(map_index=1),
        TaskInstance(run_id="manual__2026-12-01T00:00:00+00:00"),
        TaskInstance(task_id="parse_again"),
    ]
    for ti in tis:
        run(parse_operator([bad], deferrable=True, allowed_failures=1, output_path=out), ti)
    from airflow_provider_doc2x.storage.objects import storage_path

    listed = sorted(str(path) for path in (storage_path(out) / "_failures").rglob("*.jsonl"))
    assert len(listed) == len(tis)
    for path in listed:
        (line,) = storage_path(path).read_text().splitlines()
        assert json.loads(line)["source"] == str(bad)


@pytest.fixture
def faulty(monkeypatch):
    """``memory://`` with storage faults a test switches on (see tests.helpers.storage_faults)."""
    from tests.helpers.storage_faults import faulty_memory

    with faulty_memory(monkeypatch) as fs:
        yield fs


def test_a_failures_file_that_cannot_be_written_fails_the_task_and_the_retry_pays_only_for_the_failure(
    doc2x, make_image, faulty, tmp_path
):
    from tests.helpers.storage_faults import FaultyFS

    bad = make_image(title="Bad", paragraphs=[FAIL])
    good = [make_image(title=f"Good {n}") for n in range(2)]
    out = f"memory://doc2x-failures-down/{tmp_path.name}/out"
    store = StateStore()
    FaultyFS.failing_writes.add("/_failures/")
    with pytest.raises(Doc2XError) as caught:
        run(
            parse_operator([good[0], bad, good[1]], deferrable=True, allowed_failures=1, output_path=out),
            TaskInstance(),
            store,
        )
    assert "_failures" in str(caught.value)
    FaultyFS.heal()
    sent = images_sent(doc2x)
    ti = TaskInstance(try_number=2)
    records = run(
        parse_operator([good[0], bad, good[1]], deferrable=True, allowed_failures=1, output_path=out),
        ti,
        store,
    )
    assert [record["source"] for record in records] == [str(path) for path in good]
    assert images_sent(doc2x) == sent + 1  # the parsed images' results were kept; only the failure goes again


def test_a_run_id_of_dots_does_not_put_its_failures_file_outside_its_task_s_folder(
    doc2x, make_image, tmp_path
):
    """``..`` matches Airflow's default run id pattern (letters, digits, ``_.~:+-``)."""
    bad = make_image(title="Bad", paragraphs=[FAIL])
    out = tmp_path / "out"
    for task_id in ("parse", "parse_other"):
        run(
            parse_operator([bad], deferrable=True, allowed_failures=1, output_path=str(out)),
            TaskInstance(run_id="..", task_id=task_id),
        )
    listed = sorted(
        path.relative_to(out / "_failures").as_posix() for path in (out / "_failures").rglob("*.jsonl")
    )
    assert len(listed) == 2 and all(
        path.startswith(("nightly/parse/", "nightly/parse_other/")) for path in listed
    )


def test_no_key_in_xcom_failures_files_or_logs_when_the_server_echoes_it(
    doc2x, make_image, tmp_path, caplog, capfd
):
    caplog.set_level(logging.INFO)
    doc2x.configure(echo_key=True)
    bad = make_image(title="Bad", paragraphs=[FAIL])
    out = tmp_path / "out"
    ti = TaskInstance()
    for method in ("async", "sync"):
        run(
            parse_operator(
                [bad, make_image()],
                method=method,
                deferrable=method == "async",
                allowed_failures=1,
                output_path=str(out),
            ),
            ti,
        )
        assert API_KEY not in json.dumps(ti.xcom)
    for path in (out / "_failures").rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text()
    said = "\n".join([record.getMessage() for record in caplog.records] + list(capfd.readouterr()))
    assert API_KEY not in said


# -- progress lines ------------------------------------------------------------------------------------------


class StepClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_of_thousands_of_jobs_with_a_clock_that_jumps_stay_few_and_never_go_back():
    log = logging.getLogger("doc2x-hostile-progress")
    lines = Lines()
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    clock = StepClock()
    try:
        progress = Progress(log, 5000, "done", interval=10, clock=clock)
        for done in range(1, 5001):
            clock.now += -50 if done == 2500 else 0.001  # one jump back, as a wall clock might
            progress.update(done)
        progress.update(5000)
    finally:
        log.removeHandler(lines)
    counts = [int(line.split()[1].split("/")[0]) for line in lines.lines]
    assert counts == sorted(counts) and counts[-1] == 5000
    assert len(lines.lines) <= 5


def test_progress_of_no_time_at_all_never_divides_by_zero():
    clock = StepClock()
    progress = Progress(logging.getLogger("x"), 3, "done", clock=clock, interval=0)
    progress.update(1)
    assert "left at the observed pace" not in progress.line()  # no time passed: no pace to tell
    zero = Progress(logging.getLogger("x"), 0, "submitted", per_second=0.0, clock=clock, interval=0)
    assert zero.line() == "Doc2X: 0/0 submitted"


def test_a_connection_with_a_rate_window_of_zero_is_refused_by_name_not_by_a_division_by_zero(
    doc2x, make_image, monkeypatch
):
    """Before progress lines the pacing refused it naming the window; the progress line now divides by it first."""
    use_connection(monkeypatch, doc2x, rate_limit_window=0)
    with pytest.raises(Exception) as caught:
        run(parse_operator([make_image()], deferrable=True), TaskInstance())
    assert not isinstance(caught.value, ZeroDivisionError), repr(caught.value)
    assert "window" in str(caught.value)


def test_the_pdf_lane_s_progress_never_goes_back_when_failed_pages_are_tried_again(
    lane, make_image, monkeypatch, caplog, capfd
):
    """A PDF that failed is split and sent again: its pages were counted done, then are waited for again."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("AIRFLOW__DOC2X__PROGRESS_INTERVAL", "0")
    use_connection(monkeypatch, lane, max_concurrent_uploads=1)
    # The PDF fails; its images go again through the image lane, one upload after another, so that
    # their jobs finish in turn.
    lane.configure(pdf_fail_next=1, upload_seconds=0.3)
    images = [make_image(f"page-{n}.jpg", title=f"Page {n}") for n in range(4)]
    op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=4)
    records = run(op, TaskInstance())
    assert len(records) == 4
    # Airflow 2 logs through logging (caplog), Airflow 3 through structlog (the captured streams);
    # a line may show in both, so each source is read alone.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    said = logged if re.search(r"Doc2X: \d+/4 done", logged) else "\n".join(capfd.readouterr())
    counts = [int(n) for n in re.findall(r"Doc2X: (\d+)/4 done", said)]
    assert counts, said[-3000:]
    assert counts == sorted(counts), counts


# -- the task's list of PDFs, written side by side ------------------------------------------------------------


class FlakyStore(StateStore):
    """A slow task state store whose ``set`` of a batch of the PDF lane fails once."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.calls = 0
        self.fail_on = fail_on
        self.lock = threading.Lock()
        self.writes = 0

    def set(self, key, value, **kwargs):
        with self.lock:
            self.calls += 1
            call = self.calls
        time.sleep(0.01)  # a store across a network: starts pile up while a write is under way
        if key.startswith(STATE_PDF_LOG_PREFIX) and call == self.fail_on:
            raise ConnectionError("the API server went away")
        super().set(key, value, **kwargs)
        self.writes += 1


@pytest.mark.parametrize("fail_on", [1, 2])
def test_many_pdfs_started_side_by_side_each_return_only_once_stored_and_none_after_a_failed_write(fail_on):
    store = FlakyStore(fail_on)
    journal = TaskJournal(store, may_hold=False)
    journal.pdfs.start_group = 8
    uids = [f"pdf-{n:03d}" for n in range(100)]  # more than one batch (FLUSH_ENTRIES)
    returned_with: dict[str, dict] = {}

    async def start(uid: str) -> None:
        await journal.pdf_started(uid, {"pages": [uid], "state": "put", "at": 1.0})
        returned_with[uid] = store.pdfs()

    async def main():
        return await asyncio.gather(*(start(uid) for uid in uids), return_exceptions=True)

    with journal.open():
        outcomes = asyncio.run(main())
    failed = [uid for uid, outcome in zip(uids, outcomes, strict=True) if isinstance(outcome, BaseException)]
    assert all(
        isinstance(outcome, Doc2XTaskStateError) for outcome in outcomes if isinstance(outcome, BaseException)
    )
    assert len(failed) >= 1
    for uid, held in returned_with.items():
        assert uid in held  # returned only once a write holding it was done
    assert set(store.pdfs()) == set(returned_with)  # every PDF that may be PUT is found by a new try
    assert store.writes < len(returned_with) or not returned_with  # the writes were shared
