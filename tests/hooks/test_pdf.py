"""The hook's PDF API (the bulk lane) against the local server over real HTTP: images packed, uploaded, parsed, exported."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
import zipfile

import pytest
from PIL import Image

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import (
    Doc2XInputError,
    Doc2XJobNotFoundError,
    Doc2XProtocolError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.pdf import submission as pdf_submission
from airflow_provider_doc2x.pdf.packing import pack_images
from airflow_provider_doc2x.protocol import pdf as protocol_pdf
from tests.helpers import async_wait_until, use_connection, wait_until


def big_pdf(tmp_path, megabytes: int = 24):
    """A PDF larger than loopback's socket buffers hold, so that a reset comes while it is being sent."""
    images = []
    for number in range(megabytes // 6 + 1):
        path = tmp_path / f"noise-{number}.png"
        data = hashlib.shake_256(str(number).encode()).digest(1450 * 1450 * 3)
        Image.frombytes("RGB", (1450, 1450), data).save(path, compress_level=0)
        images.append(path)
    result = pack_images(images, pdf_max_bytes=1 << 30)
    assert result.pdfs[0].size > megabytes * 1024 * 1024
    return result


def logged(caplog, capfd) -> list[str]:
    """What was logged: records, and the captured streams (Airflow 3 logs through structlog)."""
    return [record.getMessage() for record in caplog.records] + list(capfd.readouterr())


# -- the way through ---------------------------------------------------------------------------------


async def test_preupload_put_and_status_to_success_map_back_to_the_images(lane, pages):
    paths = pages("First Page", "Second Page", "Third Page")
    with pack_images([*paths, paths[0]]) as result:
        (pdf,) = result.pdfs
        hook = Doc2XHook()
        status = await hook.pdf.aparse_pdf(
            pdf.path, pages=pdf.page_count, sources=pdf.sources, poll_interval=0.05
        )
        assert status.status == protocol.STATUS_SUCCESS and status.result is not None
        by_source = {}
        for page in status.result.pages:
            packed_page = pdf.page(page.page_idx)
            assert packed_page.agrees_with(page.page_width, page.page_height)
            for source in packed_page.sources:
                by_source[source] = page.md
        assert {source: md.splitlines()[0] for source, md in by_source.items()} == {
            str(paths[0]): "# First Page",
            str(paths[1]): "# Second Page",
            str(paths[2]): "# Third Page",
        }
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"], stats["pdf_pages_billed"]) == (1, 1, 1, 3)
    assert stats["billed_total"] == 0  # nothing went through the image API


async def test_the_step_by_step_calls(lane, packed):
    pdf = packed("Step Page")
    hook = Doc2XHook()
    upload = await hook.pdf.apreupload()
    assert "X-Amz-Signature" in upload.url and "X-Amz-Signature" not in repr(upload)
    await hook.pdf.aput_pdf(
        upload.url, pdf.path, uid=upload.uid, sources=pdf.sources, issued_at=upload.issued_at
    )

    async def done():
        return (status := await hook.pdf.aget_pdf_status(upload.uid)).is_terminal and status

    status = None
    deadline = time.monotonic() + 30
    while not status:
        assert time.monotonic() < deadline, "the PDF did not finish within 30 s"
        status = await done()
        await asyncio.sleep(0.02)
    assert status.result.pages[0].md.startswith("# Step Page")
    assert status.result.pages[0].score == 100


def test_status_from_synchronous_code(lane, packed):
    pdf = packed("Sync Page")
    hook = Doc2XHook()
    submission = asyncio.run(hook.pdf.asubmit_pdf(pdf.path, pages=1, sources=pdf.sources))
    status = wait_until(lambda: (s := hook.get_pdf_status(submission.uid)).is_terminal and s)
    assert status.result.markdown.startswith("# Sync Page")


async def test_a_model_is_sent_when_chosen(lane, packed):
    pdf = packed("Model Page")
    hook = Doc2XHook()
    status = await hook.pdf.aparse_pdf(
        pdf.path, pages=pdf.page_count, sources=pdf.sources, model="v3-2026", poll_interval=0.05
    )
    # The local server ends a page that another model than v2 parsed with its mark.
    assert status.result.pages[0].md.startswith("# Model Page")
    assert status.result.pages[0].md.endswith("<!-- model: v3-2026 -->")
    assert (await hook.pdf.apreupload("v2")).uid
    with pytest.raises(Doc2XInputError):
        await hook.pdf.apreupload("v9")
    stats = lane.stats()
    assert stats["preuploads_by_model"] == {"v3-2026": 1, "v2": 1}
    assert stats["pages_by_model"] == {"v3-2026": 1}


# -- the presigned url's rules -------------------------------------------------------------------------


async def test_a_url_that_took_a_pdf_is_not_used_again(lane, packed, monkeypatch):
    pdf = packed("Once Only")
    hook = Doc2XHook()
    upload = await hook.pdf.apreupload()
    await hook.pdf.aput_pdf(upload.url, pdf.path, uid=upload.uid)
    with pytest.raises(Doc2XInputError, match="already took a PDF") as caught:
        await hook.pdf.aput_pdf(upload.url, pdf.path, uid=upload.uid)
    assert caught.value.code == "presigned_url_used"
    assert lane.stats()["puts"] == 1  # refused here, before a byte was sent
    # Another process does not know it: the store refuses it, and that is not retried on the url.
    monkeypatch.setattr(pdf_submission, "_used_urls", pdf_submission._UsedUrls())
    with pytest.raises(Doc2XTransientError) as caught:
        await hook.pdf.aput_pdf(upload.url, pdf.path, uid=upload.uid)
    assert caught.value.code == "presigned_url_refused" and caught.value.http_status == 403
    assert "X-Amz-Signature" not in str(caught.value)
    stats = lane.stats()
    assert (stats["puts"], stats["puts_refused"], stats["pdf_tasks"]) == (2, 1, 1)


async def test_a_put_reset_before_its_body_was_sent_is_retried_on_the_same_url(lane, tmp_path, caplog, capfd):
    with big_pdf(tmp_path) as result:
        (pdf,) = result.pdfs
        lane.configure(reset_next_uploads=1, reset_after_bytes=65536)
        caplog.set_level(logging.WARNING)
        submission = await Doc2XHook().pdf.asubmit_pdf(pdf.path, pages=pdf.page_count, sources=pdf.sources)
    stats = lane.stats()
    assert (stats["uploads_reset"], stats["preuploads"], stats["puts"], stats["pdf_tasks"]) == (1, 1, 2, 1)
    assert submission.uid
    texts = logged(caplog, capfd)
    assert any("on the same url" in text for text in texts)
    assert not [text for text in texts if "X-Amz-Signature" in text]


async def test_a_put_the_store_failed_is_retried_on_the_same_url(lane, packed):
    lane.configure(put_fail_next=2)
    pdf = packed("Unlucky Page")
    await Doc2XHook().pdf.asubmit_pdf(pdf.path, pages=1)
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["puts_failed"], stats["pdf_tasks"]) == (1, 3, 2, 1)


async def test_an_expired_url_needs_a_new_preupload(lane, packed):
    pdf = packed("Late Page")
    hook = Doc2XHook()
    lane.configure(upload_url_ttl=0.001)
    upload = await hook.pdf.apreupload()
    lane.configure(upload_url_ttl=300)
    with pytest.raises(Doc2XTransientError) as caught:
        await hook.pdf.aput_pdf(upload.url, pdf.path, uid=upload.uid)
    assert caught.value.code == "presigned_url_refused"
    assert lane.stats()["puts"] == 1  # not sent again on that url
    submission = await hook.pdf.asubmit_pdf(pdf.path, pages=1)
    assert submission.uid != upload.uid


async def test_a_url_too_old_to_retry_is_replaced_by_a_new_preupload(lane, packed, monkeypatch):
    """A PUT that failed on a url near the end of its life is not sent on it again: preupload, then PUT."""
    monkeypatch.setattr(protocol_pdf, "PRESIGNED_URL_LIFETIME", 0.0)  # read by Doc2XPreupload.is_young
    lane.configure(put_fail_next=1)
    pdf = packed("Old Url Page")
    await Doc2XHook().pdf.asubmit_pdf(pdf.path, pages=1)
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["puts_failed"], stats["pdf_tasks"]) == (2, 2, 1, 1)


async def test_urls_that_always_expire_give_up_after_the_retries(lane, packed, monkeypatch):
    use_connection(monkeypatch, lane, max_retries=2)
    lane.configure(upload_url_ttl=0.001)
    pdf = packed("Never Page")
    with pytest.raises(Doc2XTransientError) as caught:
        await Doc2XHook().pdf.asubmit_pdf(pdf.path, pages=1)
    assert caught.value.code == "presigned_url_refused"
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"]) == (3, 3, 0)


async def test_a_lost_put_answer_is_uncertain_and_not_sent_again(lane, packed, monkeypatch):
    use_connection(monkeypatch, lane, timeout=0.5)
    lane.configure(upload_seconds=30)  # the small PDF is all sent; the store holds its answer back
    pdf = packed("Lost Answer", "Other Image")
    with pytest.raises(Doc2XSubmitUncertainError) as caught:
        await Doc2XHook().pdf.asubmit_pdf(pdf.path, pages=pdf.page_count, sources=pdf.sources)
    message = str(caught.value)
    assert str(pdf.path) in message and all(source in message for source in pdf.sources)
    assert "X-Amz-Signature" not in message
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"]) == (1, 1)


# -- status ---------------------------------------------------------------------------------------------


async def test_an_unknown_uid_during_the_pickup_delay_is_awaiting_pickup(lane, packed):
    lane.configure(pickup_delay=60, pickup_status="not_found")
    pdf = packed("Queued Page")
    hook = Doc2XHook()
    submission = await hook.pdf.asubmit_pdf(pdf.path, pages=1)
    status = await hook.pdf.aget_pdf_status(submission.uid, uploaded_at=submission.uploaded_at)
    assert (status.status, status.progress, status.is_terminal) == (protocol.STATUS_AWAITING_PICKUP, 0, False)
    with pytest.raises(Doc2XJobNotFoundError):  # without the upload's time, not found is what it says
        await hook.pdf.aget_pdf_status(submission.uid)
    with pytest.raises(Doc2XJobNotFoundError):  # long after the upload too
        await hook.pdf.aget_pdf_status(submission.uid, uploaded_at=submission.uploaded_at - 3600)
    lane.configure(pickup_delay=0)
    status = await hook.pdf.await_pdf(submission, poll_interval=0.02)
    assert status.status == protocol.STATUS_SUCCESS


@pytest.mark.parametrize("shape", ["status", "envelope"])
@pytest.mark.parametrize("reason", ["parse_error", "parse_timeout", "parse_file_lock"])
async def test_a_failed_pdf_raises_its_class_in_both_shapes(lane, packed, shape, reason):
    lane.configure(pdf_fail_next=1, pdf_fail_reason=reason, pdf_failure_shape=shape)
    pdf = packed("Doomed Page")
    with pytest.raises(protocol.error_class_for(reason)) as caught:
        await Doc2XHook().pdf.aparse_pdf(pdf.path, pages=1, poll_interval=0.02)
    assert caught.value.code == reason and caught.value.uid
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_tasks_failed"]) == (1, 1)  # not submitted again


# -- bounds and limits ------------------------------------------------------------------------------------


async def test_pdfs_in_flight_stay_within_the_connection_bound(lane, packed, monkeypatch):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    lane.configure(pdf_page_seconds=0.05)
    pdfs = [packed(f"Bounded {n}", f"Bounded {n} again") for n in range(3)]
    hook = Doc2XHook()
    statuses = await asyncio.gather(
        *(hook.pdf.aparse_pdf(pdf.path, pages=pdf.page_count, poll_interval=0.02) for pdf in pdfs)
    )
    assert all(status.status == protocol.STATUS_SUCCESS for status in statuses)
    stats = lane.stats()
    assert (stats["max_pdf_tasks_in_progress"], stats["pdf_tasks"]) == (1, 3)


async def test_pages_in_flight_stay_within_the_connection_bound(lane, packed, monkeypatch):
    use_connection(monkeypatch, lane, pdf_max_pages_in_flight=3)
    lane.configure(pdf_page_seconds=0.05)
    pdfs = [packed(f"Pages {n}", f"Pages {n} b") for n in range(3)]
    hook = Doc2XHook()
    await asyncio.gather(*(hook.pdf.aparse_pdf(pdf.path, pages=2, poll_interval=0.02) for pdf in pdfs))
    assert lane.stats()["max_pages_in_progress"] <= 3
    with pytest.raises(Doc2XInputError, match="pdf_max_pages_in_flight"):
        await hook.pdf.asubmit_pdf(pdfs[0].path, pages=4)


@pytest.mark.parametrize("shape", ["status", "envelope"])
@pytest.mark.parametrize(
    ("knob", "code"),
    [
        ({"max_tasks_in_progress": 1}, "parse_task_limit_exceeded"),
        ({"max_pages_in_progress": 2}, "parse_concurrency_limit"),
    ],
)
async def test_limit_codes_are_backed_off_and_submitted_again(
    lane, packed, monkeypatch, caplog, capfd, shape, knob, code
):
    """Two PDFs where the service takes one at a time: the other is refused in status, then sent again."""
    use_connection(monkeypatch, lane, retry_wait=0.1, retry_wait_max=0.3, max_retries=30)
    lane.configure(pdf_page_seconds=600, pdf_failure_shape=shape, **knob)  # the first holds its place
    pdfs = [packed(f"Limited {n}", f"Limited {n} b") for n in range(2)]
    hook = Doc2XHook()
    caplog.set_level(logging.WARNING)
    both = asyncio.gather(*(hook.pdf.aparse_pdf(pdf.path, pages=2, poll_interval=0.02) for pdf in pdfs))
    await async_wait_until(lambda: lane.stats()["pdf_tasks_failed"] >= 1, message="a refusal for the limit")
    lane.configure(pdf_page_seconds=0)  # the first finishes; the other gets its turn when sent again
    statuses = await both
    assert all(status.status == protocol.STATUS_SUCCESS for status in statuses)
    stats = lane.stats()
    assert stats["pdf_tasks_failed"] >= 1 and stats["pdf_tasks"] == 2 + stats["pdf_tasks_failed"]
    assert stats["pdf_pages_billed"] == 4
    warnings = [text for text in logged(caplog, capfd) if "for its limits" in text]
    assert warnings and code in warnings[0] and "billed is not documented" in warnings[0]


async def test_a_limit_that_never_clears_gives_up_after_the_retries(lane, packed, monkeypatch):
    use_connection(monkeypatch, lane, max_retries=2)
    lane.configure(max_pages_in_progress=1)  # a PDF of 2 pages can never be taken
    pdf = packed("Too Big 1", "Too Big 2")
    with pytest.raises(Doc2XRateLimitError) as caught:
        await Doc2XHook().pdf.aparse_pdf(pdf.path, pages=2, poll_interval=0.02)
    assert caught.value.code == "parse_concurrency_limit"
    assert lane.stats()["pdf_tasks"] == 3


async def test_a_rate_limited_preupload_is_retried_after_its_retry_after(lane, packed):
    lane.configure(preupload_rate_limit=1, rate_window=0.3)
    pdfs = [packed(f"Rated {n}") for n in range(3)]
    hook = Doc2XHook()
    for pdf in pdfs:
        await hook.pdf.asubmit_pdf(pdf.path, pages=1)
    stats = lane.stats()
    assert stats["preuploads"] == 3 and stats["preuploads_rate_limited"] >= 1 and stats["pdf_tasks"] == 3


# -- export and downloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("escaped", [False, True])
async def test_export_zip_is_downloaded(lane, packed, escaped):
    lane.configure(export_url_escaped=escaped, export_seconds=0.1)
    pdf = packed("Exported One", "Exported Two")
    hook = Doc2XHook()
    status = await hook.pdf.aparse_pdf(pdf.path, pages=2, poll_interval=0.02)
    url = await hook.pdf.aexport_markdown(status.uid, "report", poll_interval=0.02)
    assert "convert_md_" in url and "\\u0026" not in url
    archive = zipfile.ZipFile(io.BytesIO(await hook.pdf.adownload(url)))
    (markdown_name,) = [name for name in archive.namelist() if name.endswith(".md")]
    text = archive.read(markdown_name).decode()
    assert "# Exported One" in text and "# Exported Two" in text
    assert lane.stats()["exports"] == 1


async def test_a_download_over_its_cap_is_refused(lane, packed):
    pdf = packed("Capped Page")
    hook = Doc2XHook()
    status = await hook.pdf.aparse_pdf(pdf.path, pages=1, poll_interval=0.02)
    url = await hook.pdf.aexport_markdown(status.uid, poll_interval=0.02)
    with pytest.raises(Doc2XProtocolError, match="cap of 64 bytes"):
        await hook.pdf.adownload(url, cap=64)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/objects/x/convert_md_none.zip",
        "http://cdn.noedgeai.com/x.jpg",
        "http://127.0.0.1:9/local/s3/objects/x/convert_md_none.zip",
        "file:///etc/passwd",
    ],
)
async def test_downloads_from_other_hosts_are_refused_before_sending(lane, url):
    with pytest.raises(Doc2XInputError) as caught:
        await Doc2XHook().pdf.adownload(url)
    assert caught.value.code == "download_refused"


async def test_an_export_of_an_unfinished_parse_is_an_error(lane, packed):
    lane.configure(pickup_delay=60)
    pdf = packed("Not Yet")
    hook = Doc2XHook()
    submission = await hook.pdf.asubmit_pdf(pdf.path, pages=1)
    with pytest.raises(Doc2XProtocolError, match="convert_not_ready"):
        await hook.pdf.aexport_markdown(submission.uid)
