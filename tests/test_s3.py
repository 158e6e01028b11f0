"""
``s3://`` through a real S3 API: moto's server behind a proxy that logs every request and injects
faults (``tests/helpers/s3.py``), used through ObjectStoragePath, s3fs and the Amazon provider as a
user's paths are. What is asserted is what S3 saw (the proxy's log) and what the user gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import re
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from airflow_provider_doc2x.documents.formats import HEAD_BYTES
from airflow_provider_doc2x.exceptions import Doc2XInputError, Doc2XStorageError, is_permanent
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.storage import objects as storage
from airflow_provider_doc2x.storage.manifest import shard_of, source_key
from airflow_provider_doc2x.storage.sources import ImageSource, check_all
from tests.helpers import REPO, first_event, parse_operator, run_deferred, wait_until
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
    from airflow_provider_doc2x.storage.listing import list_images

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


# -- the PDF lane, and two writers at once ------------------------------------------------------------


@pytest.fixture
def pdf_doc2x(doc2x, monkeypatch):
    """The local server with PDF tasks picked up and parsed at once; no presigned url remembered from another test."""
    from airflow_provider_doc2x.pdf import submission as pdf_submission

    doc2x.configure(pickup_delay=0, pdf_page_seconds=0, export_seconds=0)
    monkeypatch.setattr(pdf_submission, "_used_urls", pdf_submission._UsedUrls())
    return doc2x


def jpeg(title: str) -> bytes:
    """A page with a known title, as a JPEG: the local server bills a PDF page by the sha256 of its JPEG."""
    return render(Page(title=title), fmt="JPEG", size=(320, 240))


def run_to_the_end(op_factory, context=None):
    """A task to its end, as Airflow runs it: each resume is a new operator (a new process holds nothing)."""
    from airflow.providers.common.compat.sdk import TaskDeferred

    context = {} if context is None else context
    try:
        return op_factory().execute(context)
    except TaskDeferred as deferred:
        pending = deferred
    while True:
        event = asyncio.run(first_event(pending.trigger))
        try:
            return getattr(op_factory(), pending.method_name)(context, event)
        except TaskDeferred as again:
            pending = again


def result_folders(s3, prefix: str) -> dict[str, set[str]]:
    """The result folders under ``prefix`` (the manifest's folder aside), each with its files."""
    folders: dict[str, set[str]] = {}
    for key in s3.objects(prefix):
        rest = key[len(prefix) :]
        if rest.startswith("_manifest/"):
            continue
        folder, _, name = rest.partition("/")
        folders.setdefault(folder, set()).add(name)
    return folders


def assert_each_folder_holds_its_own_image(
    s3, prefix: str, contents: dict[str, bytes], titles: dict[str, str]
):
    """Every result folder's sidecar names one of the images, with that image's sha256, name and Markdown."""
    client = s3.direct_client()
    folders = result_folders(s3, prefix)
    assert folders, "no result was written"
    for folder, names in folders.items():
        stem = folder.rsplit("-", 1)[0]
        assert f"{stem}.json" in names, f"{folder} has no sidecar: {sorted(names)}"
        body = client.get_object(Bucket=s3.bucket, Key=f"{prefix}{folder}/{stem}.json")["Body"].read()
        meta = json.loads(body)
        source = meta["source"]
        assert source_key(source) in contents, f"{folder} holds the result of {source}, no image of the run"
        digest = hashlib.sha256(contents[source_key(source)]).hexdigest()
        assert meta["sha256"] == digest, f"{folder}'s sidecar records another content than {source}'s"
        assert folder == f"{posixpath.splitext(posixpath.basename(source))[0]}-{digest[:12]}"
        markdown = client.get_object(Bucket=s3.bucket, Key=f"{prefix}{folder}/{meta['markdown']}")
        assert markdown["Body"].read().decode().startswith(f"# {titles[source_key(source)]}")


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "in-the-worker"])
def test_the_pdf_lane_parses_s3_images_into_s3_once_through_503s_and_stages_only_privately(
    pdf_doc2x, s3, fast_storage_retries, monkeypatch, tmp_path, deferrable
):
    """Sources and results on S3, ``incremental``: 503s that pass bill nothing twice, and a re-run reads nothing.

    Remote images are copied into a temporary folder of the worker's while the task runs: owner
    only, and gone at the end. Nothing is staged in the bucket.
    """
    staging = tmp_path / "worker-tmp"
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    monkeypatch.setattr(tempfile, "tempdir", None)  # the worker's TMPDIR, read again

    titles = {f"scans/f{i:03d}.jpg": f"Scan Number {i}" for i in range(6)}
    contents = {key: jpeg(title) for key, title in titles.items()}
    contents["scans/copy-of-f000.jpg"] = contents["scans/f000.jpg"]  # the same content: one page billed
    titles["scans/copy-of-f000.jpg"] = titles["scans/f000.jpg"]
    images = [put(s3, key, data) for key, data in contents.items()]
    contents = {s3.url(key): data for key, data in contents.items()}
    titles = {s3.url(key): title for key, title in titles.items()}
    output = s3.url("lake", conn_id="aws_default")

    faults = [
        s3.proxy.slow_down("GET", r"/scans/f001\.jpg$", times=3),
        # More than s3fs's own five tries: the provider's retry of the read is what gets through.
        s3.proxy.slow_down("GET", r"/scans/f002\.jpg$", times=6),
        s3.proxy.slow_down("PUT", r"/lake/f003-[0-9a-f]{12}/f003\.md$", times=3),
        s3.proxy.slow_down("PUT", r"/lake/f004-[0-9a-f]{12}/f004\.json$", times=2),
        s3.proxy.slow_down("PUT", r"/lake/_manifest/", times=2),
    ]
    # The last image's reads wait a moment: the lane's copy of it is caught in the act (below).
    s3.proxy.delay("GET", r"/scans/f005\.jpg$", 1.0)

    def operator():
        return parse_operator(
            images, method="pdf", deferrable=deferrable, output_path=output, incremental=True
        )

    def copying_the_last_image():  # its check reads its first bytes (HEAD_BYTES); the copy reads it whole
        return [
            request
            for request in s3.proxy.requests("GET", r"/scans/f005\.jpg$")
            if (bounds := request.range_bounds()) is None or bounds[1] is None or bounds[1] >= HEAD_BYTES
        ]

    def staged_while_copying() -> dict:
        """The lane's folder and the copies in it, with their modes, while the last image is copied."""
        wait_until(copying_the_last_image, timeout=60, message="the PDF lane copying the last image")
        # Its thread took it after finishing an earlier image: that copy is in the folder.
        (folder,) = staging.glob("doc2x-pdf-lane-*")
        copies = wait_until(lambda: [path for path in folder.iterdir() if path.is_file()], message="a copy")
        return {path: stat.S_IMODE(path.stat().st_mode) for path in [folder, *copies]}

    with ThreadPoolExecutor(1) as pool:  # the task runs in this thread, as a worker runs it
        watching = pool.submit(staged_while_copying)
        records = run_to_the_end(operator)
        staged = watching.result()
    for path, mode in staged.items():
        assert mode & 0o077 == 0, f"{path} is open to others (mode {mode:o})"

    assert [record["source"] for record in records] == images
    for record in records:
        assert record["cached"] is False or record["source"].endswith("copy-of-f000.jpg")
        digest = hashlib.sha256(contents[record["source"]]).hexdigest()
        assert record["sha256"] == digest
        assert record["markdown_path"].startswith("s3://")
        assert storage_path(record["markdown_path"]).read_text().startswith(f"# {titles[record['source']]}")
    assert_each_folder_holds_its_own_image(s3, "lake/", contents, titles)
    stats = pdf_doc2x.stats()
    assert stats["pdf_pages_billed"] == 6 and stats["max_pdf_billed_per_page"] == 1
    assert stats["billed_total"] == 0  # nothing went through the image lane
    for rule in faults:
        assert rule.hits == rule.times, f"the fault was not injected: {rule}"
        answers = [request.status for request in s3.proxy.requests(rule.method, rule.path)]
        assert answers[: rule.times] == [503] * rule.times and answers[rule.times] in (200, 206), answers
    # Staged nowhere else: the bucket holds the images, their results and the manifest.
    for key in s3.objects():
        assert re.fullmatch(
            r"scans/[\w-]+\.jpg|lake/_manifest/v1/[\w.]+\.json|lake/[\w-]+-[0-9a-f]{12}/.+", key
        ), key
    assert list(staging.iterdir()) == [], "the PDF lane left files in the worker's temporary folder"

    s3.proxy.clear()
    again = run_to_the_end(operator)
    assert [record["cached"] for record in again] == [True] * len(images)
    assert [record["markdown_path"] for record in again] == [record["markdown_path"] for record in records]
    assert (
        pdf_doc2x.stats()["pdf_pages_billed"] == 6 and pdf_doc2x.stats()["preuploads"] == stats["preuploads"]
    )
    assert s3.proxy.requests("GET", r"/scans/") == []  # unchanged images are not read
    assert s3.proxy.requests("PUT") == []


@pytest.mark.parametrize("method", ["async", "pdf"], ids=["image-lane", "pdf-lane"])
def test_a_result_put_throttled_beyond_s3fs_s_own_tries_is_retried_and_the_paid_result_stored(
    pdf_doc2x, s3, fast_storage_retries, method
):
    """A result is paid for: a throttled write of it is tried again, as a throttled read is.

    s3fs gives up on a PUT after five ``503 SlowDown``; seven pass within the provider's retries
    (two tries of five here), and every image is stored, billed once.
    """
    images = [put(s3, f"scans/f{i:03d}.jpg", jpeg(f"Throttled Write {i}")) for i in range(3)]
    markdown = r"/lake/f001-[0-9a-f]{12}/f001\.md$"
    s3.proxy.slow_down("PUT", markdown, times=7)
    records = parse_operator(images, method=method, deferrable=False, output_path=s3.url("lake")).execute({})
    assert [record["cached"] for record in records] == [False] * 3
    assert storage_path(records[1]["markdown_path"]).read_text().startswith("# Throttled Write 1")
    assert [request.status for request in s3.proxy.requests("PUT", markdown)] == [503] * 7 + [200]
    stats = pdf_doc2x.stats()
    assert stats["pdf_pages_billed" if method == "pdf" else "billed_total"] == 3


def test_a_result_put_that_stays_throttled_fails_retryably_naming_the_object(
    pdf_doc2x, s3, fast_storage_retries
):
    images = [put(s3, f"scans/f{i:03d}.jpg", jpeg(f"Lasting Throttle {i}")) for i in range(2)]
    s3.proxy.slow_down("PUT", r"/lake/f001-[0-9a-f]{12}/f001\.md$", times=None)
    with pytest.raises(Doc2XStorageError) as caught:
        parse_operator(images, deferrable=False, output_path=s3.url("lake")).execute({})
    assert not is_permanent(caught.value)  # Airflow retries the task
    assert re.search(r"s3://[\w-]+/lake/f001-[0-9a-f]{12}/f001\.md", str(caught.value)), str(caught.value)


#: One task of the two writers, in a process of its own as a mapped task is: run to its end (each
#: resume a new operator, holding nothing of the first half), its records written to a file.
WRITER = """
import asyncio, json, sys
from airflow.providers.common.compat.sdk import TaskDeferred
from tests.helpers import first_event, parse_operator

args = json.loads(sys.argv[1])

def operator():
    return parse_operator(
        args["images"], method=args["method"], deferrable=True, output_path=args["output"], incremental=True
    )

try:
    records = operator().execute({})
except TaskDeferred as deferred:
    while True:
        event = asyncio.run(first_event(deferred.trigger))
        try:
            records = getattr(operator(), deferred.method_name)({}, event)
            break
        except TaskDeferred as again:
            deferred = again
with open(args["records"], "w") as handle:
    json.dump(records, handle)
"""


def names_in_one_shard(s3, count: int) -> list[str]:
    """Keys whose sources share one manifest shard: every writer's entries go to the same objects."""
    found: list[str] = []
    shard = None
    for number in range(100_000):
        key = f"scans/w{number:05d}.jpg"
        here = shard_of(source_key(s3.url(key)))
        shard = shard or here
        if here == shard:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("no such keys")


def manifest_objects(s3, prefix: str) -> tuple[dict[str, dict], set[str]]:
    """Every manifest object ever written under ``prefix`` (the bucket keeps versions), and those deleted."""
    client = s3.direct_client()
    pages = client.get_paginator("list_object_versions").paginate(Bucket=s3.bucket, Prefix=prefix)
    written: dict[str, dict] = {}
    deleted: set[str] = set()
    for page in pages:
        for version in page.get("Versions", []):
            body = client.get_object(Bucket=s3.bucket, Key=version["Key"], VersionId=version["VersionId"])
            written[version["Key"]] = json.loads(body["Body"].read())["entries"]
        deleted |= {marker["Key"] for marker in page.get("DeleteMarkers", [])}
    return written, deleted


@pytest.mark.parametrize("method", ["async", "pdf"], ids=["image-lane", "pdf-lane"])
def test_two_writers_at_once_lose_no_manifest_entry_and_confuse_no_result(pdf_doc2x, s3, tmp_path, method):
    """Two tasks (two processes) write results and manifest entries under one ``s3://`` output at once.

    Their images overlap in part; all of them fall in one manifest shard, so both fold the same
    objects. The proxy holds the two tasks' first manifest listings until both asked (they start
    from the same manifest), then their compactions' new objects until both write one, and their
    first deletes until both delete (their compactions overlap: neither has read the other's new
    object when it deletes), and slows manifest writes and listings. Afterwards no entry is lost (a
    third run bills nothing and reads no image), no result folder holds another image's result,
    and every manifest object deleted had been folded into an object written before the delete.
    An image both tasks hold may be billed by both (two tasks do not coordinate their uploads);
    the images of one task only are billed once.
    """
    s3.client().put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    shared, only_a, only_b = (lambda keys: (keys[:2], keys[2:5], keys[5:8]))(names_in_one_shard(s3, 8))
    keys = {
        "a": [*shared, *only_a, "scans/a/page.jpg"],  # page.jpg: one name in two folders, two contents
        "b": [*shared, *only_b, "scans/b/page.jpg"],
    }
    titles = {key: f"Writer Page {number}" for number, key in enumerate(sorted({*keys["a"], *keys["b"]}))}
    contents = {key: jpeg(title) for key, title in titles.items()}
    for key, data in contents.items():
        put(s3, key, data)
    contents = {s3.url(key): data for key, data in contents.items()}
    titles = {s3.url(key): title for key, title in titles.items()}
    output = s3.url("lake", conn_id="aws_default")
    manifest = f"^/{s3.bucket}/lake/_manifest/"

    listings = s3.proxy.hold("GET", rf"^/{s3.bucket}/?$", query="prefix=lake%2F_manifest", until=2)
    bases = s3.proxy.hold("PUT", manifest + r"v1/[0-9a-f]{2}\.base\.", until=2)
    deletes = s3.proxy.hold("DELETE", manifest, until=2)
    s3.proxy.delay("GET", rf"^/{s3.bucket}/?$", 0.3, query="prefix=lake%2F")
    s3.proxy.delay("PUT", manifest, 0.3)
    s3.proxy.delay("DELETE", manifest, 0.3)

    writers = {}
    for name in ("a", "b"):
        args = {
            "images": [s3.url(key) for key in keys[name]],
            "output": output,
            "method": method,
            "records": str(tmp_path / f"records-{name}.json"),
        }
        writers[name] = subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps(args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    outputs = {name: writer.communicate(timeout=240)[0] for name, writer in writers.items()}
    for name, writer in writers.items():
        assert writer.returncode == 0, f"writer {name} failed:\n{outputs[name][-4000:]}"
    assert listings.met, "the two tasks did not read the manifest at the same time"
    assert bases.met and deletes.met, "the two tasks' compactions did not overlap"

    for name in ("a", "b"):
        records = json.loads((tmp_path / f"records-{name}.json").read_text())
        assert [record["source"] for record in records] == [s3.url(key) for key in keys[name]]
        for record in records:
            assert record["sha256"] == hashlib.sha256(contents[record["source"]]).hexdigest()
            assert (
                storage_path(record["markdown_path"]).read_text().startswith(f"# {titles[record['source']]}")
            )
    assert_each_folder_holds_its_own_image(s3, "lake/", contents, titles)
    stats = pdf_doc2x.stats()
    billed = stats["pdf_billed"] if method == "pdf" else stats["billed"]
    for uri, data in contents.items():
        times = billed.get(hashlib.sha256(data).hexdigest(), 0)
        assert 1 <= times <= (2 if uri in {s3.url(key) for key in shared} else 1), (uri, times)

    # Nothing deleted that was not folded, before the delete, into an object written whole.
    log = s3.proxy.requests()
    written, deleted = manifest_objects(s3, "lake/_manifest/")
    assert deleted, "no compaction deleted anything"
    for gone in deleted:
        position = next(
            index
            for index, request in enumerate(log)
            if request.method == "DELETE" and request.path == f"/{s3.bucket}/{gone}" and request.status == 204
        )
        folded_into = [
            key
            for key, entries in written.items()
            if key != gone
            and any(
                request.method == "PUT" and request.path == f"/{s3.bucket}/{key}" and request.status == 200
                for request in log[:position]
            )
            and all(
                source in entries and entries[source]["at"] >= entry["at"]
                for source, entry in written[gone].items()
            )
        ]
        assert folded_into, f"{gone} was deleted before its entries were folded into another object"
    # No entry lost: each source's newest entry ever written is in an object that is still there.
    newest: dict[str, dict] = {}
    for entries in written.values():
        for source, entry in entries.items():
            if source not in newest or entry["at"] > newest[source]["at"]:
                newest[source] = entry
    kept = [entries for key, entries in written.items() if key not in deleted]
    for source, entry in newest.items():
        assert any(entries.get(source) == entry for entries in kept), f"the entry of {source} was lost"
        assert entry["status"] == "parsed" and entry["result"] is not None

    s3.proxy.clear()
    third = parse_operator(
        list(contents), method=method, deferrable=False, output_path=output, incremental=True
    ).execute({})
    assert [record["cached"] for record in third] == [True] * len(contents)
    assert (pdf_doc2x.stats()["pdf_billed"] if method == "pdf" else pdf_doc2x.stats()["billed"]) == billed
    assert s3.proxy.requests("GET", r"/scans/") == []  # no unchanged image read
