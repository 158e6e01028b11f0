"""
Uploads side by side, against the local server on a slow link: concurrency within the key's window,
and every safety of one upload at a time (one billing per image, duplicates shared, uids recorded as
uploads finish in any order, no silent resend, a refused key or empty quota stopping the batch,
bodies read when their turn comes, records in input order).
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from PIL import Image

from airflow_provider_doc2x.exceptions import Doc2XAuthError, Doc2XError, Doc2XQuotaError
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.image_lane.uploads import ImageUploads
from airflow_provider_doc2x.journal import STATE_KEY_PREFIX, STATE_LOG_PREFIX, TaskJournal, recorded_images
from airflow_provider_doc2x.protocol import STATUS_PATH
from airflow_provider_doc2x.records import FETCH_ATTEMPTS
from airflow_provider_doc2x.storage.sources import ImageSource, sha256_of
from tests.helpers import StateStore, parse_operator, run_deferred, wait_until
from tests.helpers.s3 import proxied_doc2x


class CountedPath:
    """A real path whose opens (on its filesystem, as the provider reads) are counted: when image bodies are read."""

    def __init__(self, path: Any, opened: list[str]) -> None:
        self._path = path
        self._opened = opened

    def __getattr__(self, name: str) -> Any:
        return getattr(self._path, name)

    @property
    def fs(self) -> Any:
        return CountedFilesystem(self._path.fs, self._opened)


class CountedFilesystem:
    """A real filesystem whose opens are counted."""

    def __init__(self, fs: Any, opened: list[str]) -> None:
        self._fs = fs
        self._opened = opened

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def open(self, path: str, mode: str = "rb", **options: Any) -> Any:
        self._opened.append(path)
        return self._fs.open(path, mode=mode, **options)


def counted_sources(images, opened: list[str]) -> list[ImageSource]:
    sources = [ImageSource.of(str(image)) for image in images]
    return [ImageSource(source.uri, CountedPath(source.path, opened)) for source in sources]


class Log:
    """The task's logger as the batch sees it: what it said, for assertions."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)

    warning = info


def batch(store=None, *, results=None, log=None, may_hold_uids=True) -> ImageUploads:
    return ImageUploads(
        Doc2XHook(),
        journal=TaskJournal(store, may_hold=may_hold_uids),
        results=results,
        log=log or Log(),
    )


def slow_link(doc2x, monkeypatch, **extra):
    """Each upload's body takes long to arrive; our window is generous; N uploads may be in flight."""
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(**extra))


def test_uploads_are_in_flight_side_by_side(doc2x, make_image, monkeypatch):
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=4)
    doc2x.configure(upload_seconds=0.5)
    records = run_deferred(parse_operator([make_image() for _ in range(8)], deferrable=True), {})
    stats = doc2x.stats()
    assert len(records) == 8
    assert stats["max_uploads_in_flight"] == 4
    assert (stats["billed_total"], stats["max_billed_per_image"]) == (8, 1)


def test_the_synchronous_endpoint_runs_side_by_side_too(doc2x, make_image, monkeypatch):
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=3)
    doc2x.configure(upload_seconds=0.4)
    images = [make_image(title=f"Sync {n}") for n in range(6)]
    records = parse_operator(images, method="sync").execute({})
    assert [record["markdown"].split("\n")[0] for record in records] == [f"# Sync {n}" for n in range(6)]
    stats = doc2x.stats()
    assert stats["max_uploads_in_flight"] == 3
    assert stats["requests"] == {"parse": 6}


def test_the_window_still_rules_uploads_in_flight(doc2x, make_image, monkeypatch):
    """Concurrency never runs ahead of the key's window: an upload in flight holds its slot."""
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=8, rate_limit_images=3, rate_limit_window=0.5)
    doc2x.configure(upload_seconds=0.2, rate_limit=3, rate_window=0.5)
    records = run_deferred(parse_operator([make_image() for _ in range(9)], deferrable=True), {})
    stats = doc2x.stats()
    assert len(records) == 9
    assert stats["max_uploads_in_flight"] <= 3
    assert stats["rate_limited"] == 0


def test_bodies_are_read_when_their_turn_comes(doc2x, make_image, monkeypatch):
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=2)
    doc2x.configure(upload_seconds=30)  # the first two uploads stay in flight until the test lets them go
    opened: list[str] = []
    sources = counted_sources([make_image() for _ in range(6)], opened)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(batch().submit, sources)
        wait_until(lambda: doc2x.stats()["uploads_in_flight"] == 2, message="two uploads in flight")
        assert len(opened) == 2  # two bodies in memory; the four others not read yet
        doc2x.configure(upload_seconds=0)
        jobs = running.result(timeout=60)
    assert len(opened) == 6
    assert [job["source"] for job in jobs] == [source.uri for source in sources]


def noise_image(path, side: int):
    """A PNG that does not compress: its body is about ``3 * side**2`` bytes on the wire."""
    noise = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    noise.save(path, format="PNG", compress_level=0)
    return path


def test_uids_are_recorded_as_uploads_finish_in_any_order_and_records_keep_input_order(
    doc2x, make_image, tmp_path, monkeypatch
):
    """
    The first image's body takes long to arrive; the three after it are answered meanwhile. Each of
    their uids is in the task state store while the first upload is still in flight (a worker lost
    then would leave them recorded, to be reconnected to), and the first's start is recorded too.
    """
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=4)
    big = noise_image(tmp_path / "big.png", 1000)  # about 3 MB: held on the link until the test lets it go
    small = [make_image(f"small-{n}.png", f"Small {n}") for n in range(3)]
    assert all(image.stat().st_size < big.stat().st_size // 20 for image in small)
    doc2x.configure(upload_bandwidth=100_000)  # a small image in well under a second, the big one in 30 s
    images = [big, *small]
    store = StateStore()
    log = Log()

    def uid_of(image):
        value = recorded_images(store.get).get(sha256_of(image.read_bytes()))
        return value.get("uid") if isinstance(value, dict) else None

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(batch(store, log=log).submit, [ImageSource.of(str(image)) for image in images])
        try:
            recorded_early = wait_until(
                lambda: all(uid_of(image) for image in small) and [uid_of(image) for image in small],
                timeout=20,  # well before the big upload could arrive
                message="the small images' uids recorded while the big upload is in flight",
            )
            # The batch is still running: the big upload has not arrived, and only its start is recorded.
            assert not running.done()
            assert doc2x.stats()["uploads_in_flight"] == 1
            assert recorded_images(store.get)[sha256_of(big.read_bytes())]["started"] is True
            assert uid_of(big) is None
        finally:
            doc2x.configure(upload_bandwidth=0)  # the big upload's body arrives at once
        jobs = running.result(timeout=60)
    assert [job["source"] for job in jobs] == [str(image) for image in images]
    assert [job["uid"] for job in jobs[1:]] == recorded_early
    recorded = {value["source"]: value["uid"] for value in recorded_images(store.get).values()}
    assert recorded == {job["source"]: job["uid"] for job in jobs}
    assert all(key.startswith(STATE_LOG_PREFIX) for key in store.values)
    finished = [line for line in log.lines if re.match(r"Doc2X: \d+/4 submitted", line)]
    assert finished[-1] == "Doc2X: 4/4 submitted"


def test_duplicates_share_one_upload_side_by_side(doc2x, make_image, monkeypatch):
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=4)
    doc2x.configure(upload_seconds=0.3)
    one, two = make_image(title="One"), make_image(title="Two")
    jobs = batch().submit([ImageSource.of(str(path)) for path in (one, two, one, one, two)])
    assert [job["uid"] for job in jobs][2:] == [jobs[0]["uid"], jobs[0]["uid"], jobs[1]["uid"]]
    assert [job["source"] for job in jobs] == [str(one), str(two), str(one), str(one), str(two)]
    stats = doc2x.stats()
    assert (stats["requests"]["submit"], stats["billed_total"]) == (2, 2)


def test_an_empty_quota_stops_the_queued_uploads_and_the_ones_in_flight_end_cleanly(
    doc2x, make_image, monkeypatch
):
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=3)
    doc2x.configure(quota=4, upload_seconds=0.2)
    store = StateStore()
    with pytest.raises(Doc2XQuotaError):
        batch(store).submit([ImageSource.of(str(make_image())) for _ in range(20)])
    stats = doc2x.stats()
    assert stats["billed_total"] == 4
    assert stats["requests"]["submit"] <= 4 + 3  # the last in flight when the quota ran out, no more
    uids = [value["uid"] for value in recorded_images(store.get).values() if "uid" in value]
    assert len(uids) == 4  # every billed upload's uid was recorded before the error was raised


def test_a_refused_key_stops_every_queued_upload(doc2x, make_image, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(api_key="sk-revoked", max_concurrent_uploads=2)
    )
    with pytest.raises(Doc2XAuthError):
        batch().submit([ImageSource.of(str(make_image())) for _ in range(12)])
    assert doc2x.stats()["requests"]["submit"] <= 2


def test_a_lost_answer_among_many_is_not_resent_and_is_marked(doc2x, make_image, monkeypatch):
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=3, timeout=1.0)
    doc2x.configure(stall_next=1, stall_seconds=5)
    store = StateStore()
    images = [make_image(title=f"Page {n}") for n in range(5)]
    jobs = batch(store).submit([ImageSource.of(str(image)) for image in images])
    lost = [job for job in jobs if job["status"] == "failed"]
    assert [job["code"] for job in lost] == ["upload_answer_lost"]
    assert doc2x.stats()["requests"]["submit"] == 5  # the lost one was not sent again
    assert sum(bool(value.get("uncertain")) for value in recorded_images(store.get).values()) == 1


def test_an_upload_started_by_a_killed_worker_is_named_possibly_billed_twice(doc2x, make_image):
    """A start recorded without a uid: the worker died mid-upload; the next try says so and submits."""
    image = make_image("interrupted.png", "Interrupted")
    store = StateStore()
    first = batch(store).submit([ImageSource.of(str(image))])
    killed = {"started": True, "source": str(image), "at": 0}  # what a worker killed mid-upload leaves
    store.values = {
        f"{STATE_LOG_PREFIX}0": {"version": 1, "entries": [[sha256_of(image.read_bytes()), killed]]}
    }
    log = Log()
    again = batch(store, log=log).submit([ImageSource.of(str(image))])
    assert again[0]["uid"] != first[0]["uid"]
    (warning,) = [line for line in log.lines if "possibly billed twice" in line]
    assert str(image) in warning


@pytest.mark.parametrize("recorded", [{"uncertain": True}, {"started": True}], ids=["answer-lost", "killed"])
def test_the_synchronous_endpoint_names_an_earlier_unanswered_upload_before_sending_it_again(
    doc2x, make_image, recorded
):
    """``method="sync"`` has nothing to reconnect to, but it never resends silently either."""
    image = make_image("sync-again.png", "Sync Again")
    store = StateStore()
    store.set(STATE_KEY_PREFIX + sha256_of(image.read_bytes()), {**recorded, "source": str(image), "at": 0})
    log = Log()
    (record,) = batch(store, log=log).parse([ImageSource.of(str(image))])
    assert record["markdown"].startswith("# Sync Again")
    (warning,) = [line for line in log.lines if "possibly billed twice" in line]
    assert str(image) in warning
    log = Log()
    batch(StateStore(), log=log).parse([ImageSource.of(str(image))])  # nothing recorded: nothing said
    assert log.lines and not [line for line in log.lines if "possibly billed twice" in line]


def test_the_operators_argument_caps_uploads_in_flight(doc2x, make_image, monkeypatch):
    slow_link(doc2x, monkeypatch, max_concurrent_uploads=8)
    doc2x.configure(upload_seconds=0.3)
    run_deferred(
        parse_operator([make_image() for _ in range(6)], deferrable=True, max_concurrent_uploads=2), {}
    )
    assert doc2x.stats()["max_uploads_in_flight"] == 2


def test_an_upload_reset_before_its_body_arrived_is_retried_and_billed_once(doc2x, tmp_path, monkeypatch):
    """A flaky link cuts the connection mid-body: nothing reached Doc2X, so the upload goes again."""
    big = noise_image(tmp_path / "big-scan.png", 1480)  # about 6.6 MB as PNG
    assert big.stat().st_size < 7 * 1024 * 1024
    slow_link(doc2x, monkeypatch, max_retries=3)
    doc2x.configure(reset_next_uploads=1, reset_after_bytes=65536, upload_bandwidth=2_000_000)
    (job,) = batch().submit([ImageSource.of(str(big))])
    assert job["status"] == "processing" and job["uid"]
    stats = doc2x.stats()
    assert (stats["uploads_reset"], stats["requests"]["submit"], stats["billed_total"]) == (1, 2, 1)


# -- a new try's reconnect asks a garbled status again -------------------------------------------------------


@pytest.fixture
def doc2x_proxy(doc2x, monkeypatch):
    """The fault proxy in front of the local server, as ``doc2x_default``'s host: it can garble answers."""
    with proxied_doc2x(doc2x, monkeypatch) as proxy:
        yield proxy


def first_try_deferred(images, store, output) -> None:
    """The first try uploads the images, records their uids and defers; the worker is then lost."""
    with pytest.raises(TaskDeferred):
        parse_operator(images, deferrable=True, output_path=str(output)).execute({"task_state_store": store})


@pytest.mark.parametrize("kind", ["truncated", "wrong_types", "not_json"])
def test_one_garbled_status_on_reconnect_is_asked_again_and_the_image_is_parsed(
    doc2x, doc2x_proxy, make_image, tmp_path, kind
):
    store = StateStore()
    images = [make_image(title="Asked Again One"), make_image(title="Asked Again Two")]
    output = tmp_path / "out"
    first_try_deferred(images, store, output)
    garbled = doc2x_proxy.malformed("GET", f"^{STATUS_PATH}$", kind, times=1)  # the new try's first status
    records = parse_operator(images, output_path=str(output)).execute({"task_state_store": store})
    assert garbled.hits == 1
    assert [record["source"] for record in records] == [str(image) for image in images]
    recorded = [recorded_images(store.get)[sha256_of(image.read_bytes())]["uid"] for image in images]
    assert [record["uid"] for record in records] == recorded  # the earlier try's jobs, reconnected
    assert sorted(path.read_text().splitlines()[0] for path in output.rglob("*.md")) == [
        "# Asked Again One",
        "# Asked Again Two",
    ]
    assert (doc2x.stats()["billed_total"], doc2x.stats()["max_billed_per_image"]) == (2, 1)  # none again


def test_a_status_that_stays_malformed_on_reconnect_is_asked_a_few_times_then_fails_that_image_alone(
    doc2x, doc2x_proxy, make_image, tmp_path
):
    store = StateStore()
    images = [make_image(title="Kept On Reconnect"), make_image(title="Garbled Each Time")]
    output = tmp_path / "out"
    first_try_deferred(images, store, output)
    uid = recorded_images(store.get)[sha256_of(images[1].read_bytes())]["uid"]
    doc2x_proxy.malformed("GET", f"^{STATUS_PATH}$", "not_json", times=None, query=f"uid={uid}")
    with pytest.raises(Doc2XError) as caught:
        parse_operator(images, output_path=str(output)).execute({"task_state_store": store})
    message = str(caught.value)
    assert "1 of 2 images were not parsed" in message
    assert re.search(rf"- {re.escape(str(images[1]))} \(uid {uid}\): .*\(code protocol_error\)", message), (
        message
    )
    assert len(doc2x_proxy.requests("GET", f"^{STATUS_PATH}$", query=f"uid={uid}")) == FETCH_ATTEMPTS
    assert [path.read_text().splitlines()[0] for path in output.rglob("*.md")] == ["# Kept On Reconnect"]
    assert (doc2x.stats()["billed_total"], doc2x.stats()["max_billed_per_image"]) == (2, 1)


def test_an_upload_after_a_pause_is_not_lost_where_a_middlebox_forgot_the_idle_connection(
    doc2x, doc2x_proxy, make_image, monkeypatch
):
    """A NAT, a load balancer or a server closing idle connections: the pause is the case, not a wait.

    An upload sent on a connection that was dropped meanwhile is lost after its body went out, and
    would be named "may have been billed". Each upload opens its own connection, so the second one
    never meets the forgotten connection.
    """
    use_connection = json.loads(doc2x.connection_json(retry_wait=0.05, retry_wait_max=0.1))
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", json.dumps({**use_connection, "host": doc2x_proxy.url}))
    doc2x_proxy.forget_idle_after = 1.5
    hook = Doc2XHook()
    first = hook.parse_image(make_image(title="Before The Pause"))
    time.sleep(2.0)
    second = hook.parse_image(make_image(title="After The Pause"))
    assert [first.markdown.splitlines()[0], second.markdown.splitlines()[0]] == [
        "# Before The Pause",
        "# After The Pause",
    ]
    assert doc2x.stats()["billed_total"] == 2
    assert [entry.fault for entry in doc2x_proxy.requests("POST")] == [None, None]
