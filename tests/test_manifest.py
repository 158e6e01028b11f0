"""
The manifest: unchanged images are never opened, changed ones are parsed again, renamed duplicates
are not billed, a corrupt or missing manifest is rebuilt from the sidecars, and concurrent tasks
writing one manifest lose nothing.

Storage is ``memory://`` wrapped to count calls and bytes read per path (:class:`CountingFS`), so
"never opened" is a count, not a guess.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime, timezone

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.storage.manifest import (
    MANIFEST_DIR,
    Manifest,
    fingerprint,
    shard_of,
    source_key,
)
from airflow_provider_doc2x.storage.results import ResultStore
from airflow_provider_doc2x.storage.sources import ImageSource
from tests.helpers import REPO, first_event, parse_operator
from tests.helpers.storage import CountingFS, use_for_memory
from tests.helpers.storage_faults import FaultyFS, faulty_memory

LAKE = "memory://lake/doc2x"
MANIFEST = f"/lake/doc2x/{MANIFEST_DIR}/v1"


@pytest.fixture
def storage():
    """``memory://`` counted (and a plain ``memory://`` put back afterwards, as the rest of the suite uses)."""
    yield use_for_memory(CountingFS)
    use_for_memory(MemoryFileSystem)


@pytest.fixture
def inbox(storage, make_image):
    """Put a page into ``memory://inbox/NAME``; returns its URI."""

    def put(name: str, title: str | None = None) -> str:
        storage.pipe_file(f"/inbox/{name}", make_image(name, title or name).read_bytes())
        return f"memory://inbox/{name}"

    return put


def parse(images, *, deferrable=False, **kwargs):
    """
    One run of the incremental operator over these images, as a new task runs it; a deferred task
    resumes on a new operator, as it would in another process.
    """

    def operator():
        return parse_operator(images, output_path=LAKE, incremental=True, deferrable=deferrable, **kwargs)

    try:
        return operator().execute({})
    except TaskDeferred as deferred:
        event = asyncio.run(first_event(deferred.trigger))
        return getattr(operator(), deferred.method_name)({}, event)


def image_path(uri: str) -> str:
    """A ``memory://`` URI as the filesystem names it (both Airflow lines' spellings)."""
    return MemoryFileSystem._strip_protocol(uri)


# -- unchanged, changed, renamed -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "deferrable"),
    [("async", True), ("async", False), ("sync", False)],
    ids=["deferred", "worker", "sync"],
)
def test_unchanged_images_are_never_opened(doc2x, storage, inbox, method, deferrable):
    images = [inbox(f"page-{number}.png") for number in range(5)]
    first = parse(images, method=method, deferrable=deferrable)
    assert doc2x.stats()["billed_total"] == 5
    assert all(storage.opened[image_path(uri)] >= 1 for uri in images)

    storage.reset()
    second = parse(images, method=method, deferrable=deferrable)
    assert doc2x.stats()["billed_total"] == 5
    assert storage.opened_of("/inbox/") == 0  # not one image opened
    assert storage.read_of("/lake/doc2x/") == storage.read_of(MANIFEST)  # no sidecar read either
    assert [record["markdown_path"] for record in second] == [record["markdown_path"] for record in first]
    assert all(record["cached"] for record in second)
    assert [record["source"] for record in second] == images
    assert storage.calls["info"] == len(images)  # one metadata call per image, no more


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferred", "worker"])
def test_each_shard_holds_one_object_after_a_run(doc2x, storage, inbox, deferrable):
    """What a task read and then recorded leaves no superseded objects behind (compacted, or never written)."""
    images = [inbox(f"page-{number}.png") for number in range(6)]
    parse(images, deferrable=deferrable)
    assert len(manifest_objects(storage)) == len({shard_of(uri) for uri in images})
    assert all(entry.result for entry in Manifest(ResultStore(LAKE)).entries().values())


def test_a_folder_of_many_images_is_listed_once_instead_of_one_call_per_image(storage, inbox):
    images = [inbox(f"page-{number}.png") for number in range(3)]
    storage.reset()
    manifest = Manifest(ResultStore(LAKE), list_folder_at=2)
    taken = manifest.take_fingerprints([ImageSource.of(uri) for uri in images])
    assert set(taken) == set(images)
    assert storage.calls == Counter({"ls": 1})
    assert taken == Manifest(ResultStore(LAKE)).take_fingerprints([ImageSource.of(uri) for uri in images])


def test_a_changed_image_is_read_and_parsed_again(doc2x, storage, inbox):
    images = [inbox("a.png", "Before"), inbox("b.png"), inbox("c.png")]
    parse(images)
    before = fingerprint(storage.info("/inbox/a.png"))
    inbox("a.png", "After")  # rewritten in place
    assert fingerprint(storage.info("/inbox/a.png")) != before

    storage.reset()
    records = parse(images)
    assert doc2x.stats()["billed_total"] == 4
    assert storage.opened["/inbox/a.png"] >= 1
    assert storage.opened["/inbox/b.png"] == storage.opened["/inbox/c.png"] == 0
    assert records[0]["cached"] is False
    assert storage.cat_file(image_path(records[0]["markdown_path"])).startswith(b"# After")

    storage.reset()
    parse(images)  # and it is known again
    assert storage.opened_of("/inbox/") == 0
    assert doc2x.stats()["billed_total"] == 4


def test_a_renamed_duplicate_is_read_once_and_not_billed(doc2x, storage, inbox):
    original = inbox("scan.png", "Same Content")
    (first,) = parse([original])
    storage.pipe_file("/inbox/renamed.png", storage.cat_file("/inbox/scan.png"))
    renamed = "memory://inbox/renamed.png"

    storage.reset()
    records = parse([original, renamed])
    assert doc2x.stats()["billed_total"] == 1
    assert storage.opened["/inbox/scan.png"] == 0
    assert storage.opened["/inbox/renamed.png"] >= 1  # new to the manifest: read and hashed
    assert records[1]["cached"] is True
    assert records[1]["markdown_path"] == first["markdown_path"]
    assert records[1]["source"] == renamed

    storage.reset()
    parse([original, renamed])
    assert storage.opened_of("/inbox/") == 0


def test_identical_bytes_rewritten_are_read_once_not_billed_and_their_entry_renewed(doc2x, storage, inbox):
    """A ``touch`` (the same bytes, a new version token) costs one read, no billing, and the entry is renewed."""
    images = [inbox("touched.png", "Touched"), inbox("untouched.png")]
    first = parse(images)
    before = Manifest(ResultStore(LAKE)).entries()[images[0]]
    storage.pipe_file("/inbox/touched.png", storage.cat_file("/inbox/touched.png"))  # rewritten as it was
    touched = fingerprint(storage.info("/inbox/touched.png"))
    assert touched != before.fingerprint

    storage.reset()
    records = parse(images)
    assert doc2x.stats()["billed_total"] == 2
    assert storage.opened["/inbox/touched.png"] >= 1  # its fingerprint changed: read and hashed
    size = storage.info("/inbox/touched.png")["size"]
    assert storage.bytes_read["/inbox/touched.png"] < 2 * size  # its body downloaded once
    assert storage.opened["/inbox/untouched.png"] == 0
    assert records[0]["cached"] is True
    assert records[0]["markdown_path"] == first[0]["markdown_path"]
    renewed = Manifest(ResultStore(LAKE)).entries()[images[0]]
    assert (renewed.fingerprint, renewed.sha256, renewed.result) == (touched, before.sha256, before.result)

    storage.reset()
    again = parse(images)
    assert storage.opened_of("/inbox/") == 0  # known by its new fingerprint: not read at all
    assert [record["markdown_path"] for record in again] == [record["markdown_path"] for record in first]
    assert doc2x.stats()["billed_total"] == 2


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferred", "worker"])
def test_a_task_reads_only_the_manifest_shards_of_its_own_images(doc2x, storage, inbox, deferrable):
    """A mapped task over a few images of a large corpus reads their shards of the manifest, not the others."""
    corpus = [inbox(f"page-{number}.png") for number in range(24)]
    parse(corpus)
    written = {shard_of_object(name) for name in manifest_objects(storage)}
    own = corpus[:2]
    new = inbox("new.png")  # read, billed and recorded by the task: its shard is written too
    own_shards = {shard_of(source_key(uri)) for uri in (*own, new)}
    assert len(written - own_shards) >= 10  # many shards the task has no business reading

    storage.reset()
    records = parse([*own, new], deferrable=deferrable)
    assert [record["cached"] for record in records] == [True, True, False]
    read = {
        shard_of_object(path)
        for path in {*storage.opened, *storage.bytes_read}
        if path.startswith(MANIFEST + "/") and (storage.opened[path] or storage.bytes_read[path])
    }
    holding_its_entries = {shard_of(source_key(uri)) for uri in own}
    assert holding_its_entries <= read  # its own shards are read
    assert read <= own_shards, f"read the shards {sorted(read - own_shards)} of other images"
    assert doc2x.stats()["billed_total"] == 25


def shard_of_object(path: str) -> str:
    """The shard of a manifest object, from its name (``3f.delta.<stamp>.<id>.json``)."""
    return path.rsplit("/", 1)[1][:2]


def test_overwrite_parses_everything_again_and_keeps_the_manifest(doc2x, storage, inbox):
    images = [inbox("a.png"), inbox("b.png")]
    parse(images)
    parse(images, overwrite=True)
    assert doc2x.stats()["billed_total"] == 4
    storage.reset()
    parse(images)
    assert storage.opened_of("/inbox/") == 0
    assert doc2x.stats()["billed_total"] == 4


def test_a_resumed_task_in_a_new_process_records_what_its_first_half_read(doc2x, storage, inbox):
    """The second half of a deferred task runs on a new operator (another process): nothing is lost."""
    images = [inbox("a.png"), inbox("b.png")]
    parse([images[0]])
    with pytest.raises(TaskDeferred) as deferred:
        parse_operator(images, output_path=LAKE, incremental=True, deferrable=True).execute({})
    event = asyncio.run(first_event(deferred.value.trigger))
    resumed = parse_operator(images, output_path=LAKE, incremental=True, deferrable=True)
    storage.reset()
    records = resumed.execute_complete({}, event)
    assert [record["cached"] for record in records] == [True, False]
    assert storage.read_of("/lake/doc2x/a-") == 0  # the known result came from the manifest
    sidecar = json.loads(storage.cat_file(image_path(records[1]["sidecar_path"])))
    assert sidecar["source_fingerprint"] == fingerprint(storage.info("/inbox/b.png"))

    storage.reset()
    parse(images)
    assert storage.opened_of("/inbox/") == 0
    assert doc2x.stats()["billed_total"] == 2


# -- a manifest that is missing or not to be trusted ----------------------------------------------


def manifest_objects(storage) -> list[str]:
    return sorted(name for name in storage.store if name.startswith(MANIFEST + "/"))


def tamper_result(document: dict, **change) -> dict:
    for entry in document["entries"].values():
        folder = "a-" + entry["sha256"][:12]
        entry["result"] = {"folder": folder, "uid": "u", "markdown": "a.md", "figures": [], **change}
    return document


def tamper_folder(document: dict) -> dict:
    return tamper_result(
        document, folder="../../etc-" + next(iter(document["entries"].values()))["sha256"][:12]
    )


def tamper_figure(document: dict) -> dict:
    return tamper_result(document, figures=["../../outside.jpg"])


def tamper_sha(document: dict) -> dict:
    next(iter(document["entries"].values()))["sha256"] = "not-a-hash"
    return document


def wrong_shard(document: dict) -> dict:
    document["shard"] = "ff" if document["shard"] != "ff" else "00"
    return document


CORRUPTIONS = {
    "garbage": lambda data: b"\x00\xff not json",
    "truncated": lambda data: data[: len(data) // 2],
    "not an object": lambda data: b"[1, 2, 3]",
    "folder outside output_path": lambda data: json.dumps(tamper_folder(json.loads(data))).encode(),
    "figure outside its folder": lambda data: json.dumps(tamper_figure(json.loads(data))).encode(),
    "bad hash": lambda data: json.dumps(tamper_sha(json.loads(data))).encode(),
    "wrong shard": lambda data: json.dumps(wrong_shard(json.loads(data))).encode(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_manifest_is_rebuilt_from_the_sidecars_with_a_warning(
    doc2x, storage, inbox, caplog, corruption
):
    images = [inbox("a.png", "Alpha Page")]
    (first,) = parse(images)
    for name in manifest_objects(storage):
        storage.pipe_file(name, CORRUPTIONS[corruption](storage.cat_file(name)))
    corrupted = manifest_objects(storage)

    storage.reset()
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    (record,) = parse(images)
    assert "unusable" in caplog.text
    assert doc2x.stats()["billed_total"] == 1
    assert storage.opened_of("/inbox/") == 0  # rebuilt from the sidecar, which has the fingerprint
    assert record["markdown_path"] == first["markdown_path"]
    assert not set(corrupted) & set(manifest_objects(storage))  # healed: the unusable objects are gone

    caplog.clear()
    storage.reset()
    parse(images)
    assert "unusable" not in caplog.text
    assert storage.opened_of("/inbox/") == 0


def test_a_missing_manifest_is_rebuilt_from_the_sidecars_with_a_warning(doc2x, storage, inbox, caplog):
    images = [inbox("a.png"), inbox("b.png")]
    parse(images)
    for name in manifest_objects(storage):
        storage.rm_file(name)
    storage.reset()
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    parse(images)
    assert "missing" in caplog.text
    assert storage.opened_of("/inbox/") == 0
    assert doc2x.stats()["billed_total"] == 2
    assert manifest_objects(storage)


def test_results_from_before_the_manifest_cost_one_read_and_no_billing(doc2x, storage, inbox, caplog):
    """Sidecars without a fingerprint (parsed before ``incremental``) rebuild nothing: read, never billed."""
    images = [inbox("a.png"), inbox("b.png")]
    parse_operator(images, output_path=LAKE).execute({})
    storage.reset()
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    records = parse(images)
    assert "missing" in caplog.text
    assert all(storage.opened[image_path(uri)] >= 1 for uri in images)
    assert all(record["cached"] for record in records)
    assert doc2x.stats()["billed_total"] == 2
    storage.reset()
    parse(images)
    assert storage.opened_of("/inbox/") == 0


def test_a_first_run_on_an_empty_output_path_warns_nothing(doc2x, storage, inbox, caplog):
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    parse([inbox("a.png")])
    assert not [
        record for record in caplog.records if record.name == "airflow_provider_doc2x.storage.manifest"
    ]


def test_an_object_of_a_later_format_version_is_left_alone(storage, caplog):
    document = {"format": "airflow-provider-doc2x manifest", "version": 99, "shard": "00", "entries": {}}
    name = f"{MANIFEST}/00.delta.20260101T000000000000Z.{'a' * 32}.json"
    storage.pipe_file(name, json.dumps(document).encode())
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    assert Manifest(ResultStore(LAKE), compact_at=2).entries() == {}
    assert "version 99" in caplog.text
    assert name in storage.store


# -- concurrent writers ---------------------------------------------------------------------------


def sources_in_one_shard(count: int, prefix: str) -> list[str]:
    """URIs that all land in shard 00, so that concurrent writers contend for one shard."""
    uris, number = [], 0
    while len(uris) < count:
        uri = f"memory://inbox/{prefix}-{number}.png"
        if shard_of(uri) == "00":
            uris.append(uri)
        number += 1
    return uris


def fake_result(uid: str) -> protocol.Doc2XResult:
    return protocol.Doc2XResult(uid=uid, pages=(protocol.Doc2XPage(0, 10, 10, f"# {uid}"),), convert_zip=None)


def one_task(uri: str, compact_at: int, barrier: threading.Barrier | None = None) -> None:
    """What a mapped task over one image does with the manifest, Doc2X left out."""
    results = ResultStore(LAKE)
    manifest = Manifest(results, compact_at=compact_at)
    split = manifest.partition([ImageSource.of(uri)])
    assert split.to_read
    digest = hashlib.sha256(uri.encode()).hexdigest()
    record = results.write(uri, digest, fake_result(uri.rsplit("/", 1)[1]))
    split.records([record])
    if barrier is not None:
        barrier.wait()  # both tasks loaded the same objects; both now write and compact
    manifest.record([record])


@pytest.mark.parametrize("compacting", ["both", "one"])
def test_two_mapped_tasks_updating_one_manifest_at_once_lose_nothing(storage, compacting):
    """
    Each round, two tasks load the same shard, then both write it: both compact it (each deletes
    what it read), or one compacts while the other adds a delta. Every entry survives every round.
    """
    rounds = 8
    uris = sources_in_one_shard(2 * rounds, "mapped")
    for uri in uris:
        storage.pipe_file(image_path(uri), uri.encode())
    errors: list[BaseException] = []
    for number in range(rounds):
        barrier = threading.Barrier(2, timeout=30)
        pair = uris[2 * number : 2 * number + 2]
        compact_at = [2, 2] if compacting == "both" else [2, 1000][:: 1 if number % 2 else -1]

        def task(uri, compact_at=2, barrier=barrier):
            try:
                one_task(uri, compact_at, barrier)
            except BaseException as error:
                errors.append(error)
                barrier.abort()

        threads = [threading.Thread(target=task, args=args) for args in zip(pair, compact_at, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors
        entries = Manifest(ResultStore(LAKE)).entries()
        assert set(uris[: 2 * number + 2]) <= set(entries), f"lost entries in round {number}"
    assert all(entry.result is not None for entry in Manifest(ResultStore(LAKE)).entries().values())
    assert len(manifest_objects(storage)) <= 4  # compacted as it went


WRITER = """
import hashlib, itertools, sys
from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.storage.manifest import Manifest, shard_of
from airflow_provider_doc2x.storage.results import ResultStore
from airflow_provider_doc2x.storage.sources import ImageSource

lake, folder, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# Names in one shard: the two writers contend for it.
paths = (f"{folder}/{name}-{number}.png" for number in itertools.count())
for path in itertools.islice((path for path in paths if shard_of(path) == "00"), count):
    open(path, "wb").write(path.encode())
    results = ResultStore(lake)
    manifest = Manifest(results, compact_at=3)
    manifest.partition([ImageSource.of(path)])
    digest = hashlib.sha256(path.encode()).hexdigest()
    result = protocol.Doc2XResult(uid=digest[:8], pages=(protocol.Doc2XPage(0, 1, 1, "# x"),), convert_zip=None)
    manifest.record([results.write(path, digest, result)])
    print("written:", path)
"""


def test_two_processes_writing_one_local_manifest_lose_nothing(tmp_path):
    """Free-running writers on a local disk (write then rename), compacting every few writes."""
    lake, folder = tmp_path / "lake", tmp_path / "inbox"
    folder.mkdir()
    count = 30
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(lake), str(folder), name, str(count)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("left", "right")
    ]
    expected = set()
    for writer in writers:
        written, errors = writer.communicate(timeout=300)
        assert writer.returncode == 0, errors[-3000:]
        expected.update(line.split()[1] for line in written.splitlines() if line.startswith("written: "))
    assert len(expected) == 2 * count
    assert set(Manifest(ResultStore(str(lake))).entries()) == expected
    assert not list((lake / MANIFEST_DIR / "v1").glob(".tmp-*"))


# -- fingerprints ---------------------------------------------------------------------------------


def test_fingerprints_agree_between_a_listing_and_info():
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    assert fingerprint({"size": 3, "type": "file", "created": moment}) == fingerprint(
        {"size": 3, "type": "file", "created": moment.timestamp()}
    )


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (
            {
                "size": 5,
                "type": "file",
                "ETag": '"abc"',
                "LastModified": datetime(2026, 1, 1, tzinfo=timezone.utc),
            },
            'size=5;etag="abc";mtime=1767225600.000000',
        ),
        ({"size": 5, "type": "file", "generation": "17", "etag": "CJ"}, "size=5;etag=CJ;generation=17"),
        ({"size": 5, "type": "file", "mtime": 1.5, "created": 2.5}, "size=5;mtime=1.500000;ctime=2.500000"),
        ({"size": 5, "type": "file"}, None),  # the size alone is not trusted: always read
        ({"size": 5, "type": "directory", "mtime": 1.0}, None),
        ({"size": "5", "type": "file", "mtime": 1.0}, None),
        (None, None),
    ],
)
def test_fingerprint_from_storage_metadata(info, expected):
    assert fingerprint(info) == expected


# -- storage that fails, caches, or refuses ------------------------------------------------------


@pytest.fixture
def faulty(monkeypatch):
    """``memory://`` counted, with faults a test switches on (retries without waiting)."""
    with faulty_memory(monkeypatch) as fs:
        yield fs


@pytest.fixture
def faulty_inbox(faulty, make_image):
    def put(name: str, title: str | None = None) -> str:
        faulty.pipe_file(f"/inbox/{name}", make_image(name, title or name).read_bytes())
        return f"memory://inbox/{name}"

    return put


def test_an_unreadable_manifest_object_is_left_alone_not_deleted(doc2x, faulty, faulty_inbox, caplog):
    """A GET that keeps failing is not "corrupt": the object survives the run, and is read once it heals."""
    images = [faulty_inbox("a.png")]
    parse(images)
    (written,) = manifest_objects(faulty)

    FaultyFS.failing_reads.add(MANIFEST + "/")
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    (record,) = parse(images, overwrite=False)
    assert record["cached"] is True
    assert doc2x.stats()["billed_total"] == 1
    assert written in manifest_objects(faulty)  # never deleted unread
    assert "could not be read" in caplog.text and written.rsplit("/", 1)[1] in caplog.text
    assert "unusable" not in caplog.text

    FaultyFS.heal()
    faulty.reset()
    parse(images)
    assert faulty.opened_of("/inbox/") == 0
    assert doc2x.stats()["billed_total"] == 1


def test_a_listing_cached_by_the_filesystem_is_refreshed(doc2x, faulty, faulty_inbox):
    """
    s3fs answers listings from a cache kept in the process: after another writer folded a shard,
    the task still finds the entries (in the new base), and opens no image.
    """
    FaultyFS.cache_listings = True
    images = [faulty_inbox("a.png")]
    parse(images)
    parse(images)  # lists the manifest, and the filesystem caches that listing
    (written,) = manifest_objects(faulty)
    shard = written.rsplit("/", 1)[1][:2]
    # Another process compacts the shard: a new base, the old object gone, behind this process's cache.
    folded = f"{MANIFEST}/{shard}.base.20991231T000000000000Z.{'b' * 32}.json"
    FaultyFS.store[folded] = FaultyFS.store.pop(written)

    faulty.reset()
    (record,) = parse(images)
    assert record["cached"] is True
    assert faulty.opened_of("/inbox/") == 0
    assert doc2x.stats()["billed_total"] == 1


def test_a_denied_delete_after_the_work_is_done_warns_and_the_task_succeeds(
    doc2x, faulty, faulty_inbox, caplog
):
    FaultyFS.denied_deletes.add(MANIFEST + "/")
    images = [faulty_inbox(f"page-{number}.png") for number in range(3)]
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    records = parse(images, deferrable=True)  # the second half folds the first half's objects
    assert [record["source"] for record in records] == images
    assert FaultyFS.failed  # deletes were tried, and denied
    assert "could not be deleted" in caplog.text and "Delete" in caplog.text
    assert FaultyFS.failed[0] in caplog.text  # the manifest object is named

    FaultyFS.heal()
    faulty.reset()
    again = parse(images)
    assert all(record["cached"] for record in again)
    assert faulty.opened_of("/inbox/") == 0
    assert doc2x.stats()["billed_total"] == 3


def test_a_deferrable_first_run_writes_one_manifest_object_per_shard_per_half(doc2x, storage, inbox):
    images = [inbox(f"page-{number}.png") for number in range(6)]
    storage.reset()
    parse(images, deferrable=True)
    shards = len({shard_of(uri) for uri in images})
    assert storage.calls["pipe_file"] == 2 * shards  # the first half's object, then the second's base
    assert storage.calls["rm"] + storage.calls["rm_file"] == shards  # the first half's, folded
    assert len(manifest_objects(storage)) == shards


# -- spellings of one source --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "key"),
    [
        ("s3://aws_default@bucket/scans/a.png", "s3://bucket/scans/a.png"),
        ("s3://bucket/scans/a.png", "s3://bucket/scans/a.png"),
        ("s3://bucket/scans/a@2x.png", "s3://bucket/scans/a@2x.png"),
        ("webhdfs://user@namenode:9870/scans/a.png", "webhdfs://namenode:9870/scans/a.png"),
        ("webhdfs://namenode-2:9870/scans/a.png", "webhdfs://namenode-2:9870/scans/a.png"),
        ("/data/scans/a.png", "/data/scans/a.png"),
    ],
)
def test_the_manifest_key_drops_the_connection_id_and_keeps_the_endpoint(uri, key):
    assert source_key(uri) == key


def local_manifest_objects(lake) -> list:
    return sorted((lake / MANIFEST_DIR / "v1").glob("*.json"))


def unchanged_count(caplog) -> str:
    lines = [record.getMessage() for record in caplog.records if "unchanged since" in record.getMessage()]
    return lines[-1].split(" images")[0].removeprefix("Manifest: ")


def test_two_spellings_of_one_source_are_one_entry(doc2x, make_image, tmp_path, caplog):
    image, lake = make_image("a.png", "Alpha"), tmp_path / "lake"
    caplog.set_level(logging.INFO, logger="airflow_provider_doc2x.storage.manifest")

    def run(uri):
        return parse_operator([uri], output_path=str(lake), incremental=True).execute({})

    run(f"file://my_conn@{image}")
    run(f"file://{image}")
    assert unchanged_count(caplog) == "1 of 1"
    assert doc2x.stats()["billed_total"] == 1


def test_entries_of_the_first_format_under_a_spelling_with_a_connection_id_are_still_found(
    doc2x, make_image, tmp_path, caplog
):
    """What the first release wrote (version 1, keys with the connection id, no model) bills nothing."""
    image, lake = make_image("a.png", "Alpha"), tmp_path / "lake"
    spelled = f"file://my_conn@{image}"
    parse_operator([spelled], output_path=str(lake), incremental=True).execute({})
    # The same entry as the first release wrote it.
    (path,) = local_manifest_objects(lake)
    (entry,) = json.loads(path.read_text())["entries"].values()
    for key in ("status", "model"):
        entry.pop(key, None)
    path.unlink()
    old = lake / MANIFEST_DIR / "v1" / f"{shard_of(spelled)}.delta.20260101T000000000000Z.{'a' * 32}.json"
    old.write_text(
        json.dumps(
            {
                "format": "airflow-provider-doc2x manifest",
                "version": 1,
                "shard": shard_of(spelled),
                "writer": "w",
                "entries": {spelled: entry},
            }
        )
    )
    caplog.set_level(logging.INFO, logger="airflow_provider_doc2x.storage.manifest")
    for uri in (spelled, f"file://{image}", spelled):
        (record,) = parse_operator([uri], output_path=str(lake), incremental=True).execute({})
        assert record["cached"] is True
        assert unchanged_count(caplog) == "1 of 1"
    assert doc2x.stats()["billed_total"] == 1


def test_an_entry_of_the_first_format_is_trusted_only_if_its_folder_holds_its_content(doc2x, storage, inbox):
    """The first release could record another content's folder: its entries are checked once against the sidecar."""
    images = [inbox("a.png", "Alpha")]
    (first,) = parse(images)
    for name in manifest_objects(storage):
        document = json.loads(storage.cat_file(name))
        document["version"] = 1
        for entry in document["entries"].values():
            entry.pop("status", None)
            entry.pop("model", None)
        storage.pipe_file(name, json.dumps(document).encode())
    sidecar_path = image_path(first["sidecar_path"])
    sidecar = json.loads(storage.cat_file(sidecar_path))
    sidecar["sha256"] = first["sha256"][:12] + "0" * 52  # the folder holds another content's result
    storage.pipe_file(sidecar_path, json.dumps(sidecar).encode())

    (record,) = parse(images)
    assert record["cached"] is False
    assert doc2x.stats()["billed_total"] == 2
    assert record["markdown_path"] != first["markdown_path"]  # a folder of its own
    assert (
        json.loads(storage.cat_file(sidecar_path))["sha256"] == sidecar["sha256"]
    )  # the other left as it was


# -- the model that made a result ------------------------------------------------------------------


def billed(doc2x) -> int:
    """Images billed by the image API plus pages billed by the PDF API."""
    stats = doc2x.stats()
    return stats["billed_total"] + stats["pdf_pages_billed"]


def test_results_of_another_model_are_parsed_again_then_known(doc2x, storage, inbox):
    images = [inbox("a.png"), inbox("b.png")]
    parse(images)  # the image API: v2
    assert billed(doc2x) == 2
    records = parse(images, method="pdf", pdf_model="v3-2026")
    assert [record["cached"] for record in records] == [False, False]
    assert billed(doc2x) == 4
    sidecar = json.loads(storage.cat_file(image_path(records[0]["sidecar_path"])))
    assert sidecar["model"] == "v3-2026"

    storage.reset()
    again = parse(images, method="pdf", pdf_model="v3-2026")
    assert all(record["cached"] for record in again)
    assert storage.opened_of("/inbox/") == 0
    assert billed(doc2x) == 4


def test_an_entry_of_a_renamed_copy_still_answers_with_its_own_model_after_a_new_model_parsed_the_original(
    doc2x, storage, inbox
):
    """A new model's result is written beside the old one, so an entry pointing at the old folder stays true."""
    a = inbox("a.png", "Alpha")
    storage.pipe_file("/inbox/b.png", storage.cat_file("/inbox/a.png"))
    b = "memory://inbox/b.png"
    first = parse([a, b])  # v2: b is a hit on a's folder, and its entry points there
    assert first[1]["sidecar_path"] == first[0]["sidecar_path"]

    (by_v3,) = parse([a], method="pdf", pdf_model="v3-2026")  # the corpus re-parsed by a new model
    assert by_v3["cached"] is False
    assert json.loads(storage.cat_file(image_path(by_v3["sidecar_path"])))["model"] == "v3-2026"
    assert billed(doc2x) == 2

    storage.reset()
    (copy,) = parse([b])  # v2 again: the entry answers, with v2's result
    assert copy["cached"] is True
    assert storage.opened_of("/inbox/") == 0
    sidecar = json.loads(storage.cat_file(image_path(copy["sidecar_path"])))
    assert sidecar["model"] == "v2"
    assert storage.cat_file(image_path(copy["markdown_path"])) == storage.cat_file(
        image_path(first[0]["markdown_path"])
    )
    (original,) = parse([a], method="pdf", pdf_model="v3-2026")
    assert original["cached"] is True and original["sidecar_path"] == by_v3["sidecar_path"]
    assert billed(doc2x) == 2


# -- two releases' formats side by side ----------------------------------------------------------


def test_objects_of_a_newer_release_are_kept_beside_todays_and_nothing_is_lost(storage, caplog):
    """
    In one shard: an object of version 1 (the first release), one of this version whose entry has a
    key added by a later release, one with a top-level key this release does not know, and one of a
    higher version. A task compacts the shard: the first two are folded (the added key kept), the
    last two stay, and every entry is there.
    """
    first, added, unknown, newer, new = sources_in_one_shard(5, "format")
    digest = hashlib.sha256(b"x").hexdigest()

    def entry(uri, **more):
        name = uri.rsplit("/", 1)[1].rsplit(".", 1)[0]
        result = {"folder": f"{name}-{digest[:12]}", "uid": "u", "markdown": f"{name}.md", "figures": []}
        return {"fingerprint": "size=1;mtime=1.000000", "sha256": digest, "at": 1.0, "result": result, **more}

    def plant(kind, stamp, document):
        name = f"{MANIFEST}/00.{kind}.2026010{stamp}T000000000000Z.{str(stamp) * 32}.json"
        body = {"format": "airflow-provider-doc2x manifest", "shard": "00", "writer": "w", **document}
        storage.pipe_file(name, json.dumps(body).encode())
        return name

    v1 = plant("delta", 1, {"version": 1, "entries": {first: entry(first)}})
    later_entry = entry(added, status="parsed", model="v2", source_document="memory://inbox/book.pdf")
    later_entry["result"]["page_number"] = 7
    v2 = plant("delta", 2, {"version": 2, "entries": {added: later_entry}})
    extra = plant("delta", 3, {"version": 2, "documents": {}, "entries": {unknown: entry(unknown)}})
    higher = plant("base", 4, {"version": 3, "entries": {newer: {"anything": True}}})

    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    storage.pipe_file(image_path(new), new.encode())
    one_task(new, compact_at=2)

    objects = manifest_objects(storage)
    assert extra in objects and higher in objects  # kept: never deleted, never folded away
    assert v1 not in objects and v2 not in objects  # read whole, and folded
    (base,) = [name for name in objects if ".base." in name and name != higher]
    folded = json.loads(storage.cat_file(base))["entries"]
    assert set(folded) == {first, added, unknown, new}
    assert folded[added]["source_document"] == "memory://inbox/book.pdf"
    assert folded[added]["result"]["page_number"] == 7
    assert "model" not in folded[first]  # still of the first format: checked once before it is trusted
    assert "unusable" not in caplog.text
    assert set(Manifest(ResultStore(LAKE)).entries()) == {first, added, unknown, new}


def parsed_entry(uri: str, digest: str, **more) -> dict:
    """A valid entry of this format for ``uri``, as a manifest object holds it."""
    name = uri.rsplit("/", 1)[1].rsplit(".", 1)[0]
    result = {"folder": f"{name}-{digest[:12]}", "uid": "u", "markdown": f"{name}.md", "figures": []}
    entry = {"fingerprint": "size=1;mtime=1.000000", "sha256": digest, "at": 1.0, "status": "parsed"}
    return {**entry, "model": "v2", "result": result, **more}


def plant_object(storage, stamp: int, entries: dict) -> str:
    """A manifest object of this format in shard 00, written as another writer would; returns its name."""
    name = f"{MANIFEST}/00.delta.20260101T000000000000Z.{str(stamp) * 32}.json"
    body = {"format": "airflow-provider-doc2x manifest", "version": 2, "shard": "00", "writer": "w"}
    storage.pipe_file(name, json.dumps({**body, "entries": entries}).encode())
    return name


@pytest.mark.parametrize(
    "later_entry",
    [
        {"status": "failed", "model": None, "result": None, "code": "parse_error"},  # no model made it
        {"status": "failed", "sha256": None, "result": None, "code": "input_error"},  # never hashed
        {"status": "split", "result": {"document": "book.pdf", "pages": [1, 2]}},  # another result shape
    ],
    ids=["no-model", "no-sha256", "other-result-shape"],
)
def test_an_entry_of_a_later_status_is_kept_as_written_with_its_object(storage, caplog, later_entry):
    """An entry whose status this release does not know answers nothing, and nothing near it is lost."""
    later, good, new = sources_in_one_shard(3, "status")
    digest = hashlib.sha256(b"x").hexdigest()
    written = {"fingerprint": "size=1;mtime=1.000000", "sha256": digest, "at": 2.0, **later_entry}
    planted = plant_object(storage, 1, {later: written, good: parsed_entry(good, digest)})
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    storage.pipe_file(image_path(new), new.encode())
    one_task(new, compact_at=2)  # a compaction of the shard
    assert planted in manifest_objects(storage)  # never deleted: it holds what this release cannot read
    assert json.loads(storage.cat_file(planted))["entries"][later] == written
    entries = Manifest(ResultStore(LAKE)).entries()
    assert set(entries) == {later, good, new}
    assert not entries[later].usable  # answers nothing: its image is read
    assert entries[later].to_json() == written  # carried as written into every object that folds it
    assert "unusable" not in caplog.text and "not valid" not in caplog.text


def test_an_invalid_entry_is_dropped_alone_and_the_others_of_its_object_are_kept(storage, caplog):
    bad, good, new = sources_in_one_shard(3, "invalid")
    digest = hashlib.sha256(b"x").hexdigest()
    entries = {bad: parsed_entry(bad, digest, sha256="not hex"), good: parsed_entry(good, digest)}
    planted = plant_object(storage, 2, entries)
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.manifest")
    storage.pipe_file(image_path(new), new.encode())
    one_task(new, compact_at=2)
    assert bad in caplog.text and "not valid" in caplog.text  # named, with why
    assert planted not in manifest_objects(storage)  # read and folded ...
    assert set(Manifest(ResultStore(LAKE)).entries()) == {good, new}  # ... its valid entry carried
