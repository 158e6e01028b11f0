"""A storage call that fails is retried, then named; an answer about the object is raised at once."""

from __future__ import annotations

import errno

import pytest

from airflow_provider_doc2x.exceptions import Doc2XStorageError, is_permanent
from airflow_provider_doc2x.storage import objects as storage


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(storage, "STORAGE_WAIT_INITIAL", 0.0)


def failing(times: int, error: OSError):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "answer"

    return call, calls


def test_a_failure_that_passes_is_retried():
    call, calls = failing(2, OSError(errno.EBUSY, "SlowDown"))
    assert storage.storage_call(call, what="reading", uri="s3://bucket/a.png") == "answer"
    assert len(calls) == 3


def test_a_failure_that_lasts_names_the_object_and_is_retryable():
    call, calls = failing(99, OSError(errno.EBUSY, "SlowDown"))
    with pytest.raises(Doc2XStorageError) as caught:
        storage.storage_call(call, what="reading", uri="s3://bucket/a.png", tries=3)
    assert len(calls) == 3
    assert "s3://bucket/a.png" in str(caught.value) and "SlowDown" in str(caught.value)
    assert caught.value.source == "s3://bucket/a.png"
    assert not is_permanent(caught.value)


@pytest.mark.parametrize("answer", [FileNotFoundError, PermissionError, IsADirectoryError])
def test_an_answer_about_the_object_is_raised_at_once(answer):
    call, calls = failing(99, answer("s3://bucket/a.png"))
    with pytest.raises(answer):
        storage.storage_call(call, what="reading", uri="s3://bucket/a.png")
    assert len(calls) == 1


def test_a_connection_error_of_the_s3_client_is_a_failure_not_an_answer():
    botocore = pytest.importorskip("botocore.exceptions")
    error = botocore.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    call, calls = failing(99, error)
    with pytest.raises(Doc2XStorageError, match=r"s3://bucket/a\.png"):
        storage.storage_call(call, what="reading", uri="s3://bucket/a.png", tries=2)
    assert len(calls) == 2


def test_any_other_exception_is_raised_unchanged():
    call, calls = failing(99, ValueError("not storage"))
    with pytest.raises(ValueError):
        storage.storage_call(call, what="reading", uri="s3://bucket/a.png")
    assert len(calls) == 1
