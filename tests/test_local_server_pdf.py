"""The local Doc2X server's PDF API answers as the PDF API notes say (raw HTTP, no provider code in between).

PDFs are made as the bulk lane makes them: images packed losslessly with img2pdf, a JPEG embedded
unchanged (its comment, hence the simple engine's text, survives), a PNG's pixels copied (its text
chunk is lost: the engine answers its pixel line).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import img2pdf
import pytest
from PIL import Image
from pypdf import PdfReader, PdfWriter

from airflow_provider_doc2x.local.samples import Page, render
from tests.helpers import API_KEY, wait_until

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PREUPLOAD = "/api/v2/parse/preupload"
STATUS = "/api/v2/parse/status"
CONVERT = "/api/v2/convert/parse"
CONVERT_RESULT = "/api/v2/convert/parse/result"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def lane(doc2x):
    """The local server, reset, with PDF tasks picked up and parsed at once."""
    doc2x.configure(pickup_delay=0, pdf_page_seconds=0, export_seconds=0)
    return doc2x


def jpeg(title: str, *, size=(400, 300), **page) -> bytes:
    """A JPEG page whose comment holds its Markdown (what the simple engine answers)."""
    return render(Page(title=title, **page), fmt="JPEG", size=size)


def png(title: str, *, size=(400, 300)) -> bytes:
    return render(Page(title=title), fmt="PNG", size=size)


def jpeg_with_text(text: str, size=(300, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "white").save(out, format="JPEG", comment=text.encode())
    return out.getvalue()


def pdf_of(*images: bytes) -> bytes:
    return img2pdf.convert(list(images))


def embedded_text(image: bytes) -> str:
    """The text the simple engine reads from a JPEG: its comment."""
    return Image.open(io.BytesIO(image)).info["comment"].decode().strip()


def pixels_sha256(image: bytes) -> str:
    return hashlib.sha256(Image.open(io.BytesIO(image)).convert("RGB").tobytes()).hexdigest()


def png_page_text(image: bytes) -> str:
    """What the simple engine answers for a PNG page of a PDF (documented in local/pdfdoc.py)."""
    width, height = Image.open(io.BytesIO(image)).size
    return f"Image {width}x{height} (PNG), pixels sha256 {pixels_sha256(image)[:12]}"


def preupload(doc2x, **body) -> httpx.Response:
    return doc2x.client.post(PREUPLOAD, json=body or None, headers=AUTH)


def new_url(doc2x, **body) -> tuple[str, str]:
    answer = preupload(doc2x, **body).json()
    assert answer["code"] == "success", answer
    return answer["data"]["uid"], answer["data"]["url"]


def put(url: str, body: bytes, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
    """PUT as doc2x-mcp does: the raw file, no key (unless ``headers`` add one)."""
    headers = {"Content-Type": "application/pdf", **(headers or {})}
    return httpx.put(url, content=body, headers=headers, timeout=30, **kwargs)


def upload(doc2x, pdf: bytes, **body) -> str:
    uid, url = new_url(doc2x, **body)
    assert put(url, pdf).status_code == 200
    return uid


def status(doc2x, uid: str) -> dict:
    return doc2x.client.get(STATUS, params={"uid": uid}, headers=AUTH).json()


def finished(doc2x, uid: str) -> dict:
    """Poll until the task is no longer processing (or answers an envelope error); return the answer."""

    def done():
        answer = status(doc2x, uid)
        return answer if answer["code"] != "success" or answer["data"]["status"] != "processing" else None

    return wait_until(done, message=f"PDF task {uid} to finish")


def parsed(doc2x, uid: str) -> dict:
    answer = finished(doc2x, uid)
    assert answer["code"] == "success" and answer["data"]["status"] == "success", answer
    return answer["data"]


def xml_code(answer: httpx.Response) -> str:
    assert answer.headers["content-type"].startswith("application/xml")
    return re.search(r"<Code>(\w+)</Code>", answer.text).group(1)


# The happy path


def test_preupload_put_and_status_until_success(lane):
    images = [jpeg("Alpha", paragraphs=["First page."]), png("Beta", size=(320, 240)), jpeg("Gamma")]
    uid, url = new_url(lane)
    assert UUID.fullmatch(uid)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == lane.url
    assert parts.path == f"/local/oss/tmp/{uid}.pdf"
    query = dict(parse_qsl(parts.query))
    assert query["X-Amz-Expires"] == "300"
    assert re.fullmatch(r"[0-9a-f]{64}", query["X-Amz-Signature"])

    stored = put(url, pdf_of(*images))
    assert stored.status_code == 200
    assert stored.headers["etag"]
    data = parsed(lane, uid)
    assert data["progress"] == 100
    pages = data["result"]["pages"]
    assert data["result"]["version"] == ""
    assert [page["page_idx"] for page in pages] == [0, 1, 2]
    sizes = [(page["page_width"], page["page_height"]) for page in pages]
    assert sizes == [(400, 300), (320, 240), (400, 300)]
    assert [page["md"] for page in pages] == [
        embedded_text(images[0]),
        png_page_text(images[1]),
        embedded_text(images[2]),
    ]
    assert all(page["url"] == "" and page["score"] == 100 for page in pages)
    stats = lane.stats()
    assert (stats["preuploads"], stats["puts"], stats["pdf_tasks"], stats["pdf_pages_billed"]) == (1, 1, 1, 3)


def test_progress_grows_as_pages_finish(lane):
    lane.configure(pdf_page_workers=1, pdf_page_seconds=0.3)
    uid = upload(lane, pdf_of(*(jpeg(f"Page {number}") for number in range(4))))
    seen = []

    def done():
        answer = status(lane, uid)["data"]
        seen.append(answer["progress"])
        return answer["status"] == "success"

    wait_until(done, message="the four pages parsed")
    assert seen == sorted(seen)
    assert {25, 50, 75} & set(seen)
    assert seen[-1] == 100


def test_a_blank_page_has_its_entry_in_order(lane):
    first, last = jpeg("Before"), jpeg("After")
    writer = PdfWriter()
    writer.add_page(PdfReader(io.BytesIO(pdf_of(first))).pages[0])
    writer.add_blank_page(width=200, height=100)  # no image: a blank page, sized by its media box
    writer.add_page(PdfReader(io.BytesIO(pdf_of(last))).pages[0])
    out = io.BytesIO()
    writer.write(out)
    pages = parsed(lane, upload(lane, out.getvalue()))["result"]["pages"]
    assert [(page["page_idx"], page["md"]) for page in pages] == [
        (0, embedded_text(first)),
        (1, ""),
        (2, embedded_text(last)),
    ]
    assert (pages[1]["page_width"], pages[1]["page_height"], pages[1]["score"]) == (200, 100, 0)
    assert lane.stats()["pdf_pages_billed"] == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_pages_are_parsed_by_a_bounded_pool(lane, workers):
    lane.configure(pdf_page_workers=workers, pdf_page_seconds=0.05)
    uids = [upload(lane, pdf_of(*(jpeg(f"Page {number}") for number in range(3)))) for _ in range(2)]
    for uid in uids:
        parsed(lane, uid)
    assert lane.stats()["max_pages_parsing"] == workers


def test_multipart_put_like_pdfdeal(lane):
    image = jpeg("Multipart")
    uid, url = new_url(lane, file_name="scan.pdf")  # pdfdeal's file_name is accepted and ignored
    stored = httpx.put(url, files={"file": ("scan.pdf", pdf_of(image), "application/pdf")}, timeout=30)
    assert stored.status_code == 200
    assert [page["md"] for page in parsed(lane, uid)["result"]["pages"]] == [embedded_text(image)]


def test_preupload_models_and_key(lane):
    assert preupload(lane).json()["code"] == "success"  # no body: v2
    assert preupload(lane, model="v2").json()["code"] == "success"
    assert preupload(lane, model="v3-2026").json()["code"] == "success"
    assert preupload(lane, model="v4").json()["code"] == "invalid_params"
    assert lane.client.post(PREUPLOAD, content=b"[1]", headers=AUTH).json()["code"] == "invalid_params"
    refused = lane.client.post(PREUPLOAD, headers={"Authorization": "Bearer sk-other"})
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthorized"
    assert lane.stats()["preuploads"] == 3


def test_the_model_that_parsed_a_pdf_is_reported(lane):
    image = jpeg("Modelled")
    by_default, by_v2, by_v3 = (
        upload(lane, pdf_of(image), **asked) for asked in ({}, {"model": "v2"}, {"model": "v3-2026"})
    )
    assert [page["md"] for page in parsed(lane, by_default)["result"]["pages"]] == [embedded_text(image)]
    assert [page["md"] for page in parsed(lane, by_v2)["result"]["pages"]] == [embedded_text(image)]
    assert [page["md"] for page in parsed(lane, by_v3)["result"]["pages"]] == [
        f"{embedded_text(image)}\n\n<!-- model: v3-2026 -->"
    ]
    with zipfile.ZipFile(
        io.BytesIO(httpx.get(export(lane, by_v3, to="md", formula_mode="normal")["url"]).content)
    ) as archive:
        assert archive.read("output.md").decode().endswith("<!-- model: v3-2026 -->")
    stats = lane.stats()
    assert stats["preuploads_by_model"] == {"v2": 2, "v3-2026": 1}
    assert stats["pages_by_model"] == {"v2": 2, "v3-2026": 1}


def test_preupload_rate_limit_is_429(lane):
    lane.configure(preupload_rate_limit=1, rate_window=30)
    assert preupload(lane).status_code == 200
    limited = preupload(lane)
    assert limited.status_code == 429
    assert limited.json()["code"] == "request_limit_exceeded"
    assert 0 < float(limited.headers["retry-after"]) <= 30
    assert lane.stats()["preuploads_rate_limited"] == 1


# The presigned url


def test_url_is_refused_after_a_200(lane):
    pdf = pdf_of(jpeg("Once"))
    uid, url = new_url(lane)
    assert put(url, pdf).status_code == 200
    again = put(url, pdf)
    assert again.status_code == 403
    assert xml_code(again) == "AccessDenied"
    assert "already used" in again.text
    parsed(lane, uid)
    stats = lane.stats()
    assert (stats["puts"], stats["puts_refused"], stats["pdf_tasks"]) == (2, 1, 1)
    assert stats["pdf_pages_billed"] == 1


def test_url_expires(lane):
    lane.configure(upload_url_ttl=0)
    uid, url = new_url(lane)
    late = put(url, pdf_of(jpeg("Late")))
    assert late.status_code == 403
    assert xml_code(late) == "AccessDenied"
    assert "expired" in late.text
    assert status(lane, uid)["code"] == "parse_status_not_found"  # no task without a 200


def test_url_keeps_the_lifetime_it_was_issued_with(lane):
    _, url = new_url(lane)
    lane.configure(upload_url_ttl=0)
    assert put(url, pdf_of(jpeg("Issued earlier"))).status_code == 200


@pytest.mark.parametrize(
    "change",
    [
        {"X-Amz-Signature": "0" * 64},
        {"X-Amz-Expires": "86400"},  # a longer life than signed for
        {"X-Amz-Date": "20990101T000000Z"},
    ],
)
def test_url_with_a_wrong_signature_is_refused(lane, change):
    _, url = new_url(lane)
    parts = urlsplit(url)
    forged = parts._replace(query=urlencode({**dict(parse_qsl(parts.query)), **change})).geturl()
    refused = put(forged, pdf_of(jpeg("Forged")))
    assert refused.status_code == 403
    assert xml_code(refused) == "SignatureDoesNotMatch"
    assert put(url, pdf_of(jpeg("Genuine"))).status_code == 200  # the url itself is still unused


def test_url_of_another_uid_is_refused(lane):
    uid, url = new_url(lane)
    other = url.replace(uid, "00000000-0000-4000-8000-000000000000")
    assert xml_code(put(other, pdf_of(jpeg("Elsewhere")))) == "SignatureDoesNotMatch"


def test_put_cut_by_a_reset_may_be_retried_on_the_same_url(lane):
    image = jpeg("Retried")
    lane.configure(reset_next_uploads=1)
    uid, url = new_url(lane)
    with pytest.raises(httpx.ReadError):  # all sent; the answer never comes
        put(url, pdf_of(image))
    assert status(lane, uid)["code"] == "parse_status_not_found"
    assert put(url, pdf_of(image)).status_code == 200
    assert [page["md"] for page in parsed(lane, uid)["result"]["pages"]] == [embedded_text(image)]
    stats = lane.stats()
    assert (stats["uploads_reset"], stats["pdf_tasks"], stats["pdf_pages_billed"]) == (1, 1, 1)


def test_put_answered_503_may_be_retried_on_the_same_url(lane):
    lane.configure(put_fail_next=1)
    uid, url = new_url(lane)
    failed = put(url, pdf_of(jpeg("Unlucky")))
    assert failed.status_code == 503
    assert xml_code(failed) == "ServiceUnavailable"
    assert put(url, pdf_of(jpeg("Unlucky"))).status_code == 200
    parsed(lane, uid)
    assert lane.stats()["puts_failed"] == 1


def test_slow_put_is_an_upload_in_flight(lane):
    lane.configure(upload_seconds=60)  # released below, once seen arriving
    uid, url = new_url(lane)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(put, url, pdf_of(jpeg("Slow link")))
        wait_until(lambda: lane.stats()["uploads_in_flight"] == 1, message="the PUT arriving")
        assert status(lane, uid)["code"] == "parse_status_not_found"
        lane.configure(upload_seconds=0)
        assert answer.result().status_code == 200
    parsed(lane, uid)


# Pickup delay


def test_pickup_delay_shows_processing_at_progress_0(lane):
    lane.configure(pickup_delay=60, pickup_status="processing")
    uid = upload(lane, pdf_of(jpeg("Queued")))
    assert status(lane, uid)["data"] == {"status": "processing", "progress": 0}
    assert lane.stats()["pdf_tasks_in_progress"] == 0
    lane.configure(pickup_delay=0)
    parsed(lane, uid)


def test_pickup_delay_shows_not_found(lane):
    lane.configure(pickup_delay=60, pickup_status="not_found")
    uid = upload(lane, pdf_of(jpeg("Not yet")))
    assert status(lane, uid)["code"] == "parse_status_not_found"
    lane.configure(pickup_delay=0)
    parsed(lane, uid)


def test_unknown_pickup_status_is_refused(lane):
    answer = lane.client.post("/local/config", json={"pickup_status": "maybe"})
    assert answer.status_code == 400
    assert "pickup_status" in answer.json()["error"]


# Failures, in both shapes


def test_injected_failure_as_failed_with_detail(lane):
    lane.configure(pdf_fail_next=1, pdf_fail_reason="parse_timeout", pdf_failure_shape="status")
    failed = finished(lane, upload(lane, pdf_of(jpeg("Too slow"), jpeg("Too slow"))))
    assert failed["code"] == "success"
    assert failed["data"]["status"] == "failed"
    assert failed["data"]["detail"] == "parse_timeout"
    parsed(lane, upload(lane, pdf_of(jpeg("Next one"))))  # only the next one failed
    stats = lane.stats()
    assert (stats["pdf_tasks_failed"], stats["pdf_pages_billed"]) == (1, 1)  # failures unbilled


def test_injected_failure_as_an_envelope_error(lane):
    lane.configure(pdf_fail_next=1, pdf_fail_reason="parse_error", pdf_failure_shape="envelope")
    failed = finished(lane, upload(lane, pdf_of(jpeg("Broken"))))
    assert failed["code"] == "parse_error"
    assert failed["msg"]


@pytest.mark.parametrize("bill_failed_pdfs", [False, True])
def test_one_bad_page_fails_the_whole_pdf(lane, bill_failed_pdfs):
    lane.configure(bill_failed_pdfs=bill_failed_pdfs)
    good, bad = jpeg("Fine"), jpeg_with_text("<!-- doc2x-fail: parse_error -->")
    failed = finished(lane, upload(lane, pdf_of(good, bad, good)))
    assert failed["data"]["status"] == "failed"
    assert failed["data"]["detail"] == "parse_error"
    stats = lane.stats()
    expected = {hashlib.sha256(good).hexdigest(): 2, hashlib.sha256(bad).hexdigest(): 1}
    assert stats["pdf_billed"] == (expected if bill_failed_pdfs else {})


@pytest.mark.parametrize(
    ("knobs", "body", "code"),
    [
        ({"pdf_max_bytes": 1000}, pdf_of(jpeg("Big")), "parse_file_too_large"),
        ({}, jpeg("Not a PDF"), "parse_file_not_pdf"),
        ({}, b"%PDF-1.4\nnot really\n", "parse_file_invalid"),
        ({"max_pages": 2}, pdf_of(*[jpeg("Many")] * 3), "parse_page_limit_exceeded"),
        ({"quota": 2}, pdf_of(*[jpeg("Costly")] * 3), "parse_quota_limit"),
    ],
    ids=["too-large", "not-pdf", "invalid", "page-limit", "quota"],
)
def test_a_bad_upload_fails_the_task_in_status(lane, knobs, body, code):
    lane.configure(**knobs)
    uid, url = new_url(lane)
    assert put(url, body).status_code == 200  # the store does not judge the file
    failed = finished(lane, uid)
    assert (failed["data"]["status"], failed["data"]["detail"]) == ("failed", code)
    assert lane.stats()["pdf_pages_billed"] == 0


# Limits in progress


def test_too_many_tasks_in_progress(lane):
    lane.configure(max_tasks_in_progress=1, pdf_page_seconds=60)
    first = upload(lane, pdf_of(jpeg("First")))
    wait_until(lambda: lane.stats()["pdf_tasks_in_progress"] == 1, message="the first task in progress")
    second = upload(lane, pdf_of(jpeg("Second")))
    refused = finished(lane, second)
    assert refused["data"]["detail"] == "parse_task_limit_exceeded"
    lane.configure(pdf_page_seconds=0)
    parsed(lane, first)
    assert lane.stats()["max_pdf_tasks_in_progress"] == 1


def test_too_many_pages_in_progress(lane):
    lane.configure(max_pages_in_progress=3, pdf_page_seconds=60, pdf_failure_shape="envelope")
    first = upload(lane, pdf_of(jpeg("One"), jpeg("Two")))
    wait_until(lambda: lane.stats()["pages_in_progress"] == 2, message="the first task in progress")
    refused = finished(lane, upload(lane, pdf_of(jpeg("Three"), jpeg("Four"))))
    assert refused["code"] == "parse_concurrency_limit"
    third = upload(lane, pdf_of(jpeg("Three")))  # fits
    wait_until(lambda: lane.stats()["pages_in_progress"] == 3, message="the third task in progress")
    lane.configure(pdf_page_seconds=0)
    parsed(lane, first)
    parsed(lane, third)
    stats = lane.stats()
    assert (stats["max_pages_in_progress"], stats["pages_in_progress"]) == (3, 0)


# Figures on the CDN, and exports


def figure_page() -> bytes:
    return jpeg("Quarterly Report", size=(1000, 1400), paragraphs=["The figure below."], figure=True)


def test_figures_link_the_cdn_and_expire(lane):
    uid = upload(lane, pdf_of(figure_page(), jpeg("Plain")))
    pages = parsed(lane, uid)["result"]["pages"]
    [link] = re.findall(r'<img src="([^"]+)"/>', pages[0]["md"])
    assert link.startswith(f"{lane.url}/local/cdn/{uid}_0.jpg?")
    box = dict(parse_qsl(urlsplit(link).query))
    assert box == {"x": "80", "y": "230", "w": "360", "h": "240", "r": "0"}
    assert pages[0]["url"] == f"{lane.url}/local/cdn/{uid}_0.jpg"
    assert pages[1]["url"] == ""
    figure = httpx.get(link)
    assert figure.status_code == 200
    assert figure.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(figure.content)).size == (360, 240)
    assert Image.open(io.BytesIO(httpx.get(pages[0]["url"]).content)).size == (1000, 1400)
    lane.configure(cdn_ttl=0)
    expired = httpx.get(link)
    assert expired.status_code == 403
    assert xml_code(expired) == "AccessDenied"


def export(doc2x, uid: str, **asked) -> dict:
    answer = doc2x.client.post(CONVERT, json={"uid": uid, **asked}, headers=AUTH).json()
    assert answer == {"code": "success", "data": {"status": "processing", "url": ""}}, answer

    def ready():
        result = doc2x.client.get(CONVERT_RESULT, params={"uid": uid}, headers=AUTH).json()
        return result if result["data"]["status"] != "processing" else None

    return wait_until(ready, message="the export")["data"]


def test_md_export_zip_layout_and_links(lane):
    lane.configure(export_seconds=60)
    uid = upload(lane, pdf_of(figure_page(), jpeg("Appendix")))
    parsed(lane, uid)
    lane.client.post(CONVERT, json={"uid": uid, "to": "md", "formula_mode": "normal"}, headers=AUTH)
    pending = lane.client.get(CONVERT_RESULT, params={"uid": uid}, headers=AUTH).json()
    assert pending["data"] == {"status": "processing", "url": ""}
    lane.configure(export_seconds=0)
    done = export(lane, uid, to="md", formula_mode="dollar", filename="report", merge_cross_page_forms=True)
    assert done["status"] == "success"
    url = urlsplit(done["url"])
    assert url.path == f"/local/s3/objects/{uid}/convert_md_none.zip"
    archive = zipfile.ZipFile(io.BytesIO(httpx.get(done["url"]).content))
    figure = f"images/{uid}_0_80_230_360_240_0.jpg"
    assert sorted(archive.namelist()) == [figure, "report.md"]
    markdown = archive.read("report.md").decode()
    assert re.findall(r'<img src="([^"]+)"/>', markdown) == [figure]
    assert markdown.startswith("# Quarterly Report")
    assert "# Appendix" in markdown
    assert Image.open(io.BytesIO(archive.read(figure))).size == (360, 240)
    assert lane.stats()["exports"] == 2


def test_export_defaults_tex_and_docx(lane):
    uid = upload(lane, pdf_of(figure_page()))
    parsed(lane, uid)
    md = export(lane, uid, to="md", formula_mode="normal")
    assert "output.md" in zipfile.ZipFile(io.BytesIO(httpx.get(md["url"]).content)).namelist()
    tex = export(lane, uid, to="tex", formula_mode="normal", filename="paper")
    assert "/convert_tex_none.zip" in tex["url"]
    names = zipfile.ZipFile(io.BytesIO(httpx.get(tex["url"]).content)).namelist()
    assert "paper.tex" in names
    assert any(name.startswith("images/") for name in names)
    docx = export(lane, uid, to="docx", formula_mode="normal")
    assert "/convert_docx_none.docx" in docx["url"]
    document = zipfile.ZipFile(io.BytesIO(httpx.get(docx["url"]).content)).read("word/document.xml").decode()
    assert "Quarterly Report" in document


def test_export_url_with_an_escaped_ampersand(lane):
    lane.configure(export_url_escaped=True)
    uid = upload(lane, pdf_of(jpeg("Escaped")))
    parsed(lane, uid)
    url = export(lane, uid, to="md", formula_mode="normal")["url"]
    assert "\\u0026" in url and "&" not in url
    assert httpx.get(url).status_code == 403  # taken as it is, the query does not carry the signature
    assert httpx.get(url.replace("\\u0026", "&")).status_code == 200


@pytest.mark.parametrize(
    "asked",
    [
        {"to": "md"},
        {"formula_mode": "normal"},
        {"to": "pdf", "formula_mode": "normal"},
        {"to": "md", "formula_mode": "latex"},
        {"to": "md", "formula_mode": "normal", "filename": "../x"},
        {"to": "md", "formula_mode": "normal", "merge_cross_page_forms": "yes"},
    ],
)
def test_export_parameters_are_checked(lane, asked):
    uid = upload(lane, pdf_of(jpeg("Checked")))
    parsed(lane, uid)
    answer = lane.client.post(CONVERT, json={"uid": uid, **asked}, headers=AUTH).json()
    assert answer["code"] == "invalid_params"


def test_export_needs_a_parsed_task(lane):
    asked = {"to": "md", "formula_mode": "normal"}
    missing = lane.client.post(CONVERT, json={"uid": "nope", **asked}, headers=AUTH).json()
    assert missing["code"] == "parse_status_not_found"
    lane.configure(pickup_delay=60)
    uid = upload(lane, pdf_of(jpeg("Waiting")))
    early = lane.client.post(CONVERT, json={"uid": uid, **asked}, headers=AUTH).json()
    assert early["code"] == "convert_not_ready"
    no_export = lane.client.get(CONVERT_RESULT, params={"uid": uid}, headers=AUTH).json()
    assert no_export["code"] == "parse_status_not_found"


# Billing


def test_billing_per_page_by_content(lane):
    same, other = jpeg("Repeated"), png("Flate")
    uid = upload(lane, pdf_of(same, other, same))
    parsed(lane, uid)
    assert lane.client.post("/api/v2/async/parse/img/layout", content=same, headers=AUTH).status_code == 200
    stats = lane.stats()
    assert stats["pdf_billed"] == {hashlib.sha256(same).hexdigest(): 2, pixels_sha256(other): 1}
    assert stats["pdf_pages_billed"] == 3
    assert stats["max_pdf_billed_per_page"] == 2
    # A JPEG page bills under the hash the image API bills the same JPEG under.
    assert stats["billed"] == {hashlib.sha256(same).hexdigest(): 1}
    lane.reset()
    cleared = lane.stats()
    for key in ("preuploads", "puts", "puts_refused", "pdf_tasks", "pdf_pages_billed", "exports"):
        assert cleared[key] == 0, key
    assert cleared["max_pages_in_progress"] == 0
    assert cleared["pdf_billed"] == {}
    assert status(lane, uid)["code"] == "parse_status_not_found"


def test_images_and_pdf_pages_share_the_quota(lane):
    lane.configure(quota=2)
    parsed(lane, upload(lane, pdf_of(jpeg("One"), jpeg("Two"))))
    assert preupload(lane).json()["code"] == "parse_quota_limit"
    refused = lane.client.post("/api/v2/async/parse/img/layout", content=jpeg("Three"), headers=AUTH)
    assert refused.json()["code"] == "parse_quota_limit"


def test_status_of_unknown_uid_and_expiry(lane):
    assert status(lane, "nope")["code"] == "parse_status_not_found"
    uid, _ = new_url(lane)
    assert status(lane, uid)["code"] == "parse_status_not_found"  # preuploaded, never PUT
    uid = upload(lane, pdf_of(jpeg("Short-lived")))
    parsed(lane, uid)
    lane.configure(result_ttl=0)
    assert status(lane, uid)["code"] == "parse_status_not_found"


# What reaches the keyless routes (the presigned PUT, the export download, the CDN)


def keyless(doc2x) -> dict:
    return doc2x.stats()["keyless_routes"]


def with_query(url: str, **extra) -> str:
    parts = urlsplit(url)
    return parts._replace(
        query=f"{parts.query}&{urlencode(extra)}" if parts.query else urlencode(extra)
    ).geturl()


def test_keyless_routes_count_their_requests_and_those_carrying_the_key(lane):
    zero = {"requests": 0, "with_authorization": 0}
    assert keyless(lane) == {"put": zero, "export": zero, "cdn": zero}
    pdf = pdf_of(figure_page())
    _, url = new_url(lane)
    assert put(url, pdf).status_code == 200  # as a client should: no key
    assert keyless(lane)["put"] == {"requests": 1, "with_authorization": 0}
    # The key in any form is counted, whatever the store answered.
    _, url = new_url(lane)
    assert put(url, pdf, headers={"Authorization": "Basic anything"}).status_code == 200
    _, url = new_url(lane)
    assert put(url, pdf, headers={"X-Api-Key": API_KEY}).status_code == 200
    _, url = new_url(lane)
    assert put(with_query(url, token=API_KEY), pdf).status_code == 403  # the signature no longer matches
    assert keyless(lane)["put"] == {"requests": 4, "with_authorization": 3}

    uid = upload(lane, pdf)
    link = re.findall(r'<img src="([^"]+)"/>', parsed(lane, uid)["result"]["pages"][0]["md"])[0]
    assert httpx.get(link).status_code == 200
    assert httpx.get(link, headers=AUTH).status_code == 200  # served: the store ignores the header
    assert httpx.get(with_query(link, key=API_KEY)).status_code == 200
    url = export(lane, uid, to="md", formula_mode="normal")["url"]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url, headers={"Cookie": f"doc2x={API_KEY}"}).status_code == 200
    assert keyless(lane) == {
        "put": {"requests": 5, "with_authorization": 3},
        "export": {"requests": 2, "with_authorization": 1},
        "cdn": {"requests": 3, "with_authorization": 2},
    }
    lane.reset()
    assert keyless(lane) == {"put": zero, "export": zero, "cdn": zero}


def test_an_echoing_server_quotes_the_authorization_header_in_pdf_errors(lane):
    def failures() -> list[str]:
        """The error texts of a failed task (both shapes), a refused export and a refused PUT."""
        lane.configure(pdf_fail_next=1, pdf_failure_shape="status")
        detail = finished(lane, upload(lane, pdf_of(jpeg("Failing"))))["data"]["detail"]
        lane.configure(pdf_fail_next=1, pdf_failure_shape="envelope")
        msg = finished(lane, upload(lane, pdf_of(jpeg("Failing")))).get("msg", "")
        refused = lane.client.post(
            CONVERT, json={"uid": "nope", "to": "md", "formula_mode": "normal"}, headers=AUTH
        )
        _, url = new_url(lane)
        store = put(with_query(url, extra="1"), b"%PDF-", headers=AUTH)
        assert store.status_code == 403
        return [detail, msg, refused.json()["msg"], store.text]

    assert not any(API_KEY in text for text in failures())  # the control: off by default
    lane.configure(echo_key=True)
    assert lane.client.get("/local/config").json()["echo_key"] is True
    texts = failures()
    assert all(f"Authorization: Bearer {API_KEY}" in text for text in texts), texts
    assert texts[0].startswith("parse_error ")
    _, url = new_url(lane)
    bare = put(with_query(url, extra="1"), b"%PDF-")  # no header: nothing to quote
    assert bare.status_code == 403 and "Authorization" not in bare.text
