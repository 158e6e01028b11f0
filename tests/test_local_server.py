"""The local Doc2X server answers as the API notes say (raw HTTP, no provider code in between)."""

from __future__ import annotations

import hashlib
import io
import random
import socket
from concurrent.futures import Future, ThreadPoolExecutor

import httpcore
import httpx
import pytest
from PIL import Image

from airflow_provider_doc2x import protocol
from tests.helpers import API_KEY, STILL_PROCESSING, wait_until

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def submit(doc2x, body: bytes, headers=AUTH) -> httpx.Response:
    return doc2x.client.post(protocol.SUBMIT_PATH, content=body, headers=headers)


def status(doc2x, uid: str) -> dict:
    return doc2x.client.get(protocol.STATUS_PATH, params={"uid": uid}, headers=AUTH).json()


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-other"}, {"Authorization": "Basic abc"}]
)
def test_bad_or_missing_key_is_401_unauthorized(doc2x, make_image, headers):
    answer = submit(doc2x, make_image().read_bytes(), headers=headers)
    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthorized"
    assert doc2x.stats()["billed_total"] == 0


def test_every_answer_has_a_trace_id(doc2x):
    assert doc2x.client.get(protocol.STATUS_PATH, params={"uid": "x"}, headers=AUTH).headers["trace-id"]


def test_async_job_lifecycle_and_expiry(doc2x, make_image):
    doc2x.configure(processing_time=STILL_PROCESSING, result_ttl=STILL_PROCESSING)
    uid = submit(doc2x, make_image(title="Lifecycle").read_bytes()).json()["data"]["uid"]
    first = status(doc2x, uid)
    assert first["data"]["status"] == "processing"
    assert 0 <= first["data"]["progress"] < 100
    doc2x.configure(processing_time=0)
    done = wait_until(lambda: (answer := status(doc2x, uid))["data"]["status"] == "success" and answer)
    page = done["data"]["result"]["pages"][0]
    assert set(page) == {"url", "page_idx", "page_width", "page_height", "md"}
    assert done["data"]["convert_zip"] is None
    doc2x.configure(result_ttl=0)
    expired = wait_until(lambda: (answer := status(doc2x, uid))["code"] != "success" and answer)
    assert expired["code"] == "parse_status_not_found"


def test_rate_limit_is_429_with_retry_after(doc2x, make_image):
    doc2x.configure(rate_limit=1, rate_window=30)
    image = make_image().read_bytes()
    assert submit(doc2x, image).status_code == 200
    limited = submit(doc2x, image)
    assert limited.status_code == 429
    assert limited.json()["code"] == "request_limit_exceeded"
    assert 0 < float(limited.headers["retry-after"]) <= 30
    assert doc2x.stats()["billed_total"] == 1


def test_quota_runs_out(doc2x, make_image):
    doc2x.configure(quota=1)
    assert submit(doc2x, make_image().read_bytes()).json()["code"] == "success"
    assert submit(doc2x, make_image().read_bytes()).json()["code"] == "parse_quota_limit"


def test_injected_5xx_are_html_and_seeded(doc2x):
    doc2x.configure(error_rate=0.5, seed=7)
    codes = [
        doc2x.client.get(protocol.STATUS_PATH, params={"uid": "x"}, headers=AUTH).status_code
        for _ in range(40)
    ]
    assert 10 < codes.count(502) < 30
    doc2x.configure(seed=7)
    again = [
        doc2x.client.get(protocol.STATUS_PATH, params={"uid": "x"}, headers=AUTH).status_code
        for _ in range(40)
    ]
    assert again == codes


def test_unknown_knob_is_refused(doc2x):
    answer = doc2x.client.post("/local/config", json={"speed": "ludicrous"})
    assert answer.status_code == 400
    assert "speed" in answer.json()["error"]


# A slow, flaky link: uploads paced by upload_seconds/upload_bandwidth, and connections reset mid-upload


def big_png(side: int = 1000) -> bytes:
    """A valid PNG of about 3 MB (uncompressed noise): more than a small send buffer holds."""
    picture = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=0)
    return out.getvalue()


def os_error(error: BaseException | None) -> BaseException | None:
    """The operating system's error under an httpx or httpcore one."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def upload_in_thread(doc2x, pool: ThreadPoolExecutor, body: bytes) -> Future[httpx.Response]:
    """Submit from another thread, on a connection of its own."""

    def send() -> httpx.Response:
        with httpx.Client(base_url=doc2x.url, timeout=60) as client:
            return client.post(protocol.SUBMIT_PATH, content=body, headers=AUTH)

    return pool.submit(send)


def test_slow_uploads_overlap(doc2x, make_image):
    doc2x.configure(upload_seconds=60)  # released below, once both are seen arriving
    with ThreadPoolExecutor(2) as pool:
        answers = [upload_in_thread(doc2x, pool, make_image().read_bytes()) for _ in range(2)]
        wait_until(lambda: doc2x.stats()["uploads_in_flight"] == 2, message="two uploads arriving at once")
        assert doc2x.stats()["billed_total"] == 0  # billed once the body has arrived, not before
        doc2x.configure(upload_seconds=0)
        assert [answer.result().json()["code"] for answer in answers] == ["success", "success"]
    stats = doc2x.stats()
    assert stats["max_uploads_in_flight"] == 2
    assert stats["uploads_in_flight"] == 0
    assert stats["billed_total"] == 2


def test_upload_enters_the_rate_window_when_its_body_has_arrived(doc2x, make_image):
    doc2x.configure(rate_limit=1, rate_window=30, upload_bandwidth=100_000)  # 3 MB: 30 s
    with ThreadPoolExecutor(1) as pool:
        slow = upload_in_thread(doc2x, pool, big_png())
        wait_until(lambda: doc2x.stats()["uploads_in_flight"] == 1, message="the big upload arriving")
        small = make_image().read_bytes()
        assert submit(doc2x, small).json()["code"] == "success"  # started later, arrived first
        doc2x.configure(upload_bandwidth=0)
        refused = slow.result()
    assert refused.status_code == 429
    assert refused.json()["code"] == "request_limit_exceeded"
    stats = doc2x.stats()
    assert stats["billed"] == {hashlib.sha256(small).hexdigest(): 1}  # the 429 is not billed
    assert stats["rate_limited"] == 1


def test_reset_while_the_client_sends(doc2x, make_image):
    doc2x.configure(reset_next_uploads=1, reset_after_bytes=65536, rate_limit=1, rate_window=30)
    body = big_png()
    failed_sends = []

    def trace(event: str, info: dict) -> None:
        if event == "http11.send_request_body.failed":
            failed_sends.append(info["exception"])

    # A send buffer of its own size, so that most of the 3 MB is still to send when the reset comes.
    small_buffer = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)])
    with (
        httpx.Client(base_url=doc2x.url, transport=small_buffer, timeout=30) as client,
        pytest.raises(httpx.RemoteProtocolError, match="without sending a response"),
    ):
        client.post(protocol.SUBMIT_PATH, content=body, headers=AUTH, extensions={"trace": trace})
    # httpcore swallows the write error and reads on; the trace shows the send that failed.
    [write_error] = failed_sends
    assert isinstance(write_error, httpcore.WriteError)
    assert isinstance(os_error(write_error), (ConnectionResetError, BrokenPipeError))
    stats = doc2x.stats()
    assert stats["uploads_reset"] == 1
    assert stats["billed_total"] == 0
    assert stats["uploads_in_flight"] == 0
    # Only the next one was cut, and it did not take the rate window's one place.
    assert submit(doc2x, make_image().read_bytes()).json()["code"] == "success"
    assert doc2x.stats()["uploads_reset"] == 1


def test_reset_after_a_small_body_is_a_reset_read(doc2x, make_image):
    doc2x.configure(reset_next_uploads=1)
    with pytest.raises(httpx.ReadError) as caught:  # all sent; the answer never comes
        submit(doc2x, make_image().read_bytes())
    assert isinstance(os_error(caught.value), ConnectionResetError)
    assert doc2x.stats()["uploads_reset"] == 1
    assert doc2x.stats()["billed_total"] == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "parse_file_invalid"),
        (b"GIF89a" + b"\0" * 20, "parse_file_not_image"),
        (b"\xff\xd8\xff" + b"\0" * (protocol.MAX_IMAGE_BYTES + 1), "parse_file_too_large"),
    ],
)
def test_the_server_refuses_what_the_api_refuses(doc2x, body, code):
    """The local server's own checks, for clients that skip ours (raw HTTP)."""
    answer = submit(doc2x, body)
    assert answer.json()["code"] == code
    assert doc2x.stats()["billed_total"] == 0


# An echoing server (echo_key): every error quotes the Authorization header it received


def failing_image() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 200), "white").save(
        out, format="JPEG", comment=b"<!-- doc2x-fail: parse_error -->"
    )
    return out.getvalue()


def error_texts(doc2x, make_image) -> list[str]:
    """The texts of a 401, a refused image, a failed job, a gateway's 503 and an unknown route."""
    doc2x.configure(processing_time=0)
    texts = [submit(doc2x, make_image().read_bytes(), headers={"Authorization": "Bearer sk-wrong-9876"}).text]
    texts.append(submit(doc2x, b"GIF89a" + b"\0" * 20).text)
    uid = submit(doc2x, failing_image()).json()["data"]["uid"]
    failed = wait_until(lambda: (answer := status(doc2x, uid))["code"] != "success" and answer)
    texts.append(failed["msg"])
    doc2x.configure(fail_next=1)
    gateway = doc2x.client.get(protocol.STATUS_PATH, params={"uid": uid}, headers=AUTH)
    assert gateway.status_code == 503
    texts.append(gateway.text)
    texts.append(doc2x.client.get("/api/v2/nowhere", headers=AUTH).text)
    return texts


def test_an_echoing_server_quotes_the_authorization_header_in_every_error(doc2x, make_image):
    texts = error_texts(doc2x, make_image)
    assert not any("sk-" in text for text in texts), texts  # the control: off by default
    doc2x.configure(echo_key=True)
    texts = error_texts(doc2x, make_image)
    assert "Bearer sk-wrong-9876" in texts[0]
    assert all(f"Bearer {API_KEY}" in text for text in texts[1:]), texts
    assert submit(doc2x, make_image().read_bytes()).json()["code"] == "success"  # answers stay as they were
    doc2x.reset()
    assert doc2x.client.get("/local/config").json()["echo_key"] is False


def test_echo_key_from_the_command_line_and_keys_learnt_by_a_server_that_accepts_any():
    """``--echo-key`` (``LocalServerProcess(echo_key=True)``); without ``--api-key`` the server still
    finds on its keyless routes the keys it accepted."""
    from airflow_provider_doc2x.local.process import LocalServerProcess

    with LocalServerProcess(echo_key=True) as server:
        assert server.client.get("/local/config").json()["echo_key"] is True
        key = {"Authorization": "Bearer sk-learnt-4567"}
        answer = server.client.get(protocol.STATUS_PATH, params={"uid": "x"}, headers=key)
        assert answer.json()["msg"].endswith("(Authorization: Bearer sk-learnt-4567)")
        url = server.client.post("/api/v2/parse/preupload", headers=key).json()["data"]["url"]
        assert httpx.put(url, content=b"%PDF-", headers={"X-Token": "sk-learnt-4567"}).status_code == 200
        assert server.stats()["keyless_routes"]["put"] == {"requests": 1, "with_authorization": 1}
