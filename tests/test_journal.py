"""
The task's journal in the task state store: PDFs submitted side by side must each be found in the
task's list of PDFs, and the image lane's batches of starts and uids must keep every guarantee of one
write per upload (a new try reconnects to each recorded uid; an upload whose uid may not have been
recorded is named "possibly billed twice", never silently resent), so that a new try reconnects
instead of paying again.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import img2pdf
import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x.exceptions import Doc2XTaskStateError
from airflow_provider_doc2x.journal import (
    STATE_INDEX_KEY,
    STATE_KEY_PREFIX,
    STATE_LOG_PREFIX,
    STATE_PDF_LOG_PREFIX,
    STATE_PDF_PREFIX,
    recorded_images,
)
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.storage.sources import ImageSource, sha256_of
from tests.helpers import StateStore, image_uploads, parse_operator, run_to_the_end


class SlowStore(StateStore):
    """A task state store whose reads take a while (a busy supervisor), as a fault injected."""

    def __init__(self) -> None:
        super().__init__()
        self.calls_at_once = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            self.calls_at_once += 1
            self.most_at_once = max(self.most_at_once, self.calls_at_once)
        try:
            time.sleep(0.3)
            return super().get(key, default)
        finally:
            with self._lock:
                self.calls_at_once -= 1


def two_sizes(tmp_path):
    """Four images of two sizes: two PDFs, submitted side by side."""
    paths = []
    for n, size in enumerate([(400, 300), (400, 300), (300, 500), (300, 500)]):
        path = tmp_path / f"page-{n}.jpg"
        path.write_bytes(render(Page(title=f"Side {n}"), fmt="JPEG", size=size))
        paths.append(path)
    return paths


def test_pdfs_submitted_side_by_side_on_a_first_try_are_all_in_the_task_s_list(lane, tmp_path):
    """A first try submits two PDFs at once; its worker is lost; the retry must reconnect to both, not pay again."""
    images = two_sizes(tmp_path)
    store = SlowStore()
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute({"task_state_store": store, "ti": SimpleNamespace(try_number=1)})
    assert lane.stats()["pdf_tasks"] == 2
    # The worker is lost here; the retry reads the journal.
    retry = parse_operator(images, method="pdf", deferrable=True)
    records = run_to_the_end(retry, {"task_state_store": store, "ti": SimpleNamespace(try_number=2)})[0]
    assert [record["markdown"].splitlines()[0] for record in records] == [f"# Side {n}" for n in range(4)]
    assert len(store.pdfs()) == 2
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"]) == (2, 4)  # no PDF paid twice


def test_pdfs_submitted_side_by_side_at_a_resume_are_all_in_the_task_s_list(lane, tmp_path, monkeypatch):
    """The same at a resume within one try (a new journal object, nothing read yet)."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", lane.connection_json(pdf_max_in_flight=2, pdf_max_pages_in_flight=4)
    )
    images = [tmp_path / f"r-{n}.jpg" for n in range(6)]
    for n, path in enumerate(images):
        path.write_bytes(render(Page(title=f"Resume {n}"), fmt="JPEG", size=(400, 300)))
    store = SlowStore()
    context = {"task_state_store": store, "ti": SimpleNamespace(try_number=1)}
    op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=1)
    records = run_to_the_end(op, context)[0]
    assert len(records) == 6
    stats = lane.stats()
    assert sorted(store.pdfs()) == sorted({r["uid"] for r in records})
    assert stats["pdf_tasks"] == 6
    assert store.most_at_once == 1  # one store call at a time


def test_a_retry_reconnects_to_the_pdfs_an_earlier_release_recorded_under_its_own_keys(lane, tmp_path):
    """A task upgraded between two tries: the list and per-PDF keys of earlier releases are read, and nothing is paid twice."""
    images = two_sizes(tmp_path)
    store = StateStore()
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute({"task_state_store": store, "ti": SimpleNamespace(try_number=1)})
    recorded = store.pdfs()
    # What an earlier release would have written instead of the log.
    store.values = {
        key: value for key, value in store.values.items() if not key.startswith(STATE_PDF_LOG_PREFIX)
    }
    store.values[STATE_INDEX_KEY] = {"uids": list(recorded)}
    for uid, record in recorded.items():
        store.values[STATE_PDF_PREFIX + uid] = record
    retry = parse_operator(images, method="pdf", deferrable=True)
    records = run_to_the_end(retry, {"task_state_store": store, "ti": SimpleNamespace(try_number=2)})[0]
    assert [record["markdown"].splitlines()[0] for record in records] == [f"# Side {n}" for n in range(4)]
    assert {record["uid"] for record in records} == set(recorded)
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"]) == (2, 4)  # no PDF paid twice


class SlowWriteStore(StateStore):
    """A task state store whose writes take a while (a busy API server); counts the writes of the PDF lane."""

    def __init__(self) -> None:
        super().__init__()
        self.pdf_writes = 0

    def set(self, key, value, **kwargs):
        time.sleep(0.2)
        if key.startswith(STATE_PDF_LOG_PREFIX):
            self.pdf_writes += 1
        super().set(key, value, **kwargs)


def test_pdfs_leaving_side_by_side_share_the_writes_of_their_records_and_all_are_found(lane, tmp_path):
    """Five documents at once: fewer writes than documents (each recorded before its PUT and after), and a retry finds every one of them."""
    documents = []
    for n in range(5):
        path = tmp_path / f"doc-{n}.pdf"
        path.write_bytes(img2pdf.convert([render(Page(title=f"Document {n}"), fmt="JPEG", size=(400, 300))]))
        documents.append(path)
    store = SlowWriteStore()
    op = parse_operator(documents, deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute({"task_state_store": store, "ti": SimpleNamespace(try_number=1)})
    assert lane.stats()["pdf_tasks"] == 5
    assert [record["state"] for record in store.pdfs().values()] == ["uploaded"] * 5
    assert store.pdf_writes < 5
    # The worker is lost here; the retry reads the journal.
    retry = parse_operator(documents, deferrable=True)
    records = run_to_the_end(retry, {"task_state_store": store, "ti": SimpleNamespace(try_number=2)})[0]
    assert [record["markdown"].splitlines()[-1] for record in records] == [
        f"# Document {n}" for n in range(5)
    ]
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"]) == (5, 5)  # no document paid twice


# -- the image lane's log of batches ------------------------------------------------------------------


class Log:
    """The task's logger as the uploads see it: what it said, for assertions."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args) -> None:
        self.lines.append(message % args)

    warning = error = info


class SlowWrites(StateStore):
    """A task state store whose writes each take a database commit's while (a busy API server)."""

    def __init__(self, seconds: float = 0.1) -> None:
        super().__init__()
        self.seconds = seconds
        self.writes = 0

    def set(self, key, value, **kwargs):
        time.sleep(self.seconds)
        self.writes += 1
        super().set(key, value, **kwargs)


class LostAfterAnswers(StateStore):
    """What a worker killed right after its uploads were answered leaves: starts, no uids.

    The uids that came back never reach the store (the worker died before their write).
    """

    def set(self, key, value, **kwargs):
        if key.startswith(STATE_LOG_PREFIX):
            value = {**value, "entries": [entry for entry in value["entries"] if entry[1].get("started")]}
        super().set(key, value, **kwargs)


class RefusingWrites(StateStore):
    """A task state store that cannot write (its API server is down)."""

    def set(self, key, value, **kwargs):
        raise OSError("the task state store cannot be reached")


def uploads(store, log=None, *, may_hold=True, max_concurrent=None):
    return image_uploads(store, log or Log(), may_hold=may_hold, max_concurrent=max_concurrent)


def sources_of(images):
    return [ImageSource.of(str(image)) for image in images]


def test_starts_and_uids_are_written_in_batches_and_a_new_try_reconnects_to_every_uid(doc2x, make_image):
    """Twenty-four uploads side by side make far fewer writes than two per image; every uid is kept."""
    images = [make_image(title=f"Batched {n}") for n in range(24)]
    store = SlowWrites()
    log = Log()
    jobs = uploads(store, log, may_hold=False, max_concurrent=8).submit(sources_of(images))
    assert store.writes <= 12  # two per image would be 48
    (said,) = [line for line in log.lines if "24 images submitted" in line]
    assert f"task state store: {store.writes} writes" in said
    recorded = recorded_images(store.get)
    assert {value["uid"] for value in recorded.values()} == {job["uid"] for job in jobs}
    assert all(key.startswith(STATE_LOG_PREFIX) for key in store.values)

    again = uploads(store, Log()).submit(sources_of(images))  # a new try
    assert [job["uid"] for job in again] == [job["uid"] for job in jobs]
    assert (doc2x.stats()["billed_total"], doc2x.stats()["max_billed_per_image"]) == (24, 1)


def test_a_worker_killed_before_its_uids_were_written_leaves_each_image_named_possibly_billed_twice(
    doc2x, make_image
):
    images = [make_image(title=f"Killed {n}") for n in range(5)]
    store = LostAfterAnswers()
    uploads(store, may_hold=False).submit(sources_of(images))
    assert all(value.get("started") for value in recorded_images(store.get).values())
    log = Log()
    uploads(store, log).submit(sources_of(images))  # the next try
    warned = [line for line in log.lines if "possibly billed twice" in line]
    assert sorted(warned) == sorted(
        f"{image} is submitted again and is possibly billed twice: an earlier try's upload of it "
        "started and was never answered"
        for image in images
    )
    assert doc2x.stats()["max_billed_per_image"] == 2  # sent again, and said so


def test_a_store_that_cannot_write_stops_the_batch_before_any_image_is_sent(doc2x, make_image):
    """An upload whose start cannot be recorded is not sent: a next try could not know of it."""
    images = [make_image(title=f"Unrecorded {n}") for n in range(6)]
    with pytest.raises(
        Doc2XTaskStateError, match=r"task state store could not be written .*cannot be reached"
    ):
        uploads(RefusingWrites(), may_hold=False).submit(sources_of(images))
    assert doc2x.stats()["billed_total"] == 0


def test_batches_written_after_a_resume_in_the_same_try_follow_the_first_ones(doc2x, make_image):
    """Two calls of one try (a resume that uploads more) never write over each other's batches."""
    first = [make_image(title=f"First {n}") for n in range(3)]
    second = [make_image(title=f"Second {n}") for n in range(3)]
    store = StateStore()
    jobs = uploads(store, may_hold=False).submit(sources_of(first))
    jobs += uploads(store, may_hold=False).submit(sources_of(second))
    assert {value["uid"] for value in recorded_images(store.get).values()} == {job["uid"] for job in jobs}
    again = uploads(store).submit(sources_of(first + second))  # a new try
    assert [job["uid"] for job in again] == [job["uid"] for job in jobs]
    assert doc2x.stats()["billed_total"] == 6


def test_a_new_try_reconnects_to_a_uid_an_earlier_release_recorded_per_image(doc2x, make_image):
    """Earlier releases wrote one key per content (``doc2x/<sha256>``): a new try still reads it."""
    image = make_image(title="Recorded Per Image")
    (job,) = uploads(None, may_hold=False).submit(sources_of([image]))
    store = StateStore()
    store.set(
        STATE_KEY_PREFIX + sha256_of(image.read_bytes()), {"uid": job["uid"], "source": str(image), "at": 0}
    )
    log = Log()
    (again,) = uploads(store, log).submit(sources_of([image]))
    assert again["uid"] == job["uid"]
    assert doc2x.stats()["billed_total"] == 1
    assert any("Reconnected" in line and job["uid"] in line for line in log.lines)
