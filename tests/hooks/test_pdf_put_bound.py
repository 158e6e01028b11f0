"""One PDF is PUT at most ``max_retries + 1`` times, whichever way its PUTs fail, counted at the local server."""

from __future__ import annotations

import pytest

from airflow_provider_doc2x.exceptions import Doc2XRateLimitError, Doc2XTransientError
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from tests.helpers import use_connection

MAX_RETRIES = 2


@pytest.fixture(autouse=True)
def bounded(lane, monkeypatch):
    """A connection of ``MAX_RETRIES`` retries to the local server."""
    use_connection(monkeypatch, lane, max_retries=MAX_RETRIES)


async def submit(hook, pdf):
    return await hook.pdf.asubmit_pdf(pdf.path, pages=pdf.page_count, sources=pdf.sources)


async def parse(hook, pdf):
    return await hook.pdf.aparse_pdf(pdf.path, pages=pdf.page_count, sources=pdf.sources, poll_interval=0.02)


@pytest.mark.parametrize("call", [submit, parse], ids=["asubmit_pdf", "aparse_pdf"])
async def test_a_put_that_always_fails_is_sent_max_retries_plus_one_times_then_names_the_pdf(
    lane, two_page_pdf, call
):
    lane.configure(put_fail_next=1000)  # the store answers 503 to every PUT
    with pytest.raises(Doc2XTransientError) as caught:
        await call(Doc2XHook(), two_page_pdf)
    assert caught.value.code == "upload_failed"
    assert caught.value.source == str(two_page_pdf.path) and str(two_page_pdf.path) in str(caught.value)
    stats = lane.stats()
    assert (stats["puts"], stats["puts_failed"], stats["pdf_tasks"]) == (MAX_RETRIES + 1, MAX_RETRIES + 1, 0)
    assert stats["preuploads"] == 1  # the url stayed young: every PUT went to it


async def test_a_failed_put_and_refusals_for_the_limits_share_one_bound(lane, two_page_pdf):
    """A PUT that failed, then tasks refused for the key's limits: together, ``max_retries + 1`` PUTs."""
    lane.configure(put_fail_next=1, max_pages_in_progress=1)  # a PDF of two pages is never taken
    with pytest.raises(Doc2XRateLimitError) as caught:
        await parse(Doc2XHook(), two_page_pdf)
    assert caught.value.code == "parse_concurrency_limit"
    stats = lane.stats()
    assert (stats["puts"], stats["puts_failed"], stats["pdf_tasks"]) == (MAX_RETRIES + 1, 1, MAX_RETRIES)


async def test_a_status_call_throttled_past_its_retries_never_submits_the_pdf_again(lane, two_page_pdf):
    """A 429 on the status call is the gateway's, not a refusal of the task: the PDF, maybe parsing, is PUT once."""
    lane.configure(throttle_status_next=1000, processing_time=0)
    with pytest.raises(Doc2XRateLimitError) as caught:
        await parse(Doc2XHook(), two_page_pdf)
    assert caught.value.http_status == 429
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"]) == (1, 1, 1)
