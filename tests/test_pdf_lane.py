"""
The PDF lane (``method="pdf"``) end to end against the local server: images packed into PDFs,
mapped back by ``page_idx``, bounded in flight, failures in both shapes tried again, figures kept,
and never paid twice across tries.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
import time

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import LANE_PDF, STATUS_QUEUED, make_event, pdf_job, queued_job
from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XQuotaError
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.journal import STATE_PDF_LOG_PREFIX
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.pdf.packing import pack_images
from airflow_provider_doc2x.pdf.results import PAGE_MAP_MISMATCH, PdfFigures
from airflow_provider_doc2x.protocol import pdf as protocol_pdf
from airflow_provider_doc2x.records import FETCH_ATTEMPTS, records_from_event
from airflow_provider_doc2x.storage.objects import storage_path
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from tests.helpers import (
    StateStore,
    TaskInstance,
    first_event,
    parse_operator,
    run_to_the_end,
    use_connection,
    wait_until,
)
from tests.helpers.s3 import proxied_doc2x
from tests.helpers.storage import CountingFS, use_for_memory


@pytest.fixture
def pages(tmp_path):
    """Write JPEG pages with known titles (the local engine answers their Markdown); return their paths."""

    def write(*titles: str, size=(400, 300), **page):
        paths = []
        for title in titles:
            path = tmp_path / f"{title.replace(' ', '-')}.jpg"
            path.write_bytes(render(Page(title=title, **page), fmt="JPEG", size=size))
            paths.append(path)
        return paths

    return write


def pdf_operator(images, **kwargs):
    kwargs.setdefault("method", "pdf")
    return parse_operator(images, **kwargs)


def titles(records):
    return [record["markdown"].splitlines()[0] for record in records]


def logged(caplog, capfd) -> str:
    """What was logged: records, and the captured streams (Airflow 3 logs through structlog)."""
    return "\n".join([record.getMessage() for record in caplog.records] + list(capfd.readouterr()))


# -- the way through ----------------------------------------------------------------------------------


@pytest.mark.parametrize("deferrable", [True, False])
def test_records_map_back_to_the_images_by_page_idx(lane, pages, tmp_path, deferrable):
    """Two sizes make two PDFs; a duplicate is one page; records come in input order with their page."""
    small = pages("Alpha", "Beta", "Gamma")
    tall = pages("Tall One", "Tall Two", size=(300, 500))
    images = [small[0], tall[0], small[1], small[0], tall[1], small[2]]
    store = StateStore()
    op = pdf_operator(images, deferrable=deferrable)
    records = (
        run_to_the_end(op, {"task_state_store": store})[0]
        if deferrable
        else op.execute({"task_state_store": store})
    )
    assert titles(records) == ["# Alpha", "# Tall One", "# Beta", "# Alpha", "# Tall Two", "# Gamma"]
    assert [record["source"] for record in records] == [str(image) for image in images]
    uids = {record["uid"] for record in records}
    assert len(uids) == 2  # one PDF per size
    by_uid = {uid: sorted(r["page_idx"] for r in records if r["uid"] == uid) for uid in uids}
    assert sorted(by_uid.values()) == [[0, 0, 1, 2], [0, 1]]
    assert records[0]["page_idx"] == records[3]["page_idx"] and records[0]["uid"] == records[3]["uid"]
    assert records[1]["pages"][0]["page_width"] == 300
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"], stats["max_pdf_billed_per_page"]) == (2, 5, 1)
    assert stats["billed_total"] == 0  # nothing through the image API
    # The store holds each PDF's uid and its page map (the sha256 of each page), in order.
    assert set(store.pdfs()) == uids
    for record in records:
        page_map = store.pdfs()[record["uid"]]
        assert page_map["pages"][record["page_idx"]] == record["sha256"]
        assert page_map["state"] == "uploaded"


def test_pdfs_and_pages_in_flight_stay_within_the_bounds_across_deferrals(lane, pages, monkeypatch):
    use_connection(monkeypatch, lane, pdf_max_in_flight=2, pdf_max_pages_in_flight=4)
    lane.configure(pdf_page_seconds=0.05)
    images = pages(*(f"Bounded {n}" for n in range(12)))
    op = pdf_operator(images, deferrable=True, pdf_max_pages=2)
    records, deferrals = run_to_the_end(op, {})
    assert titles(records) == [f"# Bounded {n}" for n in range(12)]
    stats = lane.stats()
    assert stats["pdf_tasks"] == 6
    assert stats["max_pdf_tasks_in_progress"] <= 2 and stats["max_pages_in_progress"] <= 4
    assert deferrals >= 3  # the task came back to submit the next PDFs


def test_the_worker_s_own_wait_submits_the_next_pdfs_too(lane, pages, monkeypatch):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = pages(*(f"Serial {n}" for n in range(5)))
    records = pdf_operator(images, pdf_max_pages=2).execute({})
    assert titles(records) == [f"# Serial {n}" for n in range(5)]
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["max_pdf_tasks_in_progress"]) == (3, 1)


def test_an_image_rewritten_around_the_plan_is_packed_only_as_its_own_bytes_allow(lane, pages, monkeypatch):
    """A CMYK JPEG when read, an RGB one of the same size while planned, CMYK again when packed: image lane."""
    from airflow_provider_doc2x.pdf_lane import lane as lane_module

    alpha, beta = pages("Alpha", "Beta")
    rgb = beta.read_bytes()
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(rgb)).convert("CMYK").save(cmyk, "JPEG")
    beta.write_bytes(cmyk.getvalue())
    planning = lane_module.plan_pdfs

    def plan_while_rewritten(*args, **kwargs):
        beta.write_bytes(rgb)
        try:
            return planning(*args, **kwargs)
        finally:
            beta.write_bytes(cmyk.getvalue())

    monkeypatch.setattr(lane_module, "plan_pdfs", plan_while_rewritten)
    records, _ = run_to_the_end(
        pdf_operator([alpha, beta], deferrable=True), {"task_state_store": StateStore()}
    )
    assert titles(records) == ["# Alpha", "# Beta"]
    assert "page_idx" in records[0] and "page_idx" not in records[1]  # Beta went through the image lane
    stats = lane.stats()
    assert (stats["pdf_pages_billed"], stats["billed_total"]) == (1, 1)  # each page billed once


def test_trigger_kwargs_and_events_stay_small_and_free_of_server_words(lane):
    """A task of 10,000 images: one small job per image, fixed texts only."""
    jobs = [
        pdf_job(
            "0194f6a2-7d1c-7b4e-9a51-3c2d1e0f9a8b",
            f"s3://bucket/scans/2026/11/page-{n:05d}.jpg",
            f"{n:064x}",
            page_idx=n % 200,
            pages=200,
            uploaded_at=time.time(),
        )
        for n in range(5000)
    ] + [
        queued_job(f"s3://bucket/scans/2026/11/q-{n:05d}.jpg", f"{n:064x}", chunk=n // 200)
        for n in range(5000)
    ]
    trigger = Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=jobs, poll_interval=1, deadline=0)
    size = len(json.dumps(trigger.serialize()[1]))
    assert size / len(jobs) < 300
    event = make_event("progress", jobs, "1/2 done")
    assert len(json.dumps(event)) / len(jobs) < 300


# -- waiting: pickup, failure shapes, limits, the page map -------------------------------------------------


@pytest.mark.parametrize("pickup_status", ["processing", "not_found"])
def test_the_pickup_delay_is_waited_out_whatever_status_says(lane, pages, pickup_status):
    lane.configure(pickup_delay=0.5, pickup_status=pickup_status)
    records, _ = run_to_the_end(pdf_operator(pages("Picked Up", "Later"), deferrable=True), {})
    assert titles(records) == ["# Picked Up", "# Later"]
    assert lane.stats()["pdf_tasks"] == 1


@pytest.mark.parametrize("shape", ["status", "envelope"])
@pytest.mark.parametrize("reason", ["parse_error", "parse_timeout"])
def test_a_failed_pdf_is_packed_again_into_smaller_pdfs(lane, pages, caplog, capfd, shape, reason):
    caplog.set_level(logging.WARNING)
    lane.configure(pdf_fail_next=1, pdf_fail_reason=reason, pdf_failure_shape=shape)
    images = pages(*(f"Again {n}" for n in range(16)))
    records, _ = run_to_the_end(pdf_operator(images, deferrable=True), {})
    assert titles(records) == [f"# Again {n}" for n in range(16)]
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_tasks_failed"]) == (5, 1)  # 16 pages failed; 4 PDFs of 4
    assert {record["pages"][0]["page_idx"] for record in records} == {0, 1, 2, 3}
    text = logged(caplog, capfd)
    assert reason in text and "in PDFs of at most 4 pages" in text and "may be billed again" in text


@pytest.mark.parametrize("shape", ["status", "envelope"])
def test_a_small_failed_pdf_goes_through_the_image_lane(lane, pages, caplog, capfd, shape):
    caplog.set_level(logging.WARNING)
    lane.configure(pdf_fail_next=1, pdf_fail_reason="parse_error", pdf_failure_shape=shape)
    records = pdf_operator(pages("Small One", "Small Two", "Small Three")).execute({})
    assert titles(records) == ["# Small One", "# Small Two", "# Small Three"]
    assert "page_idx" not in records[0]  # parsed by the image API
    stats = lane.stats()
    assert (stats["pdf_tasks_failed"], stats["billed_total"], stats["max_billed_per_image"]) == (1, 3, 1)
    assert "through the image lane" in logged(caplog, capfd)


def test_a_bad_page_is_narrowed_down_and_named_with_its_code(lane, pages, tmp_path):
    """Doc2X fails a whole PDF for one page: every other image ends parsed, the bad one named."""
    good = pages(*(f"Fine {n}" for n in range(15)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(
        render(
            Page(title="Bad", paragraphs=["<!-- doc2x-fail: parse_error -->"]), fmt="JPEG", size=(400, 300)
        )
    )
    images = [*good[:7], bad, *good[7:]]
    with pytest.raises(Doc2XError) as caught:
        run_to_the_end(pdf_operator(images, deferrable=True), {})
    message = str(caught.value)
    assert message.startswith("1 of 16 images were not parsed")
    assert f"- {bad} (uid " in message and "(code parse_error)" in message
    stats = lane.stats()
    assert stats["pdf_tasks_failed"] == 2  # the PDF of 16, then its PDF of 4; then the image lane
    assert stats["billed"] and stats["requests"]["submit"] == 4


@pytest.mark.parametrize("shape", ["status", "envelope"])
def test_a_pdf_refused_for_the_limits_is_backed_off_and_submitted_again(
    lane, pages, monkeypatch, caplog, capfd, shape
):
    caplog.set_level(logging.INFO)
    use_connection(monkeypatch, lane, pdf_max_in_flight=3, retry_wait=0.1, retry_wait_max=0.2)
    lane.configure(max_tasks_in_progress=1, pdf_page_seconds=0.2, pdf_failure_shape=shape)
    images = pages(*(f"Limited {n}" for n in range(6)))
    records, _ = run_to_the_end(pdf_operator(images, deferrable=True, pdf_max_pages=2), {})
    assert titles(records) == [f"# Limited {n}" for n in range(6)]
    stats = lane.stats()
    assert stats["pdf_tasks_failed"] >= 1 and stats["pdf_tasks"] == 3 + stats["pdf_tasks_failed"]
    assert stats["pdf_pages_billed"] == 6
    text = logged(caplog, capfd)
    assert "parse_task_limit_exceeded" in text and "for its limits" in text


def test_a_result_with_another_page_count_is_a_protocol_error_naming_the_pdf_and_its_images(lane, pages):
    images = pages("Mapped One", "Mapped Two")
    with pack_images(images) as packed:
        (pdf,) = packed.pdfs
        submission = asyncio.run(Doc2XHook().pdf.asubmit_pdf(pdf.path, pages=2))
    # The jobs say the PDF had 3 pages: Doc2X's 2 pages do not map back to them.
    jobs = [
        pdf_job(
            submission.uid, str(image), page.sha256, page_idx=page.page_idx, pages=3, uploaded_at=time.time()
        )
        for image, page in zip(images, pdf.pages, strict=True)
    ]
    trigger = Doc2XImageParseTrigger(
        doc2x_conn_id="doc2x_default", jobs=jobs, poll_interval=0.05, deadline=time.time() + 30
    )
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "failed"
    assert {(job["code"], job["message"]) for job in event["jobs"]} == {("protocol_error", PAGE_MAP_MISMATCH)}
    with pytest.raises(Doc2XError) as caught:
        records_from_event(Doc2XHook(), event)
    message = str(caught.value)
    assert f"PDF uid {submission.uid}, page 0" in message and f"PDF uid {submission.uid}, page 1" in message
    assert all(str(image) in message for image in images)


# -- uploads: the presigned url, lost answers ---------------------------------------------------------------


def test_a_failed_put_is_sent_again_on_its_url_and_an_old_url_is_replaced(lane, pages, monkeypatch):
    monkeypatch.setattr(protocol_pdf, "PRESIGNED_URL_LIFETIME", 0.0)  # every url too old to send on again
    lane.configure(put_fail_next=1)
    store = StateStore()
    images = pages("Url One", "Url Two")
    records = pdf_operator(images).execute({"task_state_store": store})
    assert titles(records) == ["# Url One", "# Url Two"]
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["puts_failed"], stats["pdf_tasks"]) == (2, 2, 1, 1)
    first, second = store.pdfs()  # both recorded before their PUT
    assert store.pdfs()[first]["state"] == "put"  # it never landed
    assert store.pdfs()[second]["state"] == "uploaded"
    # A new try reconnects to the PDF that landed: nothing is sent again.
    again = pdf_operator(images).execute({"task_state_store": store})
    assert [record["uid"] for record in again] == [second, second]
    assert (lane.stats()["preuploads"], lane.stats()["pdf_pages_billed"]) == (2, 2)


def test_a_lost_put_answer_is_polled_by_its_uid_and_never_sent_again(lane, pages, monkeypatch):
    use_connection(monkeypatch, lane, timeout=0.5)
    lane.configure(upload_seconds=1.0)  # the PDF lands after the client stopped waiting for the answer
    records = pdf_operator(pages("Lost Then Found", "Also Found")).execute({})
    assert titles(records) == ["# Lost Then Found", "# Also Found"]
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"], stats["pdf_pages_billed"]) == (1, 1, 1, 2)


def test_a_lost_put_that_never_landed_is_named_then_resubmitted_by_the_next_try(
    lane, pages, monkeypatch, caplog, capfd
):
    caplog.set_level(logging.WARNING)
    # pdf.submission reads the grace through the package, so it is set there.
    monkeypatch.setattr(protocol, "PDF_PICKUP_GRACE_SECONDS", 0.5)
    lane.configure(reset_next_uploads=1, reset_after_bytes=1 << 30)  # the whole body arrives, then a reset
    store = StateStore()
    images = pages("Never Landed")
    with pytest.raises(Doc2XError) as caught:
        run_to_the_end(pdf_operator(images, deferrable=True), {"task_state_store": store})
    assert str(images[0]) in str(caught.value) and "upload_answer_lost" in str(caught.value)
    (recorded,) = store.pdfs().values()
    assert recorded["state"] == "uncertain"
    assert lane.stats()["puts"] == 1  # not sent again within the try
    # The next try asks Doc2X first; past the pickup delay, an unknown uid did not land.
    wait_until(lambda: time.time() > recorded["uploaded_at"] + protocol.PDF_PICKUP_GRACE_SECONDS)
    records, _ = run_to_the_end(pdf_operator(images, deferrable=True), {"task_state_store": store})
    assert titles(records) == ["# Never Landed"]
    assert "possibly billed twice" in logged(caplog, capfd)
    assert lane.stats()["pdf_pages_billed"] == 1


# -- a new try: reconnect, pay nothing again ------------------------------------------------------------------


def test_a_first_try_that_airflow_runs_again_from_its_start_pays_nothing_again(lane, pages):
    """Airflow 3.3 can lose a deferred first try's resume in a race and run its ``execute`` again, same try number."""
    store = StateStore()
    images = pages("Again One", "Again Two", "Again Three")
    with pytest.raises(TaskDeferred):
        pdf_operator(images, deferrable=True).execute(
            {"task_state_store": store, "ti": TaskInstance(try_number=1)}
        )
    again = {"task_state_store": store, "ti": TaskInstance(try_number=1)}
    records, _ = run_to_the_end(pdf_operator(images, deferrable=True), again)
    assert titles(records) == ["# Again One", "# Again Two", "# Again Three"]
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"]) == (1, 3)


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_new_try_reconnects_to_the_recorded_pdfs_and_pays_nothing_again(lane, pages, deferrable):
    lane.configure(pdf_page_seconds=30)
    store = StateStore()
    images = pages("Recorded One", "Recorded Two", "Recorded Three")
    with pytest.raises(Doc2XError, match="still processing"):
        run_to_the_end(pdf_operator(images, deferrable=True, timeout=0.3), {"task_state_store": store})
    lane.configure(pdf_page_seconds=0)
    wait_until(lambda: lane.stats()["pdf_tasks_in_progress"] == 0, message="the PDF to finish")
    op = pdf_operator(images, deferrable=deferrable)
    records = (
        run_to_the_end(op, {"task_state_store": store})[0]
        if deferrable
        else op.execute({"task_state_store": store})
    )
    assert titles(records) == ["# Recorded One", "# Recorded Two", "# Recorded Three"]
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"], stats["pdf_pages_billed"]) == (1, 1, 1, 3)


def test_a_new_try_after_a_failed_pdf_goes_on_with_the_fallback(lane, pages):
    """The first try fails while its PDF failed; the next reconnects, sees the failure, and retries its images."""
    lane.configure(pdf_fail_next=1, pdf_fail_reason="parse_timeout", pdf_page_seconds=30)
    store = StateStore()
    images = pages("Retry One", "Retry Two")
    with pytest.raises(TaskDeferred):
        pdf_operator(images, deferrable=True).execute({"task_state_store": store})
    lane.configure(pdf_page_seconds=0)
    wait_until(lambda: lane.stats()["pdf_tasks_failed"] == 1, message="the PDF to fail")
    records = pdf_operator(images).execute({"task_state_store": store})  # a new try, in the worker
    assert titles(records) == ["# Retry One", "# Retry Two"]
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["billed_total"]) == (1, 2)  # the images went through the image lane


def test_an_empty_quota_stops_the_lane_with_its_error(lane, pages):
    lane.configure(quota=0)
    with pytest.raises(Doc2XQuotaError):
        pdf_operator(pages("No Quota")).execute({})


# -- storage, figures, cache ------------------------------------------------------------------------------


def figure_page(tmp_path, name: str = "report.jpg"):
    path = tmp_path / name
    path.write_bytes(
        render(
            Page(title="Quarterly Report", paragraphs=["The figure below."], figure=True),
            fmt="JPEG",
            size=(600, 600),
        )
    )
    return path


@pytest.mark.parametrize("cdn_ttl", [86400, 0])
def test_figures_are_stored_from_the_export_and_links_point_at_them(lane, pages, tmp_path, cdn_ttl):
    """Stored figures come from the PDF's export, so they do not depend on the CDN's short-lived links."""
    lane.configure(cdn_ttl=cdn_ttl)
    images = [figure_page(tmp_path), *pages("Plain Page", size=(600, 600))]
    lake = tmp_path / "lake"
    records = pdf_operator(images, output_path=str(lake)).execute({})
    report, plain = records
    assert (report["page_idx"], plain["page_idx"]) == (0, 1) and report["uid"] == plain["uid"]
    (figure,) = report["figure_paths"]
    name = figure.rsplit("/", 1)[-1]
    assert re.fullmatch(rf"{report['uid']}_0_80_\d+_360_240_0\.jpg", name)  # the page and the crop's box
    assert Image.open(io.BytesIO(storage_path(figure).read_bytes())).size == (360, 240)
    markdown = storage_path(report["markdown_path"]).read_text()
    assert markdown.startswith("# Quarterly Report")
    assert f'<img src="images/{name}"/>' in markdown
    assert "/local/cdn/" not in markdown
    assert plain["figure_paths"] == []
    assert storage_path(plain["markdown_path"]).read_text().startswith("# Plain Page")
    sidecar = json.loads(storage_path(report["sidecar_path"]).read_text())
    assert (sidecar["lane"], sidecar["page_idx"], sidecar["uid"]) == (LANE_PDF, 0, report["uid"])
    assert lane.stats()["exports"] == 1
    # Stored: a second run reuses every result and submits nothing.
    again = pdf_operator(images, output_path=str(lake)).execute({})
    assert [record["cached"] for record in again] == [True, True]
    assert lane.stats()["preuploads"] == 1


def test_xcom_records_keep_doc2x_s_figure_links(lane, tmp_path):
    (record,) = pdf_operator([figure_page(tmp_path)]).execute({})
    assert (
        record["has_figures"] is True and f"{lane.url}/local/cdn/{record['uid']}_0.jpg?" in record["markdown"]
    )
    assert lane.stats()["exports"] == 0


async def parsed_page(tmp_path):
    path = figure_page(tmp_path)
    with pack_images([path]) as packed:
        status = await Doc2XHook().pdf.aparse_pdf(packed.pdfs[0].path, pages=1, poll_interval=0.02)
    return status.result.pages[0], status.uid


async def test_without_an_export_each_linked_figure_is_downloaded(lane, tmp_path, monkeypatch):
    use_connection(monkeypatch, lane, max_retries=0)
    page, uid = await parsed_page(tmp_path)
    lane.configure(fail_next=1)  # the export's request fails; the CDN is not the API
    markdown, figures = await PdfFigures(Doc2XHook().pdf, uid).page(page)
    (path,) = figures.files
    assert re.fullmatch(rf"images/{uid}_0_80_\d+_360_240_0\.jpg", path) and f'src="{path}"' in markdown
    assert any("export" in warning and "failed" in warning for warning in figures.warnings)
    assert lane.stats()["exports"] == 0


async def test_a_figure_neither_exported_nor_downloadable_keeps_its_link(lane, tmp_path, monkeypatch):
    use_connection(monkeypatch, lane, max_retries=0)
    page, uid = await parsed_page(tmp_path)
    lane.configure(fail_next=1, cdn_ttl=0)
    markdown, figures = await PdfFigures(Doc2XHook().pdf, uid).page(page)
    assert figures.files == {} and markdown == page.md
    assert any("could not be downloaded" in warning for warning in figures.warnings)


async def test_figures_are_downloaded_only_from_the_vendor_s_hosts_and_the_connection_s(lane, tmp_path):
    _, uid = await parsed_page(tmp_path)
    foreign = protocol.Doc2XPage(
        0, 600, 600, '<img src="https://evil.example/x.jpg?x=1&amp;y=2&amp;w=3&amp;h=4&amp;r=0"/>'
    )
    markdown, figures = await PdfFigures(Doc2XHook().pdf, uid).page(foreign)
    assert markdown == foreign.md and figures.files == {}
    assert any("evil.example" in warning and "download_refused" in warning for warning in figures.warnings)


def test_an_image_a_pdf_cannot_hold_losslessly_goes_through_the_image_lane(
    lane, pages, tmp_path, caplog, capfd
):
    caplog.set_level(logging.INFO)
    alpha = tmp_path / "alpha.png"
    Image.new("RGBA", (400, 300), (255, 255, 255, 128)).save(alpha)
    records = pdf_operator([*pages("Packed Page"), alpha]).execute({})
    assert records[0]["markdown"].startswith("# Packed Page") and "page_idx" in records[0]
    assert "page_idx" not in records[1]
    stats = lane.stats()
    assert (stats["pdf_pages_billed"], stats["billed_total"]) == (1, 1)
    assert "alpha channel" in logged(caplog, capfd)


def test_operator_arguments_are_checked():
    with pytest.raises(ValueError, match="pdf_model"):
        pdf_operator(["a.jpg"], pdf_model="v9")
    with pytest.raises(ValueError, match="pdf_max_pages"):
        pdf_operator(["a.jpg"], pdf_max_pages=1001)
    assert pdf_operator(["a.jpg"]).timeout == 1800 and parse_operator(["a.jpg"]).timeout == 600
    assert STATUS_QUEUED == "not-submitted"  # never a status Doc2X could answer (not code-shaped)


@pytest.fixture
def counted():
    """``memory://`` counting storage calls and bytes read by path (a plain one put back afterwards)."""
    yield use_for_memory(CountingFS)
    use_for_memory(MemoryFileSystem)


def test_incremental_with_the_pdf_lane_reads_nothing_unchanged_on_the_next_run(lane, pages, counted):
    def inbox(*titles: str) -> list[str]:
        for path in pages(*titles):
            counted.pipe_file(f"/inbox/{path.name}", path.read_bytes())
        return [f"memory://inbox/{title.replace(' ', '-')}.jpg" for title in titles]

    images = inbox("Daily One", "Daily Two")
    first = pdf_operator(images, output_path="memory://lake", incremental=True).execute({})
    assert [record["cached"] for record in first] == [False, False]
    assert counted.read_of("/inbox/") > 0  # the control: reads of the sources are counted
    CountingFS.reset()
    added = inbox("Daily Three")
    again = pdf_operator([*images, *added], output_path="memory://lake", incremental=True).execute({})
    assert [record["cached"] for record in again] == [True, True, False]
    assert [record["markdown_path"] for record in again[:2]] == [record["markdown_path"] for record in first]
    # The unchanged sources were looked at (metadata), never opened nor read; the new one was read.
    for image in images:
        assert (counted.opened_of(image_key(image)), counted.read_of(image_key(image))) == (0, 0), image
    assert counted.read_of(image_key(added[0])) > 0
    stats = lane.stats()
    assert (stats["preuploads"], stats["pdf_pages_billed"], stats["max_pdf_billed_per_page"]) == (2, 3, 1)


def image_key(uri: str) -> str:
    """A ``memory://`` URI as the filesystem names it."""
    return MemoryFileSystem._strip_protocol(uri)


def test_a_model_is_asked_for_when_chosen(lane, pages, tmp_path):
    (record,) = pdf_operator(
        pages("Model Page"), pdf_model="v3-2026", output_path=str(tmp_path / "out")
    ).execute({})
    markdown = storage_path(record["markdown_path"]).read_text()
    assert markdown.startswith("# Model Page")
    # The local server ends a page that another model than v2 parsed with its mark.
    assert markdown.rstrip().endswith("<!-- model: v3-2026 -->")
    assert json.loads(storage_path(record["sidecar_path"]).read_text())["model"] == "v3-2026"
    stats = lane.stats()
    assert (stats["preuploads_by_model"], stats["pages_by_model"]) == ({"v3-2026": 1}, {"v3-2026": 1})


def test_images_in_object_storage_are_copied_privately_and_packed(lane, pages):
    import fsspec

    try:
        from airflow.sdk.io import attach
    except ImportError:  # Airflow 2
        from airflow.io.store import attach
    fs = fsspec.filesystem("memory")
    attach("memory", fs=fs)
    try:
        for path in pages("Remote One", "Remote Two"):
            fs.pipe_file(f"/pdf-lane/{path.name}", path.read_bytes())
        uris = ["memory://pdf-lane/Remote-One.jpg", "memory://pdf-lane/Remote-Two.jpg"]
        records, _ = run_to_the_end(pdf_operator(uris, deferrable=True), {})
        assert titles(records) == ["# Remote One", "# Remote Two"]
        assert [record["source"] for record in records] == uris
        assert lane.stats()["pdf_tasks"] == 1
    finally:
        fs.rm("/pdf-lane", recursive=True)


# -- a PDF whose answers stay malformed fails alone; finished results are stored as they come ----------------


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_titles(output) -> list[str]:
    """The first line of every Markdown file written under ``output``."""
    return sorted(path.read_text().splitlines()[0] for path in output.rglob("*.md"))


def named_malformed(image) -> re.Pattern:
    """How the task's error names a PDF-lane image whose PDF failed on a malformed answer."""
    return re.compile(rf"- {re.escape(str(image))} \(PDF uid [^,]+, page \d+\): .*\(code protocol_error\)")


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_pdf_whose_result_names_a_page_twice_fails_alone_and_the_other_pdf_is_stored(
    lane, pages, tmp_path, deferrable
):
    small = pages("Twice One", "Twice Two")
    tall = pages("Tall Kept One", "Tall Kept Two", size=(300, 500))  # another size: another PDF
    lane.configure(malformed_status=[sha256_of(small[1])])  # its PDF's result gives page_idx 0 twice
    output = tmp_path / "out"
    op = pdf_operator([*small, *tall], deferrable=deferrable, output_path=str(output))
    with pytest.raises(Doc2XError) as caught:
        run_to_the_end(op, {}) if deferrable else op.execute({})
    message = str(caught.value)
    assert "2 of 4 images were not parsed" in message
    for image in small:
        assert named_malformed(image).search(message), message
    assert stored_titles(output) == ["# Tall Kept One", "# Tall Kept Two"]
    assert lane.stats()["pdf_tasks"] == 2


def test_a_malformed_pdf_status_on_reconnect_fails_its_images_alone_on_every_try(lane, pages, tmp_path):
    lane.configure(pdf_page_seconds=30)
    store = StateStore()
    small = pages("Again One", "Again Two")
    tall = pages("Again Tall", size=(300, 500))
    images = [*small, *tall]
    output = tmp_path / "out"
    with pytest.raises(TaskDeferred):
        pdf_operator(images, deferrable=True, output_path=str(output)).execute({"task_state_store": store})
    lane.configure(pdf_page_seconds=0, malformed_status=[sha256_of(small[0])])
    wait_until(lambda: lane.stats()["pdf_tasks_in_progress"] == 0, message="the PDFs to finish")
    for _ in range(2):  # each new try reconnects to the recorded PDFs
        with pytest.raises(Doc2XError) as caught:
            pdf_operator(images, output_path=str(output)).execute({"task_state_store": store})
        message = str(caught.value)
        assert "2 of 3 images were not parsed" in message
        for image in small:
            assert named_malformed(image).search(message), message
    assert stored_titles(output) == ["# Again Tall"]
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"]) == (2, 2, 2)  # nothing sent again


@pytest.fixture
def doc2x_proxy(lane, monkeypatch):
    """The fault proxy in front of the local server, as ``doc2x_default``'s host: it can garble answers."""
    with proxied_doc2x(lane, monkeypatch) as proxy:
        yield proxy


def recorded_pdfs_finished(lane, images, store, output) -> None:
    """A first try submits the PDFs, records them and defers; then they finish while no try runs."""
    lane.configure(pdf_page_seconds=30)
    with pytest.raises(TaskDeferred):
        pdf_operator(images, deferrable=True, output_path=str(output)).execute({"task_state_store": store})
    lane.configure(pdf_page_seconds=0)
    wait_until(lambda: lane.stats()["pdf_tasks_in_progress"] == 0, message="the PDFs to finish")


@pytest.mark.parametrize("kind", ["truncated", "wrong_types", "not_json"])
def test_one_garbled_pdf_status_on_reconnect_is_asked_again_and_its_images_are_parsed(
    lane, doc2x_proxy, pages, tmp_path, kind
):
    store = StateStore()
    images = [*pages("Asked One", "Asked Two"), *pages("Asked Tall", size=(300, 500))]  # two PDFs
    output = tmp_path / "out"
    recorded_pdfs_finished(lane, images, store, output)
    garbled = doc2x_proxy.malformed("GET", f"^{protocol.PDF_STATUS_PATH}$", kind, times=1)
    records = pdf_operator(images, output_path=str(output)).execute({"task_state_store": store})
    assert garbled.hits == 1  # the new try's first status call, on reconnect
    assert [record["source"] for record in records] == [str(image) for image in images]
    assert {record["uid"] for record in records} == set(store.pdfs())
    assert stored_titles(output) == ["# Asked One", "# Asked Tall", "# Asked Two"]
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"], stats["pdf_pages_billed"]) == (2, 2, 2, 3)


def test_a_pdf_status_that_stays_malformed_on_reconnect_is_asked_a_few_times_then_fails_its_images_alone(
    lane, doc2x_proxy, pages, tmp_path
):
    store = StateStore()
    small = pages("Stays One", "Stays Two")
    images = [*small, *pages("Stays Tall", size=(300, 500))]
    output = tmp_path / "out"
    recorded_pdfs_finished(lane, images, store, output)
    (uid,) = [uid for uid, record in store.pdfs().items() if sha256_of(small[0]) in record["pages"]]
    doc2x_proxy.malformed("GET", f"^{protocol.PDF_STATUS_PATH}$", "truncated", times=None, query=f"uid={uid}")
    with pytest.raises(Doc2XError) as caught:
        pdf_operator(images, output_path=str(output)).execute({"task_state_store": store})
    message = str(caught.value)
    assert "2 of 3 images were not parsed" in message
    for image in small:
        assert named_malformed(image).search(message), message
    assert (
        len(doc2x_proxy.requests("GET", f"^{protocol.PDF_STATUS_PATH}$", query=f"uid={uid}"))
        == FETCH_ATTEMPTS
    )
    assert stored_titles(output) == ["# Stays Tall"]
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"]) == (2, 2, 2)  # nothing sent again


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_resume_stores_the_results_of_finished_pdfs_before_the_end(
    lane, pages, tmp_path, monkeypatch, overwrite
):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = pages("Early One", "Later Two", "Later Three")
    output = tmp_path / "out"
    op = pdf_operator(images, deferrable=True, pdf_max_pages=1, output_path=str(output), overwrite=overwrite)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    event = asyncio.run(first_event(deferred.value.trigger))
    assert event["status"] == "progress"  # the first PDF finished; more to submit
    with pytest.raises(TaskDeferred) as deferred:
        op.execute_complete({}, event)
    assert stored_titles(output) == ["# Early One"]  # stored at this resume, not at the task's end
    # The first PDF's result goes bad at Doc2X (as one past its 24 hours does): the end needs it no more.
    lane.configure(malformed_status=[sha256_of(images[0])])
    trigger = deferred.value.trigger
    while True:
        event = asyncio.run(first_event(trigger))
        try:
            records = op.execute_complete({}, event)
            break
        except TaskDeferred as again:
            trigger = again.trigger
    assert [record["source"] for record in records] == [str(image) for image in images]
    assert [record["cached"] for record in records] == [False] * 3  # parsed by this task, none reused
    assert stored_titles(output) == ["# Early One", "# Later Three", "# Later Two"]
    assert lane.stats()["pdf_pages_billed"] == 3


def test_a_pdf_tried_again_keeps_when_its_put_started_in_its_record(lane, pages, monkeypatch):
    """The next try counts the pickup delay of a PUT never answered from its start, not from a later rewrite."""
    use_connection(monkeypatch, lane, max_retries=0)
    lane.configure(put_fail_next=10)  # every PUT fails: the PDF's images are tried again
    writes: list[tuple[str, dict]] = []

    class Recording(StateStore):
        def set(self, key, value, **kwargs):
            writes.append((key, json.loads(json.dumps(value))))
            super().set(key, value, **kwargs)

    store = Recording()
    images = pages("Put Started Once")
    records = pdf_operator(images).execute({"task_state_store": store})
    assert titles(records) == ["# Put Started Once"]  # through the image lane in the end
    (uid,) = store.pdfs()
    written = [
        record
        for key, batch in writes
        if key.startswith(STATE_PDF_LOG_PREFIX)
        for entry_uid, record in batch["entries"]
        if entry_uid == uid
    ]
    assert [value.get("fallback") for value in written] == [None, "image"]
    assert {value["state"] for value in written} == {"put"}
    assert written[1]["at"] == written[0]["at"]


def test_an_image_deleted_after_its_check_is_named_and_nothing_is_sent(lane, pages, monkeypatch):
    """Checked when the task started, deleted before the plan reads it: a clear error, nothing uploaded."""
    from airflow_provider_doc2x.exceptions import Doc2XInputError
    from airflow_provider_doc2x.pdf_lane.staging import PdfStaging

    alpha, beta = pages("Alpha", "Beta")
    reading = PdfStaging.read_all

    def read_after_a_delete(self, sources):
        beta.unlink()
        return reading(self, sources)

    monkeypatch.setattr(PdfStaging, "read_all", read_after_a_delete)
    with pytest.raises(Doc2XInputError, match=re.escape(str(beta))) as caught:
        run_to_the_end(pdf_operator([alpha, beta], deferrable=True), {"task_state_store": StateStore()})
    assert "checked when the task started" in str(caught.value)
    stats = lane.stats()
    assert stats["billed_total"] == 0 and stats["pdf_pages_billed"] == 0
