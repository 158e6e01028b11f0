"""The local Doc2X server answers as the API notes say (raw HTTP, no provider code in between)."""

from __future__ import annotations

import httpx
import pytest

from airflow_provider_doc2x import protocol
from tests.conftest import API_KEY
from tests.waiting import wait_until

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
    doc2x.configure(processing_time=0.2, result_ttl=0.6)
    uid = submit(doc2x, make_image(title="Lifecycle").read_bytes()).json()["data"]["uid"]
    first = status(doc2x, uid)
    assert first["data"]["status"] == "processing"
    assert 0 <= first["data"]["progress"] < 100
    done = wait_until(lambda: (answer := status(doc2x, uid))["data"]["status"] == "success" and answer)
    page = done["data"]["result"]["pages"][0]
    assert set(page) == {"url", "page_idx", "page_width", "page_height", "md"}
    assert done["data"]["convert_zip"] is None
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
