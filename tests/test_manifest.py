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
from airflow_provider_doc2x.manifest import (
    MANIFEST_DIR,
    Manifest,
    fingerprint,
    shard_of,
)
from airflow_provider_doc2x.results import ResultStore
from airflow_provider_doc2x.sources import ImageSource
from tests.helpers import REPO, first_event, parse_operator
from tests.helpers.storage import CountingFS, use_for_memory

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
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.manifest")
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
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.manifest")
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
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.manifest")
    records = parse(images)
    assert "missing" in caplog.text
    assert all(storage.opened[image_path(uri)] >= 1 for uri in images)
    assert all(record["cached"] for record in records)
    assert doc2x.stats()["billed_total"] == 2
    storage.reset()
    parse(images)
    assert storage.opened_of("/inbox/") == 0


def test_a_first_run_on_an_empty_output_path_warns_nothing(doc2x, storage, inbox, caplog):
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.manifest")
    parse([inbox("a.png")])
    assert not [record for record in caplog.records if record.name == "airflow_provider_doc2x.manifest"]


def test_an_object_of_a_later_format_version_is_left_alone(storage, caplog):
    document = {"format": "airflow-provider-doc2x manifest", "version": 99, "shard": "00", "entries": {}}
    name = f"{MANIFEST}/00.delta.20260101T000000000000Z.{'a' * 32}.json"
    storage.pipe_file(name, json.dumps(document).encode())
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.manifest")
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
from airflow_provider_doc2x.manifest import Manifest, shard_of
from airflow_provider_doc2x.results import ResultStore
from airflow_provider_doc2x.sources import ImageSource

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
