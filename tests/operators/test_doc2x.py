"""The operator against the local server: deferral, resume, batches, failures and never paying twice."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XInputError,
    Doc2XPermanentError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.journal import recorded_images
from airflow_provider_doc2x.operators.doc2x import STATE_KEY_PREFIX, Doc2XImageParseOperator
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from tests.helpers import API_KEY, REPO, StateStore, dags_test, parse_operator, run_deferred


def test_deferrable_submits_records_and_defers_with_the_right_trigger(doc2x, make_image):
    store = StateStore()
    images = [make_image(title="Alpha"), make_image(title="Beta")]
    with pytest.raises(TaskDeferred) as deferred:
        parse_operator(images, deferrable=True, timeout=120).execute({"task_state_store": store})
    trigger = deferred.value.trigger
    assert isinstance(trigger, Doc2XImageParseTrigger)
    assert deferred.value.method_name == "execute_complete"
    _, kwargs = trigger.serialize()
    assert kwargs["doc2x_conn_id"] == "doc2x_default"
    assert [job["source"] for job in kwargs["jobs"]] == [str(image) for image in images]
    assert API_KEY not in json.dumps(kwargs)
    recorded = {value["uid"] for value in recorded_images(store.get).values()}
    assert recorded == {job["uid"] for job in kwargs["jobs"]}
    assert all(key.startswith(STATE_KEY_PREFIX) for key in store.values)


@pytest.mark.parametrize("deferrable", [True, False])
def test_records_in_input_order(doc2x, make_image, deferrable):
    images = [
        make_image("b.png", "Second Page"),
        make_image("a.jpg", "First Page"),
        make_image("c.png", "Third"),
    ]
    op = parse_operator(images, deferrable=deferrable)
    records = run_deferred(op, {}) if deferrable else op.execute({})
    assert [record["source"] for record in records] == [str(image) for image in images]
    assert records[0]["markdown"].startswith("# Second Page")
    assert records[1]["pages"][0]["page_width"] == 400
    assert set(records[0]) >= {"source", "uid", "pages", "markdown"}
    # Each page names its number in its source (an image is page 1 of itself).
    assert set(records[0]["pages"][0]) == {"page", "page_idx", "page_width", "page_height", "md"}
    assert records[0]["pages"][0]["page"] == 1


def test_the_same_image_twice_is_paid_once(doc2x, make_image):
    image = make_image(title="Twice")
    records = parse_operator([image, image]).execute({})
    assert records[0]["uid"] == records[1]["uid"]
    assert doc2x.stats()["billed_total"] == 1


def test_synchronous_method(doc2x, make_image):
    records = parse_operator([make_image(title="Sync One")], method="sync").execute({})
    assert records[0]["markdown"].startswith("# Sync One")
    assert doc2x.stats()["requests"] == {"parse": 1}


def test_a_failed_image_fails_the_task_after_the_others_finished(doc2x, make_image):
    bad = make_image("bad.png", "Bad", paragraphs=["<!-- doc2x-fail: parse_error -->"])
    good = [make_image("good-1.png", "Good"), make_image("good-2.png", "Good Too")]
    with pytest.raises(Doc2XError) as caught:
        run_deferred(parse_operator([good[0], bad, good[1]], deferrable=True), {})
    message = str(caught.value)
    assert message.startswith("1 of 3 images were not parsed")
    assert str(bad) in message and "parse_error" in message
    assert str(good[0]) not in message
    assert not isinstance(caught.value, Doc2XPermanentError)  # the vendor says parse_error may pass


def test_invalid_inputs_are_all_named_and_nothing_is_sent(doc2x, make_image, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    missing = tmp_path / "missing.jpg"
    with pytest.raises(Doc2XInputError) as caught:
        parse_operator([make_image(), text, missing]).execute({})
    assert "2 of 3 files cannot be sent" in str(caught.value)
    assert str(text) in str(caught.value) and str(missing) in str(caught.value)
    assert doc2x.stats()["requests"] == {}


def test_a_refused_key_stops_the_batch_at_once(doc2x, make_image, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(api_key="sk-nope", max_concurrent_uploads=3)
    )
    with pytest.raises(Doc2XAuthError):
        parse_operator([make_image() for _ in range(20)]).execute({})
    # The uploads already in flight end (refused too); none of the 17 still queued starts.
    assert 1 <= doc2x.stats()["requests"]["submit"] <= 3
    assert doc2x.stats()["billed_total"] == 0


def test_a_batch_runs_at_the_key_limit_without_429(doc2x, make_image, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(rate_limit_images=4, rate_limit_window=0.3)
    )
    doc2x.configure(rate_limit=4, rate_window=0.3, processing_time=0.1)
    images = [make_image(title=f"Batch {n}") for n in range(14)]
    records = run_deferred(parse_operator(images, deferrable=True), {})
    assert len(records) == 14
    stats = doc2x.stats()
    assert (stats["rate_limited"], stats["billed_total"], stats["max_billed_per_image"]) == (0, 14, 1)


def test_a_second_try_reconnects_instead_of_paying_again(doc2x, make_image):
    doc2x.configure(processing_time=30)
    store = StateStore()
    images = [make_image(title="Once"), make_image(title="Only Once")]
    with pytest.raises(Doc2XError, match="still processing"):
        run_deferred(parse_operator(images, deferrable=True, timeout=0.2), {"task_state_store": store})
    doc2x.configure(processing_time=0)  # the jobs finish; a new try of the task starts
    records = parse_operator(images, deferrable=True).execute(
        {"task_state_store": store}
    )  # done: no deferral
    assert [record["markdown"].split("\n")[0] for record in records] == ["# Once", "# Only Once"]
    stats = doc2x.stats()
    assert stats["billed_total"] == 2
    assert stats["max_billed_per_image"] == 1


def test_a_finished_job_is_reused_without_deferring(doc2x, make_image):
    store = StateStore()
    image = make_image(title="Done Before")
    first = run_deferred(parse_operator([image], deferrable=True), {"task_state_store": store})
    again = parse_operator([image], deferrable=True).execute({"task_state_store": store})  # no TaskDeferred
    assert again[0]["uid"] == first[0]["uid"]
    assert doc2x.stats()["billed_total"] == 1


def test_an_expired_recorded_job_is_submitted_again(doc2x, make_image):
    store = StateStore()
    image = make_image(title="Expired")
    run_deferred(parse_operator([image], deferrable=True), {"task_state_store": store})
    doc2x.reset()  # the server forgot the job, as Doc2X does after 24 h
    records = run_deferred(parse_operator([image], deferrable=True), {"task_state_store": store})
    assert records[0]["markdown"].startswith("# Expired")
    assert doc2x.stats()["billed_total"] == 1


def logged(caplog, capfd) -> list[str]:
    """What was logged, line by line: records, and the captured streams (Airflow 3 logs through structlog)."""
    lines = [record.getMessage() for record in caplog.records]
    for stream in capfd.readouterr():
        lines.extend(stream.splitlines())
    caplog.clear()
    return lines


def test_a_lost_upload_answer_fails_the_image_and_the_next_try_resubmits_it(
    doc2x, make_image, monkeypatch, caplog, capfd
):
    """The next try uploads the image again, and says in the log that it is possibly billed twice."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(timeout=0.5))
    doc2x.configure(stall_next=1, stall_seconds=3)
    store = StateStore()
    image = make_image("lost.png", "Lost")
    with pytest.raises(Doc2XError) as caught:
        run_deferred(parse_operator([image], deferrable=True), {"task_state_store": store})
    assert str(image) in str(caught.value) and "may have billed" in str(caught.value)
    assert next(iter(recorded_images(store.get).values()))["uncertain"] is True
    first_try = logged(caplog, capfd)
    assert any("Doc2X: 1/1 submitted" in line for line in first_try)  # the task's log is seen here
    assert not any("is possibly billed twice" in line for line in first_try)  # nothing was resubmitted yet

    records = run_deferred(parse_operator([image], deferrable=True), {"task_state_store": store})
    assert records[0]["markdown"].startswith("# Lost")
    assert doc2x.stats()["requests"]["submit"] == 2
    warned = [line for line in logged(caplog, capfd) if "is possibly billed twice" in line]
    assert warned, "the next try resubmitted the image without a warning"
    assert all(str(image) in line and "lost its answer" in line for line in warned), warned


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (None, "without an event"),
        ({"status": "weird", "jobs": []}, "does not know"),
        ({"status": "success"}, "does not know"),
        ({"status": "success", "jobs": [{"uid": "x"}]}, "malformed job"),
    ],
)
def test_execute_complete_refuses_missing_and_unknown_events(doc2x, event, match):
    with pytest.raises(Doc2XError, match=match):
        parse_operator(["x.png"]).execute_complete({}, event)


def test_execute_complete_reports_error_and_timeout_events(doc2x):
    op = parse_operator(["x.png"])
    with pytest.raises(Doc2XAuthError, match="refused"):
        op.execute_complete(
            {}, {"status": "error", "code": "unauthorized", "message": "key refused", "jobs": []}
        )
    timeout = {
        "status": "timeout",
        "message": "1 of 1 still processing",
        "jobs": [{"uid": "u-7", "source": "slow.png", "status": "processing"}],
    }
    with pytest.raises(Doc2XError, match=r"slow.png \(uid u-7\): still processing"):
        op.execute_complete({}, timeout)


def test_templated_fields_and_method():
    assert set(Doc2XImageParseOperator.template_fields) == {"image_path", "output_path", "doc2x_conn_id"}
    with pytest.raises(ValueError, match="method"):
        Doc2XImageParseOperator(task_id="x", image_path="a.png", method="fast")  # type: ignore[arg-type]


def test_mapped_over_images_each_task_gets_its_own(doc2x, airflow_db, make_image):
    """``.partial().expand()``: one task per image list, the conn id rendered from a template."""
    images = [
        make_image(title="Mapped One"),
        make_image(title="Mapped Two"),
        make_image(title="Mapped Three"),
    ]
    chunks = [[str(images[0]), str(images[1])], [str(images[2])]]
    output = dags_test("doc2x_mapped_images", {"chunks": chunks}, doc2x, dags_folder=REPO / "tests" / "dags")
    assert "Doc2X parsed 2 images" in output and "Doc2X parsed 1 images" in output
    stats = doc2x.stats()
    assert (stats["billed_total"], stats["max_billed_per_image"]) == (3, 1)


def test_an_unreachable_status_on_reconnect_fails_the_try_instead_of_paying_again(
    doc2x, make_image, monkeypatch
):
    store = StateStore()
    image = make_image(title="Hold On")
    with pytest.raises(TaskDeferred):
        parse_operator([image], deferrable=True).execute({"task_state_store": store})
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_retries=1))
    doc2x.configure(fail_next=10)
    with pytest.raises(Doc2XTransientError):
        parse_operator([image], deferrable=True).execute({"task_state_store": store})
    assert doc2x.stats()["requests"]["submit"] == 1


# -- a job whose answers stay malformed fails alone --------------------------------------------------


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_titles(output) -> list[str]:
    """The first line of every Markdown file written under ``output``."""
    return sorted(path.read_text().splitlines()[0] for path in output.rglob("*.md"))


def named_malformed(image) -> re.Pattern:
    """How the task's error names an image that failed alone on a malformed answer: its file, uid and code."""
    return re.compile(rf"- {re.escape(str(image))} \(uid [0-9a-f-]{{36}}\): .*\(code protocol_error\)")


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_job_whose_status_stays_malformed_fails_alone_and_the_others_are_stored(
    doc2x, make_image, tmp_path, deferrable
):
    images = [make_image(title=f"Paid {n}") for n in range(4)]
    doc2x.configure(malformed_status=[sha256_of(images[2])])
    output = tmp_path / "out"
    op = parse_operator(images, deferrable=deferrable, output_path=str(output))
    with pytest.raises(Doc2XError) as caught:
        run_deferred(op, {}) if deferrable else op.execute({})
    message = str(caught.value)
    assert "1 of 4 images were not parsed" in message
    assert named_malformed(images[2]).search(message), message
    assert stored_titles(output) == ["# Paid 0", "# Paid 1", "# Paid 3"]
    assert (doc2x.stats()["billed_total"], doc2x.stats()["max_billed_per_image"]) == (4, 1)


def test_a_malformed_status_on_reconnect_fails_that_image_alone_on_every_try(doc2x, make_image, tmp_path):
    store = StateStore()
    images = [make_image(title="Reconnected"), make_image(title="Garbled On Reconnect")]
    output = tmp_path / "out"
    with pytest.raises(TaskDeferred):
        parse_operator(images, deferrable=True, output_path=str(output)).execute({"task_state_store": store})
    doc2x.configure(malformed_status=[sha256_of(images[1])])
    for _ in range(2):  # each new try reconnects to the recorded jobs (and waits in the worker)
        with pytest.raises(Doc2XError) as caught:
            parse_operator(images, output_path=str(output)).execute({"task_state_store": store})
        message = str(caught.value)
        assert "1 of 2 images were not parsed" in message
        assert named_malformed(images[1]).search(message), message
    assert stored_titles(output) == ["# Reconnected"]
    assert (doc2x.stats()["billed_total"], doc2x.stats()["max_billed_per_image"]) == (2, 1)
