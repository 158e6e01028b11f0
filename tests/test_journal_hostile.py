"""
The image lane's log of batches in the task state store, under faults: a store that fails once, a
task timeout in the middle of a batch, an earlier release's record next to the log. Whatever the
fault, an upload whose uid came back is found by the next try, and one that may have been billed
without its uid being kept is named "possibly billed twice", never resent silently.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest

from airflow_provider_doc2x.exceptions import Doc2XQuotaError, Doc2XTaskStateError
from airflow_provider_doc2x.image_lane.uploads import ImageUploads
from airflow_provider_doc2x.journal import STATE_KEY_PREFIX
from airflow_provider_doc2x.storage.sources import ImageSource, sha256_of
from tests.helpers import StateStore, image_uploads, wait_until

BILLED_TWICE = "possibly billed twice"


class Log:
    """The task's logger as the uploads see it: what it said, for assertions."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)

    warning = error = info

    def named_billed_twice(self) -> list[str]:
        return [line for line in self.lines if BILLED_TWICE in line]


def uploads(store, log=None, *, may_hold=True, max_concurrent=None) -> ImageUploads:
    return image_uploads(store, log or Log(), may_hold=may_hold, max_concurrent=max_concurrent)


def sources_of(images) -> list[ImageSource]:
    return [ImageSource.of(str(image)) for image in images]


def digest_of(image) -> str:
    return sha256_of(image.read_bytes())


#: The image lane's log of batches (``doc2x/log/0``, ...), next to the per-content keys of earlier releases.
LOG_PREFIX = f"{STATE_KEY_PREFIX}log/"


def entries_of(key: str, value: Any) -> list[tuple[str, dict[str, Any]]]:
    """The ``(sha256, value)`` entries one write of the image lane holds: a batch of the log, or one
    content's key (what earlier releases wrote); none for the PDF lane's keys.
    """
    if key.startswith(LOG_PREFIX):
        return [(digest, entry) for digest, entry in value["entries"]]
    if key.startswith(f"{STATE_KEY_PREFIX}pdf/"):
        return []
    return [(key[len(STATE_KEY_PREFIX) :], value)]


def recorded(store: StateStore) -> dict[str, dict[str, Any]]:
    """Each content's latest entry in the store, as the next try reads it."""
    images: dict[str, dict[str, Any]] = {}
    number = 0
    while (batch := store.values.get(f"{LOG_PREFIX}{number}")) is not None:
        images.update(entries_of(f"{LOG_PREFIX}{number}", batch))
        number += 1
    for key, value in store.values.items():
        if not key.startswith(LOG_PREFIX):
            for digest, entry in entries_of(key, value):
                images.setdefault(digest, entry)
    return images


def is_batch_of_answers(key: str, value: Any) -> bool:
    """A write of the image lane holding no start: the uids (or losses, failures) that came back."""
    entries = entries_of(key, value)
    return bool(entries) and not any(entry.get("started") for _, entry in entries)


class KilledAfterStarts(StateStore):
    """What a worker killed after its uploads left, before their uids were written, leaves behind."""

    def set(self, key, value, **kwargs):
        if is_batch_of_answers(key, value):
            return
        super().set(key, value, **kwargs)


class FailsOneBatchOfAnswers(StateStore):
    """A store whose first write of uids fails (the API server answered 503 once), then works again."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: set[str] = set()

    def set(self, key, value, **kwargs):
        if not self.lost and is_batch_of_answers(key, value):
            self.lost = {digest for digest, _ in entries_of(key, value)}
            raise OSError("the task state store answered 503")
        super().set(key, value, **kwargs)


# -- an earlier release's record next to the log -------------------------------------------------------


@pytest.mark.parametrize("method", ["submit", "parse"])
def test_an_upload_killed_after_an_earlier_release_s_uid_expired_is_named_possibly_billed_twice(
    doc2x, make_image, method
):
    """Try 1 (an earlier release) recorded a uid Doc2X no longer knows; try 2 uploads again and its
    worker is killed before the uid is written; try 3 must say the image is possibly billed twice.
    """
    image = make_image(title="Expired Then Killed")
    store = KilledAfterStarts()
    store.values[STATE_KEY_PREFIX + digest_of(image)] = {
        "uid": "0192f0a0-expired-job",
        "source": str(image),
        "at": 0,
    }
    getattr(uploads(store), method)(sources_of([image]))  # try 2, killed before its uid was written
    assert recorded(store)[digest_of(image)].get("started")
    assert doc2x.stats()["billed_total"] == 1

    log = Log()
    getattr(uploads(store, log), method)(sources_of([image]))  # try 3
    assert doc2x.stats()["billed_total"] == 2
    (warning,) = log.named_billed_twice()
    assert str(image) in warning


# -- a store that fails once ----------------------------------------------------------------------------


def test_a_write_of_uids_that_fails_once_loses_only_the_uids_it_held(doc2x, make_image, monkeypatch):
    """An upload answered after a failed write still has its uid written: the next try reconnects to it.

    One upload's answer stalls (it is billed at once, answered a second later); the others are
    answered at once, and the write of their uids fails. The stalled upload's uid comes back after
    that failure, while the store works again: only the uids of the failed write may be lost.
    """
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_concurrent_uploads=4))
    doc2x.configure(stall_next=1, stall_seconds=1.0)
    images = [make_image(title=f"Fails Once {n}") for n in range(4)]
    store = FailsOneBatchOfAnswers()
    with pytest.raises(Doc2XTaskStateError, match="503"):
        uploads(store, may_hold=False).submit(sources_of(images))
    assert doc2x.stats()["billed_total"] == 4
    assert store.lost and len(store.lost) < 4  # the stalled upload was not in the failed write

    log = Log()
    uploads(healthy_copy(store), log).submit(sources_of(images))  # the next try, the store healthy
    named = sorted(line.split(" is submitted again")[0] for line in log.named_billed_twice())
    lost = sorted(str(image) for image in images if digest_of(image) in store.lost)
    assert named == lost
    assert doc2x.stats()["billed_total"] == 4 + len(lost)


def healthy_copy(store: StateStore) -> StateStore:
    healthy = StateStore()
    healthy.values = dict(store.values)
    return healthy


# -- a task timeout in the middle of a batch ------------------------------------------------------------


class Interrupted(Exception):
    """What Airflow's execution timeout raises in the task's thread."""


class ThreadsSeen(StateStore):
    """A store that notes the threads it is called from (its in-process stand-in is not thread-safe)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def get(self, key, default=None):
        self.threads.add(threading.current_thread().name)
        return super().get(key, default)

    def set(self, key, value, **kwargs):
        self.threads.add(threading.current_thread().name)
        super().set(key, value, **kwargs)


class TimeoutAfter(Log):
    """The task's logger; Airflow's execution timeout strikes the task's thread as it logs ``said``."""

    def __init__(self, said: str) -> None:
        super().__init__()
        self.said = said
        self.thread = threading.get_ident()

    def info(self, message: str, *args: Any) -> None:
        super().info(message, *args)
        if self.said in self.lines[-1]:
            signal.pthread_kill(self.thread, signal.SIGALRM)


@pytest.fixture
def execution_timeout():
    """SIGALRM raises in the task's thread, as Airflow's ``execution_timeout`` does."""

    def interrupt(*_):
        raise Interrupted("Timeout, PID: 1")

    previous = signal.signal(signal.SIGALRM, interrupt)
    yield
    signal.signal(signal.SIGALRM, previous)


def timed_out_batch(doc2x, make_image, monkeypatch, store) -> list:
    """Eleven uploads side by side; ten are answered, one stalls; the timeout strikes at "10/11"."""
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_concurrent_uploads=11))
    monkeypatch.setenv("AIRFLOW__DOC2X__PROGRESS_INTERVAL", "0")  # a progress line for every upload
    doc2x.configure(stall_next=1, stall_seconds=3.0)
    images = [make_image(title=f"Timed Out {n}") for n in range(11)]
    with pytest.raises(Interrupted):
        uploads(store, TimeoutAfter("10/11 submitted"), may_hold=False).submit(sources_of(images))
    return images


def test_a_task_timeout_mid_batch_leaves_every_uid_that_came_back_in_the_store(
    doc2x, make_image, monkeypatch, execution_timeout
):
    """Ten uploads were answered before the timeout: their uids are in the store when the call raises."""
    store = StateStore()
    timed_out_batch(doc2x, make_image, monkeypatch, store)
    kept = recorded(store)
    assert sorted(bool(value.get("uid")) for value in kept.values()) == [False] + [True] * 10


def test_a_task_timeout_mid_batch_leaves_no_write_behind(doc2x, make_image, monkeypatch, execution_timeout):
    """Once the call has raised, the store is not written any more, and never from another thread."""
    store = ThreadsSeen()
    timed_out_batch(doc2x, make_image, monkeypatch, store)
    at_raise = dict(store.values)
    threads = set(store.threads)
    wait_until(lambda: doc2x.stats()["uploads_in_flight"] == 0, message="the stalled upload ended")
    assert store.values == at_raise  # nothing written behind the task's back
    assert store.threads == threads and all(name.startswith("doc2x-state") for name in threads), threads


# -- a refused key or an empty quota ---------------------------------------------------------------------


def test_uploads_refused_for_an_empty_quota_are_not_named_possibly_billed_twice(
    doc2x, make_image, monkeypatch
):
    """Doc2X answered "quota exhausted" to four of six uploads: it took none of them, so the next try
    (after the quota was raised) sends them without saying they are possibly billed twice.
    """
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_concurrent_uploads=6))
    doc2x.configure(quota=2)
    images = [make_image(title=f"Quota {n}") for n in range(6)]
    store = StateStore()
    with pytest.raises(Doc2XQuotaError):
        uploads(store, may_hold=False).submit(sources_of(images))
    assert doc2x.stats()["billed_total"] == 2
    doc2x.configure(quota=None)
    log = Log()
    again = uploads(store, log).submit(sources_of(images))
    assert len({job["uid"] for job in again}) == 6
    assert doc2x.stats()["max_billed_per_image"] == 1
    assert log.named_billed_twice() == []


# -- one batch object, called twice in a try --------------------------------------------------------------


def test_a_second_call_of_the_same_uploads_reconnects_to_what_the_first_recorded(doc2x, make_image):
    """The PDF lane sends images to one ``ImageUploads`` after each wait (a new try, waiting in the
    worker): a content the first call uploaded is reconnected to by the second, not paid again.
    """
    image = make_image(title="Twice In One Try")
    batch = uploads(StateStore(), may_hold=True)  # a second try of the task
    (first,) = batch.submit(sources_of([image]))
    (second,) = batch.submit(sources_of([image]))
    assert second["uid"] == first["uid"]
    assert doc2x.stats()["billed_total"] == 1


# -- the store's own failures ---------------------------------------------------------------------------


class ReadsFail(StateStore):
    """A store whose reads fail (the supervisor's channel broke)."""

    def get(self, key, default=None):
        raise ConnectionError("the supervisor closed the channel")


class WritesFail(StateStore):
    def set(self, key, value, **kwargs):
        raise ConnectionError("the supervisor closed the channel")


@pytest.mark.parametrize("store", [ReadsFail(), WritesFail()], ids=["get", "set"])
def test_a_store_that_fails_is_named_in_the_error_with_the_image(doc2x, make_image, store):
    """The task fails saying that the task state store failed, for which image: not a bare ConnectionError."""
    image = make_image(title="Store Fails")
    with pytest.raises(Exception) as raised:
        uploads(store).submit(sources_of([image]))
    assert doc2x.stats()["billed_total"] == 0
    assert "task state store" in str(raised.value)
    assert str(image) in str(raised.value)
