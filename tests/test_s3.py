"""
``s3://`` through a real S3 API: moto's server behind a proxy that logs every request and injects
faults (``tests/helpers/s3.py``), used through ObjectStoragePath, s3fs and the Amazon provider as a
user's paths are. What is asserted is what S3 saw (the proxy's log) and what the user gets.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from airflow_provider_doc2x import storage
from airflow_provider_doc2x.exceptions import Doc2XInputError, Doc2XStorageError, is_permanent
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.sources import ImageSource, check_all
from tests.helpers import parse_operator, run_deferred
from tests.helpers import s3 as s3_api

s3_server, s3 = s3_api.s3_server, s3_api.s3  # the fixtures

#: A type check reads 16 bytes; a GET for more than this is a read-ahead of the object.
SMALL_RANGE = 64 * 1024


def storage_path(uri: str):
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    return ObjectStoragePath(uri)


def put(s3, key: str, data: bytes) -> str:
    """Put an object beside the code under test (not logged); returns its plain ``s3://`` URI."""
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)
    s3.proxy.clear()
    return s3.url(key)


def big_png() -> bytes:
    """3 MB that start as a PNG does: what the type check reads is the first 16 bytes."""
    return b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + os.urandom(3 * 1024 * 1024)


@pytest.fixture
def fast_storage_retries(monkeypatch):
    """The provider's own back-off off, and two tries (s3fs still retries five times inside each)."""
    monkeypatch.setattr(storage, "STORAGE_WAIT_INITIAL", 0.0)
    monkeypatch.setattr(storage, "STORAGE_TRIES", 2)


@pytest.mark.parametrize("conn_id", [None, "aws_default"], ids=["boto-default-chain", "aws_default"])
def test_an_object_is_written_and_read_through_s3(s3, conn_id):
    path = storage_path(s3.url("notes/hello.txt", conn_id=conn_id))
    path.write_text("hello, S3")
    assert storage_path(s3.url("notes/hello.txt", conn_id=conn_id)).read_text() == "hello, S3"
    assert s3.objects() == ["notes/hello.txt"]
    puts = s3.proxy.requests("PUT", r"/notes/hello\.txt$")
    gets = s3.proxy.requests("GET", r"/notes/hello\.txt$")
    assert [request.path for request in puts] == [f"/{s3.bucket}/notes/hello.txt"]
    assert [request.status for request in puts] == [200]
    assert gets and all(request.status in (200, 206) for request in gets)


def test_the_type_check_asks_for_a_small_range(s3):
    uri = put(s3, "scans/big.png", big_png())
    check_all([ImageSource.of(uri)])
    gets = s3.proxy.requests("GET", r"/scans/big\.png$")
    assert gets, "the check read the image's first bytes"
    for request in gets:
        bounds = request.range_bounds()
        assert bounds is not None, f"a GET of the whole object: {request}"
        assert bounds[1] is not None and bounds[1] < SMALL_RANGE, f"a read-ahead: {request}"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_lasting_503_on_a_source_is_retryable_and_names_the_image(s3, fast_storage_retries, method):
    good = put(s3, "src/f000.png", render(Page(title="Good"), size=(200, 150)))
    throttled = put(s3, "src/f001.png", render(Page(title="Throttled"), size=(200, 150)))
    s3.proxy.slow_down(method, r"/src/f001\.png$", times=None)
    with pytest.raises(Doc2XStorageError) as caught:
        check_all([ImageSource.of(good), ImageSource.of(throttled)])
    assert not isinstance(caught.value, Doc2XInputError)
    assert not is_permanent(caught.value)  # Airflow retries the task
    assert throttled in str(caught.value)
    answers = [request.status for request in s3.proxy.requests(method, r"/src/f001\.png$")]
    assert len(answers) >= storage.STORAGE_TRIES and set(answers) == {503}


def test_a_503_that_passes_is_retried_and_the_image_checked(s3, fast_storage_retries):
    uri = put(s3, "src/f001.png", render(Page(title="Throttled"), size=(200, 150)))
    # More than s3fs's own five tries: the provider's retry is what gets through.
    s3.proxy.slow_down("GET", r"/src/f001\.png$", times=6)
    check_all([ImageSource.of(uri)])
    answers = [request.status for request in s3.proxy.requests("GET", r"/src/f001\.png$")]
    assert answers == [503] * 6 + [206]


def test_a_missing_source_on_s3_is_still_an_input_error(s3):
    with pytest.raises(Doc2XInputError, match="does not exist or is not a file"):
        check_all([ImageSource.of(s3.url("src/missing.png"))])


@pytest.mark.parametrize("deferrable", [True, False])
def test_the_operator_parses_s3_images_into_s3_and_a_second_run_bills_nothing(doc2x, s3, deferrable):
    titles = {"f000.png": "First Page", "f001.png": "Second Page"}
    images = [
        put(s3, f"scans/{name}", render(Page(title=title), size=(400, 300))) for name, title in titles.items()
    ]
    output = s3.url("lake/doc2x", conn_id="aws_default")

    op = parse_operator(images, deferrable=deferrable, output_path=output)
    records = run_deferred(op, {}) if deferrable else op.execute({})
    assert [record["source"] for record in records] == images
    for record, title in zip(records, titles.values(), strict=True):
        assert record["markdown_path"].startswith("s3://")
        assert storage_path(record["markdown_path"]).read_text().startswith(f"# {title}")
    assert doc2x.stats()["billed_total"] == 2
    assert any(key.startswith("lake/doc2x/") for key in s3.objects())
    assert s3.proxy.requests("PUT", r"/lake/doc2x/")  # the results went through the S3 API

    again = parse_operator(images, deferrable=deferrable, output_path=output).execute({})
    assert [record["cached"] for record in again] == [True, True]
    assert doc2x.stats()["billed_total"] == 2


@pytest.mark.parametrize(
    ("count", "listed_first"),
    [(64, False), (2, True)],
    ids=["folder-listed-for-fingerprints", "folder-listed-by-list_images"],
)
def test_an_image_replaced_after_its_folder_was_listed_in_this_process_is_parsed_again(
    doc2x, s3, count, listed_first
):
    """Fingerprints come from S3, never from s3fs's in-process listing cache."""
    from airflow_provider_doc2x.listing import list_images

    images = [
        put(s3, f"scans/f{i:03d}.png", render(Page(title=f"Page {i}"), size=(200, 150))) for i in range(count)
    ]
    output = s3.url("lake", conn_id="aws_default")
    first = parse_operator(
        images, output_path=output, incremental=True, deferrable=False, method="pdf"
    ).execute({})
    if listed_first:
        assert len(list_images(s3.url("scans/"))) == count

    replaced = render(Page(title="Replaced Page"), size=(300, 200))
    put(s3, "scans/f000.png", replaced)
    again = parse_operator(
        images, output_path=output, incremental=True, deferrable=False, method="pdf"
    ).execute({})
    assert again[0]["cached"] is False
    assert again[0]["sha256"] == hashlib.sha256(replaced).hexdigest() != first[0]["sha256"]
    assert "300x200" in storage_path(again[0]["markdown_path"]).read_text()
    assert all(record["cached"] for record in again[1:])
    assert doc2x.stats()["pdf_pages_billed"] == count + 1


def test_a_new_image_result_costs_no_bucket_head_and_a_missing_sidecar_one_get(doc2x, s3):
    """Folders are only key prefixes on S3 (no mkdir), and a sidecar is probed with one GET."""
    image = put(s3, "scans/f000.png", render(Page(title="First Page"), size=(400, 300)))
    (record,) = parse_operator(
        [image], output_path=s3.url("lake", conn_id="aws_default"), deferrable=False
    ).execute({})
    assert record["cached"] is False
    assert s3.proxy.requests("HEAD", rf"^/{s3.bucket}/?$") == []  # no mkdir
    sidecar = r"/lake/f000-[0-9a-f]{12}/f000\.json"
    assert [request.status for request in s3.proxy.requests("GET", sidecar + "$")] == [404]
    assert s3.proxy.requests("HEAD", sidecar + "$") == []
    listings = [request.query for request in s3.proxy.requests("GET", query="list-type")]
    assert not [query for query in listings if ".json" in query]  # no LIST after a missing sidecar
    assert len([query for query in listings if "prefix=lake%2F&" in query]) == 1  # the root, once
