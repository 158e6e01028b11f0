"""
Property tests of the protocol readers: whatever bytes or JSON a server sends, an answer either
reads into the provider's types or raises a Doc2XError subclass, and the key never reaches a message.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XProtocolError

KEY = "sk-property-0123456789"
SECRETS = (KEY, f"Bearer {KEY}")
FIELDS = ["uid", "status", "progress", "detail", "result", "pages", "page_idx", "page_width", "page_height"]
FIELDS += ["md", "url", "convert_zip", "code", "msg", "data", "score", "version"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from([KEY, f"Bearer {KEY}", "success", "processing", "failed", "parse_error", "a\nb"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=25,
)
data_objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
answers = st.builds(
    protocol.Doc2XAnswer,
    http_status=st.sampled_from([200, 201, 301, 400, 401, 403, 404, 429, 500, 502, 503]),
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda value: json.dumps(value, default=str).encode()),
        st.builds(
            lambda code, data, msg: json.dumps({"code": code, "data": data, "msg": msg}).encode(),
            st.sampled_from(["success", "parse_error", "unauthorized", "no_such_code"]) | scalars,
            json_values,
            scalars,
        ),
    ),
    headers=st.dictionaries(
        st.sampled_from(["retry-after", "trace-id", "content-type"]), st.text(max_size=30), max_size=3
    ),
)
REQUESTS = [protocol.status_request("a-uid"), protocol.submit_request(b"\xff\xd8\xff", source="a.jpg")]
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read_or_typed_error(read, *args: Any, **kwargs: Any) -> Any:
    """Call a reader; it must return, or raise a Doc2XError whose text holds no key."""
    try:
        return read(*args, **kwargs)
    except Doc2XError as error:
        outcome = error
    assert KEY not in str(outcome) and KEY not in repr(outcome)
    return outcome


@PROPERTY
@given(answer=answers, which=st.sampled_from(range(len(REQUESTS))))
def test_any_answer_reads_or_raises_a_typed_error(answer, which):
    data = read_or_typed_error(protocol.read_answer, REQUESTS[which], answer, secrets=SECRETS)
    assert isinstance(data, (dict, Doc2XError))


@PROPERTY
@given(data=data_objects)
def test_any_status_data_reads_or_raises_a_typed_error(data):
    status = read_or_typed_error(protocol.read_status, "a-uid", data, secrets=SECRETS)
    if isinstance(status, protocol.Doc2XJobStatus):
        assert status.detail is None or KEY not in status.detail
        assert status.progress is None or 0 <= status.progress <= 100
        if status.status == protocol.STATUS_FAILED:
            assert KEY not in str(status.failure())


@PROPERTY
@given(data=data_objects)
def test_any_result_or_uid_data_reads_or_raises_a_typed_error(data):
    read_or_typed_error(protocol.read_result, data, uid="a-uid")
    read_or_typed_error(protocol.read_uid, REQUESTS[1], data)


@PROPERTY
@given(data=data_objects)
def test_any_pdf_data_reads_or_raises_a_typed_error(data):
    read_or_typed_error(protocol.read_pdf_status, "a-uid", data, secrets=SECRETS)
    read_or_typed_error(protocol.read_preupload, data)
    read_or_typed_error(protocol.read_export, "a-uid", data)


@PROPERTY
@given(text=st.text(max_size=200), padding=st.text(max_size=20))
def test_redaction_removes_the_key_from_any_text(text, padding):
    for form in (KEY, f"Bearer {KEY}", f"bearer   {KEY}", f"Authorization: Bearer {KEY}"):
        assert KEY not in protocol.redact(padding + form + text, SECRETS)
    assert KEY not in protocol.quote(text + KEY + padding, SECRETS)


def test_json_nested_far_too_deep_is_not_json():
    body = b'{"code": "success", "data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    error = read_or_typed_error(protocol.read_answer, REQUESTS[0], protocol.Doc2XAnswer(200, body, {}))
    assert isinstance(error, Doc2XError)


def test_a_result_answered_with_another_jobs_uid_is_refused():
    """A status answer carrying another job's result (a cache that ignores the query) is never taken."""
    answer = {"status": "success", "uid": "job-b", "result": {"pages": [{"md": "# Not mine", "page_idx": 0}]}}
    with pytest.raises(Doc2XProtocolError, match="job-b") as refused:
        protocol.read_status("job-a", answer)
    assert refused.value.uid == "job-a"
    assert protocol.read_status("job-b", answer).result.pages[0].md == "# Not mine"
