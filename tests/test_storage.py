"""A storage call that fails is retried, then named; an answer about the object is raised at once."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

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


LOCAL_FILES_IN_A_FRESH_PROCESS = """
import json, sys
from airflow_provider_doc2x.storage.listing import list_images
from airflow_provider_doc2x.storage.objects import storage_path

found = list_images(sys.argv[1])
path = storage_path(found[0])
print(json.dumps({
    "found": len(found),
    "read": len(path.read_bytes()),
    "filesystem": type(path.fs).__name__,
    "loaded": sorted(name for name in ("boto3", "botocore", "s3fs", "gcsfs", "adlfs") if name in sys.modules),
}))
"""


def test_local_files_are_read_without_loading_every_providers_filesystem(tmp_path):
    """A task that reads local files does not import the object stores' clients (0.4 s per task)."""
    pytest.importorskip("airflow.providers.amazon", reason="the Amazon provider is what loads boto3")
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" if name.endswith("png") else b"\xff\xd8\xff")
    done = subprocess.run(
        [sys.executable, "-c", LOCAL_FILES_IN_A_FRESH_PROCESS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"found": 2, "read": 8, "filesystem": "LocalFileSystem", "loaded": []}


def test_a_file_store_attached_before_is_kept():
    """Whoever attached a store for ``file`` first (Airflow, the user) keeps it."""
    try:
        from airflow.sdk.io import attach
    except ImportError:  # Airflow 2.11
        from airflow.io.store import attach
    store = attach(protocol="file")
    storage.attach_local_filesystem()
    assert attach(protocol="file") is store
    assert storage.storage_path("/tmp").fs is store.fs
