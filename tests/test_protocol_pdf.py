"""The PDF API's requests and readers, without a server: odd and hostile answers become typed errors."""

from __future__ import annotations

import json

import pytest

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import (
    Doc2XError,
    Doc2XInputError,
    Doc2XJobFailedError,
    Doc2XJobNotFoundError,
    Doc2XProtocolError,
    Doc2XQuotaError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)

UID = "0b9e1a7c-3f0e-4c55-9d3a-6f1f0b2f4a10"
PUT_URL = (
    f"https://doc2x-pdf.oss-cn-beijing.aliyuncs.com/tmp/{UID}.pdf"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=LTAI%2F20260101&X-Amz-Signature=abcdef0123"
)
EXPORT_URL = (
    "https://doc2x-backend.s3.cn-north-1.amazonaws.com.cn/objects/x/convert_md_none.zip"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256\\u0026X-Amz-Signature=feed"
)


def answer(payload, status: int = 200, **headers) -> protocol.Doc2XAnswer:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return protocol.Doc2XAnswer(status, body, headers)


def status_data(**data):
    return protocol.read_answer(protocol.pdf_status_request(UID), answer({"code": "success", "data": data}))


def page(index: int, **fields):
    return {"url": "", "page_idx": index, "page_width": 400, "page_height": 300, "md": f"p{index}", **fields}


# -- requests ----------------------------------------------------------------------------------


def test_preupload_sends_a_body_only_when_a_model_is_chosen():
    plain = protocol.preupload_request()
    assert (plain.method, plain.path, plain.content, plain.headers) == (
        "POST",
        protocol.PREUPLOAD_PATH,
        None,
        {},
    )
    assert not plain.bills
    chosen = protocol.preupload_request("v3-2026")
    assert json.loads(chosen.content) == {"model": "v3-2026"}
    assert chosen.headers == {"Content-Type": "application/json"}
    with pytest.raises(Doc2XInputError, match="v3"):
        protocol.preupload_request("gpt")


def test_the_image_requests_still_send_raw_bytes():
    assert protocol.submit_request(b"\xff\xd8\xff").headers == {"Content-Type": "application/octet-stream"}


def test_status_and_export_requests():
    status = protocol.pdf_status_request(UID)
    assert (status.method, status.path, dict(status.params)) == (
        "GET",
        protocol.PDF_STATUS_PATH,
        {"uid": UID},
    )
    export = protocol.export_request(UID, filename="report")
    assert export.path == protocol.EXPORT_PATH and not export.bills
    assert json.loads(export.content) == {
        "uid": UID,
        "to": "md",
        "formula_mode": "dollar",
        "filename": "report",
    }
    assert "filename" not in json.loads(protocol.export_request(UID).content)
    result = protocol.export_result_request(UID)
    assert (result.path, dict(result.params)) == (protocol.EXPORT_RESULT_PATH, {"uid": UID})


@pytest.mark.parametrize("filename", ["../x", "a/b", "", "x" * 200, "bad\nname", 7])
def test_export_refuses_a_file_name_that_is_not_one(filename):
    with pytest.raises(Doc2XInputError):
        protocol.export_request(UID, filename=filename)


@pytest.mark.parametrize("uid", ["", "has space", "x" * 500, "line\nbreak"])
def test_requests_refuse_a_bad_uid(uid):
    for build in (protocol.pdf_status_request, protocol.export_result_request, protocol.export_request):
        with pytest.raises(Doc2XProtocolError):
            build(uid)


# -- preupload ---------------------------------------------------------------------------------


def test_preupload_reads_uid_and_url():
    upload = protocol.read_preupload({"uid": UID, "url": PUT_URL}, issued_at=100.0)
    assert (upload.uid, upload.url, upload.issued_at) == (UID, PUT_URL, 100.0)
    assert "X-Amz" not in repr(upload) and "X-Amz" not in upload.redacted_url
    assert upload.is_young(100.0 + 200) and not upload.is_young(100.0 + 250)


@pytest.mark.parametrize(
    "data",
    [
        {"url": PUT_URL},
        {"uid": 12, "url": PUT_URL},
        {"uid": UID},
        {"uid": UID, "url": 5},
        {"uid": UID, "url": ["https://a.aliyuncs.com/x"]},
        {"uid": UID, "url": "/tmp/relative.pdf?sig=1"},
        {"uid": UID, "url": "ftp://doc2x-pdf.oss-cn-beijing.aliyuncs.com/x.pdf"},
        {"uid": UID, "url": "file:///etc/passwd"},
        {"uid": UID, "url": "https://user:secret@doc2x-pdf.oss-cn-beijing.aliyuncs.com/x.pdf"},
        {"uid": UID, "url": "https://doc2x-pdf.oss-cn-beijing.aliyuncs.com/x.pdf?" + "a" * 5000},
        {"uid": UID, "url": "https://doc2x-pdf.oss-cn-beijing.aliyuncs.com/x .pdf"},
        {"uid": UID, "url": "https://doc2x-pdf.oss-cn-beijing.aliyuncs.com:99999/x.pdf"},
        {"uid": UID, "url": "https:///no-host"},
        {"uid": UID, "url": ""},
    ],
)
def test_preupload_refuses_odd_answers(data):
    with pytest.raises(Doc2XProtocolError) as caught:
        protocol.read_preupload(data)
    assert "secret" not in str(caught.value) and "a" * 300 not in str(caught.value)


def test_a_preupload_limit_is_a_rate_limit():
    request = protocol.preupload_request()
    with pytest.raises(Doc2XRateLimitError) as caught:
        protocol.read_answer(request, answer({"code": "request_limit_exceeded"}, 429, **{"retry-after": "2"}))
    assert caught.value.retry_after == 2.0
    with pytest.raises(Doc2XRateLimitError):
        protocol.read_answer(request, answer({"code": "parse_task_limit_exceeded", "msg": "busy"}))


# -- status ------------------------------------------------------------------------------------


def test_status_processing_then_success_with_pages_sorted():
    processing = protocol.read_pdf_status(UID, status_data(status="processing", progress=40))
    assert (processing.status, processing.progress, processing.is_terminal, processing.result) == (
        "processing",
        40,
        False,
        None,
    )
    pages = [page(2, score=90), page(0, url="https://cdn.noedgeai.com/x_0.jpg"), page(1, score=100.0)]
    done = protocol.read_pdf_status(
        UID, status_data(status="success", progress=100, result={"version": "", "pages": pages})
    )
    assert done.is_terminal and done.result is not None
    assert [p.page_idx for p in done.result.pages] == [0, 1, 2]
    assert [p.md for p in done.result.pages] == ["p0", "p1", "p2"]
    assert [p.score for p in done.result.pages] == [None, 100, 90]
    assert done.result.pages[0].url == "https://cdn.noedgeai.com/x_0.jpg"
    assert done.result.pages[1].url is None  # "" is no url
    assert done.result.markdown == "p0\n\np1\n\np2"


def test_status_unknown_is_kept_and_not_finished():
    status = protocol.read_pdf_status(UID, status_data(status="Queued", progress="soon"))
    assert (status.status, status.progress, status.is_terminal) == ("queued", None, False)


def test_failed_status_with_detail_maps_the_code():
    failed = protocol.read_pdf_status(UID, status_data(status="failed", detail="parse_timeout"))
    assert failed.is_terminal
    error = failed.failure()
    assert isinstance(error, Doc2XJobFailedError) and error.code == "parse_timeout" and error.uid == UID
    limited = protocol.read_pdf_status(UID, status_data(status="failed", detail="parse_concurrency_limit"))
    assert isinstance(limited.failure(), Doc2XRateLimitError)
    free_text = protocol.read_pdf_status(
        UID, status_data(status="failed", detail="Bearer sk-leaky-1234 broke")
    )
    error = free_text.failure()
    assert error.code == "parse_error" and "sk-leaky-1234" not in str(error)


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        ("parse_error", Doc2XJobFailedError),
        ("parse_timeout", Doc2XJobFailedError),
        ("parse_page_limit_exceeded", Doc2XInputError),
        ("parse_file_lock", Doc2XInputError),
        ("parse_file_not_pdf", Doc2XInputError),
        ("parse_pdf_invalid", Doc2XInputError),
        ("parse_file_invalid", Doc2XInputError),
        ("parse_file_too_large", Doc2XInputError),
        ("parse_quota_limit", Doc2XQuotaError),
        ("parse_status_not_found", Doc2XJobNotFoundError),
        ("parse_task_limit_exceeded", Doc2XRateLimitError),
        ("parse_concurrency_limit", Doc2XRateLimitError),
        ("parse_create_task_error", Doc2XTransientError),
    ],
)
def test_failure_as_an_envelope_code_raises_its_class(code, error_class):
    with pytest.raises(error_class) as caught:
        protocol.read_answer(protocol.pdf_status_request(UID), answer({"code": code, "msg": "no"}))
    assert (caught.value.code, caught.value.uid) == (code, UID)
    assert protocol.error_class_for(code) is error_class


def test_every_pdf_code_of_the_facts_is_classed():
    assert set(protocol.PDF_ERROR_CODES) == {
        "parse_page_limit_exceeded",
        "parse_file_lock",
        "parse_file_not_pdf",
        "parse_pdf_invalid",
        "parse_timeout",
    }
    assert not set(protocol.PDF_ERROR_CODES) & set(protocol.ERROR_CODES)
    assert protocol.is_permanent_code("parse_file_lock") and not protocol.is_permanent_code("parse_timeout")


@pytest.mark.parametrize(
    "data",
    [
        {"status": 3},
        {"status": None},
        {"status": "succ ess"},
        {"status": "success"},
        {"status": "success", "result": {"pages": "all"}},
        {"status": "success", "result": {"pages": ["page"]}},
        {"status": "success", "result": {"pages": [{"md": "no index"}]}},
        {"status": "success", "result": {"pages": [page(0, page_idx="0")]}},
        {"status": "success", "result": {"pages": [page(0, page_idx=True)]}},
        {"status": "success", "result": {"pages": [page(0, page_idx=-1)]}},
        {"status": "success", "result": {"pages": [page(0, page_idx=float("nan"))]}},
        {"status": "success", "result": {"pages": [page(0, page_width="400")]}},
        {"status": "success", "result": {"pages": [page(0, md=["x"])]}},
        {"status": "success", "result": {"pages": [page(0, url=7)]}},
        {"status": "success", "result": {"pages": [page(0, score="high")]}},
        {"status": "success", "result": {"pages": [page(0), page(0)]}},
    ],
)
def test_status_refuses_odd_shapes(data):
    with pytest.raises(Doc2XProtocolError):
        protocol.read_pdf_status(UID, data)


def test_a_hostile_status_body_is_a_protocol_error():
    request = protocol.pdf_status_request(UID)
    for body in (b"[" * 100_000, b"<html>502</html>", b'{"code": ["x"]}', b'{"code": "success", "data": []}'):
        with pytest.raises(Doc2XError) as caught:
            protocol.read_answer(request, answer(body))
        assert isinstance(caught.value, Doc2XProtocolError)


# -- export ------------------------------------------------------------------------------------


def test_export_url_has_its_escaped_ampersand_restored():
    export = protocol.read_export(UID, {"status": "success", "url": EXPORT_URL})
    assert "\\u0026" not in export.url and "&X-Amz-Signature=feed" in export.url
    assert export.names("md") and not export.names("tex")
    assert "X-Amz" not in repr(export)


def test_export_before_its_url_is_not_done():
    for data in (
        {"status": "processing", "url": ""},
        {"status": "success", "url": ""},
        {"status": "success"},
    ):
        assert not protocol.read_export(UID, data).names("md")
    assert protocol.read_export(UID, {"status": "failed", "url": ""}).is_failed
    assert protocol.read_export(UID, {"status": "unheard_of"}).status == "unheard_of"


@pytest.mark.parametrize(
    "data",
    [
        {"status": 1, "url": ""},
        {"status": "success", "url": 5},
        {"status": "success", "url": "convert_md_none.zip"},
        {"status": "success", "url": "https://bob:pw@doc2x-backend.s3.cn-north-1.amazonaws.com.cn/a.zip"},
    ],
)
def test_export_refuses_odd_shapes(data):
    with pytest.raises(Doc2XProtocolError):
        protocol.read_export(UID, data)


# -- the object store's PUT answers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class", "code"),
    [
        (403, Doc2XTransientError, "presigned_url_refused"),
        (503, Doc2XTransientError, "upload_failed"),
        (408, Doc2XTransientError, "upload_failed"),
        (204, Doc2XSubmitUncertainError, None),
        (400, Doc2XProtocolError, None),
    ],
)
def test_put_answers(status, error_class, code):
    body = (
        b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    )
    assert protocol.read_put_answer(answer(b"", 200), url=PUT_URL, uid=UID, source="a.pdf") is None
    with pytest.raises(error_class) as caught:
        protocol.read_put_answer(answer(body, status), url=PUT_URL, uid=UID, source="a.pdf")
    assert caught.value.code == code
    assert "X-Amz-Signature" not in str(caught.value) and "abcdef0123" not in str(caught.value)
    assert "a.pdf" in str(caught.value)


# -- urls --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (PUT_URL, f"https://doc2x-pdf.oss-cn-beijing.aliyuncs.com/tmp/{UID}.pdf"),
        ("http://127.0.0.1:8765/local/oss/tmp/x.pdf?sig=1#frag", "http://127.0.0.1:8765/local/oss/tmp/x.pdf"),
        ("https://user:pw@host.example/p?q=1", "https://host.example/p"),
        ("not a url", "<a url that is not absolute>"),
        (None, "<NoneType>"),
    ],
)
def test_redact_url(url, redacted):
    assert protocol.redact_url(url) == redacted


@pytest.mark.parametrize(
    "url",
    [
        EXPORT_URL.replace("\\u0026", "&"),
        "https://cdn.noedgeai.com/abc_0.jpg?x=1&y=2&w=3&h=4&r=0",
        "https://doc2x-pdf.oss-cn-beijing.aliyuncs.com/tmp/x.pdf",
        "http://127.0.0.1:8765/local/s3/objects/u/convert_md_none.zip?sig=1",
    ],
)
def test_download_hosts_allowed(url):
    assert protocol.check_download_url(url, own_base_url="http://127.0.0.1:8765") == url


@pytest.mark.parametrize(
    "url",
    [
        "http://cdn.noedgeai.com/abc_0.jpg",  # https only
        "https://evil.example/convert_md_none.zip",
        "https://noedgeai.com.evil.example/x",
        "https://evilnoedgeai.com/x",
        "https://cdn.noedgeai.com:8443/x",
        "http://127.0.0.1:9999/x",  # the own host, another port
        "https://127.0.0.1:8765/x",  # the own host, another scheme
        "http://169.254.169.254/latest/meta-data",
        "https://user:pw@cdn.noedgeai.com/x",
        "file:///etc/passwd",
        12,
    ],
)
def test_download_hosts_refused(url):
    with pytest.raises(Doc2XInputError) as caught:
        protocol.check_download_url(url, own_base_url="http://127.0.0.1:8765")
    assert caught.value.code == "download_refused"


@pytest.mark.parametrize("status", [408, 429, 503])
def test_a_put_the_store_asks_to_retry_later_carries_its_retry_after(status):
    """The store's ``Retry-After`` on a failed PUT reaches the back-off as its floor."""
    answer = protocol.Doc2XAnswer(status, b"", headers={"retry-after": "7"})
    with pytest.raises(Doc2XTransientError) as caught:
        protocol.read_put_answer(answer, url="https://store.example/put?sig=x", uid="u-1", source="a.pdf")
    assert caught.value.code == "upload_failed" and caught.value.retry_after == 7.0
