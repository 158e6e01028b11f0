"""
A job that finished, but whose result Doc2X no longer knows when the task fetches it (expired past
its 24 hours, or lost), fails alone: named with its file, its uid and ``result_expired``, retryably,
while the other results, paid for, are stored or returned. Both lanes; the PDF lane's resumes store
finished PDFs as they go, and a PDF gone at such a resume does not stop the images still queued.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import RESULT_EXPIRED
from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XPermanentError
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.pdf import submission as pdf_submission
from tests.helpers import StateStore, first_event, parse_operator
from tests.helpers.s3 import proxied_doc2x

NOT_FOUND = json.dumps({"code": "parse_status_not_found", "msg": "uid not found"}).encode()


def stored_titles(output) -> list[str]:
    return sorted(path.read_text().splitlines()[0] for path in output.rglob("*.md"))


def assert_named_alone(error: Doc2XError, source, uid: str) -> None:
    """The task's error names that image, its uid and its code, and Airflow may retry it."""
    assert not isinstance(error, Doc2XPermanentError), "a retry is the only way to the lost result"
    (line,) = [line for line in str(error).splitlines() if str(source) in line]
    assert uid in line and f"code {RESULT_EXPIRED}" in line, line
    assert str(error).startswith("1 of "), str(error)


@pytest.mark.parametrize("output", [True, False], ids=["output_path", "xcom"])
def test_a_result_doc2x_no_longer_knows_fails_that_image_alone_and_the_others_are_kept(
    doc2x, monkeypatch, make_image, tmp_path, output
):
    images = [make_image(title=f"Paid {number}") for number in range(4)]
    out = tmp_path / "out"
    kwargs = {"output_path": str(out)} if output else {}
    store = StateStore()
    with proxied_doc2x(doc2x, monkeypatch) as proxy:
        op = parse_operator(images, deferrable=True, **kwargs)
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"task_state_store": store})
        event = asyncio.run(first_event(deferred.value.trigger))
        assert event["status"] == "success"
        lost = event["jobs"][2]["uid"]
        proxy.answer("GET", f"^{protocol.STATUS_PATH}$", NOT_FOUND, times=None, query=f"uid={lost}")
        with pytest.raises(Doc2XError) as caught:
            op.execute_complete({"task_state_store": store}, event)
        assert_named_alone(caught.value, images[2], lost)
        if output:
            assert stored_titles(out) == ["# Paid 0", "# Paid 1", "# Paid 3"]
        proxy.clear()  # Doc2X answers again: the next try reconnects to every recorded job
        records = parse_operator(images, deferrable=False, **kwargs).execute({"task_state_store": store})
    assert len(records) == 4
    assert doc2x.stats()["max_billed_per_image"] == 1  # the others' results were never paid twice


def test_a_finished_pdf_gone_at_a_resume_fails_its_images_and_the_queued_ones_go_on(
    doc2x, monkeypatch, tmp_path
):
    doc2x.configure(pickup_delay=0, pdf_page_seconds=0, export_seconds=0)
    monkeypatch.setattr(pdf_submission, "_used_urls", pdf_submission._UsedUrls())
    images = []
    for number in range(4):
        path = tmp_path / f"page-{number}.jpg"
        path.write_bytes(render(Page(title=f"Pdf Page {number}"), fmt="JPEG", size=(400, 300)))
        images.append(path)
    out = tmp_path / "out"
    store = StateStore()
    with proxied_doc2x(doc2x, monkeypatch) as proxy:
        connection = json.loads(doc2x.connection_json(pdf_max_in_flight=1))
        monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", json.dumps({**connection, "host": proxy.url}))
        assert json.loads(os.environ["AIRFLOW_CONN_DOC2X_DEFAULT"])["host"] == proxy.url
        op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=1, output_path=str(out))
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"task_state_store": store})
        event = asyncio.run(first_event(deferred.value.trigger))
        assert event["status"] == "progress", event  # one PDF finished, three images still queued
        (done,) = [job for job in event["jobs"] if job["status"] == protocol.STATUS_SUCCESS]
        proxy.answer(
            "GET", f"^{protocol.PDF_STATUS_PATH}$", NOT_FOUND, times=None, query=f"uid={done['uid']}"
        )
        deferrals = 0

        def resume_until_the_end(event):
            nonlocal deferrals
            while True:
                try:
                    return op.execute_complete({"task_state_store": store}, event)
                except TaskDeferred as again:
                    deferrals += 1
                    event = asyncio.run(first_event(again.trigger))

        with pytest.raises(Doc2XError) as caught:
            resume_until_the_end(event)
    assert deferrals >= 1  # the lane went on to submit the queued images
    assert_named_alone(caught.value, done["source"], done["uid"])
    others = sorted(f"# Pdf Page {number}" for number in range(4) if str(images[number]) != done["source"])
    assert stored_titles(out) == others
    assert doc2x.stats()["pdf_pages_billed"] == 4
