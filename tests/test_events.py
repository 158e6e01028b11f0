"""Jobs cross the trigger boundary typed (:class:`Job`) and in today's compact form, byte for byte."""

from __future__ import annotations

import json

import pytest

from airflow_provider_doc2x.events import (
    MALFORMED,
    STORED,
    Job,
    failed_job,
    job,
    make_event,
    pdf_job,
    queued_job,
)
from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XSubmitUncertainError
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger

SHA = "ab" * 32

JOBS = [
    job("u-1", "/scans/a.png", SHA),
    {**job("u-2", "/scans/b.png", SHA, "success"), STORED: 1},
    {**job("u-3", "/scans/c.png", None), MALFORMED: 2},
    failed_job("/scans/d.png", SHA, Doc2XSubmitUncertainError("lost", uid="u-4")),
    pdf_job("p-1", "/scans/e.png", SHA, page_idx=3, pages=200, uploaded_at=1764000000.04, round_=1),
    {**pdf_job("p-2", "/scans/f.png", SHA, page_idx=0, pages=2, uploaded_at=1764000000.0), "uncertain": 1},
    queued_job("/scans/g.png", SHA, chunk=7, round_=2),
]


@pytest.mark.parametrize("entry", JOBS, ids=lambda entry: entry["source"])
def test_a_job_read_and_written_again_is_the_same_json(entry):
    assert json.dumps(Job.from_json(entry).to_json()) == json.dumps(entry)


def test_the_trigger_keeps_each_job_in_its_compact_form_and_the_event_too():
    trigger = Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=JOBS, poll_interval=1, deadline=0)
    assert json.dumps(trigger.serialize()[1]["jobs"]) == json.dumps(JOBS)
    assert make_event("success", JOBS, "done")["jobs"] == JOBS


def test_what_the_wait_adds_to_a_job_does_not_cross_the_boundary():
    working = {**job("u-1", "/scans/a.png", SHA), "_unit": object(), "status": None}
    assert make_event("timeout", [working], "late")["jobs"] == [job("u-1", "/scans/a.png", SHA)]


@pytest.mark.parametrize(
    "entry",
    [
        {"uid": "u-1", "status": "processing"},  # no source
        {**job("u-1", "/scans/a.png", SHA), "status": ["success"]},
        {**pdf_job("p-1", "/scans/e.png", SHA, page_idx=3, pages=4, uploaded_at=0.0), "page_idx": "3"},
        {**job("u-1", "/scans/a.png", SHA), "lane": "fax"},
        {**job("u-1", "/scans/a.png", SHA), STORED: "yes"},
        "u-1",
    ],
    ids=["no-source", "status-list", "page-text", "lane-unknown", "stored-text", "not-a-dict"],
)
def test_a_malformed_job_is_refused_at_the_boundary_and_named(entry):
    with pytest.raises(Doc2XError, match="malformed job") as refused:
        Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=[entry], poll_interval=1, deadline=0)
    assert any(name in str(refused.value) for name in ("u-1", "p-1", "/scans/"))  # named, so it can be found
