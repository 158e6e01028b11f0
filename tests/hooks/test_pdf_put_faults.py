"""One PDF's PUTs under mixed faults, counted at the local server: the bound holds, a lost answer is never sent again."""

from __future__ import annotations

import asyncio

import pytest

from airflow_provider_doc2x.exceptions import (
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.pdf import submission as pdf_submission
from airflow_provider_doc2x.protocol import pdf as protocol_pdf
from tests.helpers import use_connection


async def test_503_expired_url_503_then_a_lost_answer_stops_at_the_lost_put(lane, two_page_pdf, monkeypatch):
    """Every kind of PUT failure in one submission: the lost answer names the last uid and nothing follows it."""
    use_connection(monkeypatch, lane, max_retries=6, timeout=0.5)
    monkeypatch.setattr(protocol_pdf, "PRESIGNED_URL_LIFETIME", 0.0)  # every failed url is replaced
    uids: list[str] = []

    def script(number: int) -> None:
        # Before PUT ``number`` (after its preupload): what this PUT meets, and the next url's life.
        if number == 1:
            lane.configure(put_fail_next=1, upload_url_ttl=0.001)  # 503; the next url expires at once
        elif number == 2:
            lane.configure(upload_url_ttl=300)  # this PUT: 403 expired
        elif number == 3:
            lane.configure(put_fail_next=1)  # 503 again
        elif number == 4:
            lane.configure(upload_seconds=30)  # sent whole, no answer within the timeout

    async def before_put(upload):
        uids.append(upload.uid)
        await asyncio.to_thread(script, len(uids))

    hook = Doc2XHook()
    pdf = two_page_pdf
    try:
        with pytest.raises(Doc2XSubmitUncertainError) as caught:
            await hook.pdf.asubmit_pdf(
                pdf.path, pages=pdf.page_count, sources=pdf.sources, before_put=before_put
            )
    finally:
        lane.configure(upload_seconds=0)
    assert caught.value.uid == uids[-1]
    stats = lane.stats()
    assert len(uids) == 4
    assert (stats["preuploads"], stats["puts"], stats["puts_failed"], stats["puts_refused"]) == (4, 4, 2, 1)


async def test_a_failing_preupload_between_puts_does_not_stretch_the_bound(lane, two_page_pdf, monkeypatch):
    """503 PUTs, and a preupload answered 503 once in between (retried as an API call): still max_retries + 1 PUTs."""
    use_connection(monkeypatch, lane, max_retries=2)
    monkeypatch.setattr(protocol_pdf, "PRESIGNED_URL_LIFETIME", 0.0)
    lane.configure(put_fail_next=1000)
    seen = []

    async def before_put(upload):
        seen.append(upload.uid)
        if len(seen) == 1:
            await asyncio.to_thread(lane.configure, fail_next=1)  # the next preupload meets a 503 page

    pdf = two_page_pdf
    try:
        with pytest.raises(Doc2XTransientError) as caught:
            await Doc2XHook().pdf.asubmit_pdf(
                pdf.path, pages=pdf.page_count, sources=pdf.sources, before_put=before_put
            )
    finally:
        lane.configure(put_fail_next=0, fail_next=0)
    assert caught.value.code == "upload_failed"
    stats = lane.stats()
    assert (stats["puts"], stats["preuploads"], stats["pdf_tasks"]) == (3, 3, 0)


async def test_aparse_pdf_a_lost_answer_after_a_refusal_is_not_sent_again(lane, two_page_pdf, monkeypatch):
    """Refused for the limits, submitted again, that PUT's answer lost: two PUTs, uncertain, no third."""
    use_connection(monkeypatch, lane, max_retries=4, timeout=0.5)
    lane.configure(max_pages_in_progress=1)  # the two-page PDF is refused
    real_put = pdf_submission.put_file
    calls = []

    async def put_file(*args, **kwargs):
        calls.append(kwargs.get("uid"))
        if len(calls) == 2:
            await asyncio.to_thread(lane.configure, upload_seconds=30, max_pages_in_progress=None)
        return await real_put(*args, **kwargs)

    monkeypatch.setattr(pdf_submission, "put_file", put_file)
    pdf = two_page_pdf
    try:
        with pytest.raises(Doc2XSubmitUncertainError) as caught:
            await Doc2XHook().pdf.aparse_pdf(
                pdf.path, pages=pdf.page_count, sources=pdf.sources, poll_interval=0.02
            )
    finally:
        lane.configure(upload_seconds=0)
    assert caught.value.uid == calls[-1]
    assert lane.stats()["puts"] == 2


async def test_aparse_pdf_with_no_retries_submits_a_refused_pdf_once(lane, two_page_pdf, monkeypatch):
    use_connection(monkeypatch, lane, max_retries=0)
    lane.configure(max_pages_in_progress=1)
    pdf = two_page_pdf
    with pytest.raises(Doc2XRateLimitError):
        await Doc2XHook().pdf.aparse_pdf(
            pdf.path, pages=pdf.page_count, sources=pdf.sources, poll_interval=0.02
        )
    stats = lane.stats()
    assert (stats["puts"], stats["pdf_tasks"]) == (1, 1)


async def test_aput_pdf_on_a_given_url_stays_on_it_within_the_bound(lane, two_page_pdf, monkeypatch):
    """The step-by-step call: 503s on a caller's url are retried on it, never a preupload of its own."""
    use_connection(monkeypatch, lane, max_retries=3)
    hook = Doc2XHook()
    upload = await hook.pdf.apreupload()
    lane.configure(put_fail_next=1000)
    try:
        with pytest.raises(Doc2XTransientError) as caught:
            await hook.pdf.aput_pdf(upload.url, two_page_pdf.path, uid=upload.uid, issued_at=upload.issued_at)
    finally:
        lane.configure(put_fail_next=0)
    assert caught.value.code == "upload_failed"
    stats = lane.stats()
    assert (stats["puts"], stats["preuploads"]) == (4, 1)
