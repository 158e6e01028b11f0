"""Results in storage: files and links, safe unpacking of convert_zip, the content cache, lineage."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import Doc2XStorageError
from airflow_provider_doc2x.storage.archives import decode_base64, unpack_figures
from airflow_provider_doc2x.storage.results import ResultStore
from tests.helpers import parse_operator, run_deferred
from tests.helpers.storage_faults import FaultyFS, faulty_memory

#: The seed page's own example value of convert_zip: not a zip, a small protobuf-like record.
VENDOR_EXAMPLE = (
    "EpwBCiowMTk1MjIwNS1iMjZmLTc5MzAtOTNjMS0xMDNjODgxNTY3MjlfMC5qcGcYuAgg4iEqaDwhLS0gTWVkaWEgLS0+Cgo8aW1n"
    "IHNyYz0iMDE5NTIyMDUtYjI2Zi03OTMwLTkzYzEtMTAzYzg4MTU2NzI5XzBfMF81OV8xMDgwXzQyMjFfMC5qcGciLz4KCjwhLS0g"
    "TWVkaWEgLS0+"
)


def zip_payload(entries: dict[str, bytes], *, symlinks: tuple[str, ...] = ()) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return base64.b64encode(buffer.getvalue()).decode()


def result_with(convert_zip: str | None, md: str = '# Page\n\n<img src="fig.jpg"/>') -> protocol.Doc2XResult:
    return protocol.Doc2XResult(
        uid="uid-1", pages=(protocol.Doc2XPage(0, 100, 200, md),), convert_zip=convert_zip
    )


def files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


# -- what lands in storage -------------------------------------------------------------------------


@pytest.mark.parametrize("deferrable", [True, False])
def test_local_directory_output(doc2x, make_image, tmp_path, deferrable):
    out = tmp_path / "lake"
    image = make_image("report.png", "Annual Report", paragraphs=["Text.", "<!-- figure: 20,20,60,40 -->"])
    op = parse_operator([image], deferrable=deferrable, output_path=str(out))
    (record,) = run_deferred(op, {}) if deferrable else op.execute({})
    assert "markdown" not in record
    assert set(record) >= {"source", "uid", "markdown_path", "figure_paths", "sidecar_path"}
    folder = out / Path(record["markdown_path"]).parent.name
    assert folder.name.startswith("report-")
    markdown = (folder / "report.md").read_text()
    assert markdown.startswith("# Annual Report")
    links = re.findall(r'<img src="([^"]+)"', markdown)
    assert len(links) == 1
    assert (folder / links[0]).read_bytes().startswith(b"\xff\xd8\xff")  # the link resolves to the figure
    sidecar = json.loads((folder / "report.json").read_text())
    assert sidecar["source"] == str(image)
    assert sidecar["uid"] == record["uid"]
    assert sidecar["pages"] == [{"page": 1, "page_idx": 0, "page_width": 400, "page_height": 300}]
    assert len(sidecar["sha256"]) == 64
    assert sidecar["parsed_at"]
    assert sidecar["figures"] == [links[0]]


def test_memory_output(doc2x, make_image, memory_fs):
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    records = run_deferred(
        parse_operator(
            [make_image("a.png", "In Memory")], deferrable=True, output_path="memory://lake/doc2x"
        ),
        {},
    )
    markdown = ObjectStoragePath(records[0]["markdown_path"]).read_text()
    assert markdown.startswith("# In Memory")
    assert json.loads(ObjectStoragePath(records[0]["sidecar_path"]).read_text())["uid"] == records[0]["uid"]


@pytest.fixture
def memory_fs():
    import fsspec

    try:
        from airflow.sdk.io import attach
    except ImportError:  # Airflow 2
        from airflow.io.store import attach
    fs = fsspec.filesystem("memory")
    attach("memory", fs=fs)
    yield fs
    fs.store.clear()


# -- convert_zip, hostile or broken ----------------------------------------------------------------

HOSTILE = {
    "zip-slip": {"../evil.jpg": b"x", "images/fig.jpg": b"ok"},
    "deep zip-slip": {"images/../../../evil.jpg": b"x", "images/fig.jpg": b"ok"},
    "absolute": {"/tmp/evil.jpg": b"x", "images/fig.jpg": b"ok"},
    "drive letter": {"C:\\evil.jpg": b"x", "images/fig.jpg": b"ok"},
    "backslash slip": {"..\\evil.jpg": b"x", "images/fig.jpg": b"ok"},
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_unsafe_entries_are_refused_and_the_rest_unpacked(tmp_path, case):
    out = tmp_path / "out"
    record = ResultStore(str(out)).write("page.png", "a" * 64, result_with(zip_payload(HOSTILE[case])))
    folder = Path(record["markdown_path"].removeprefix("file://")).parent
    assert files_under(tmp_path) == {
        f"out/{folder.name}/{name}" for name in ("page.md", "page.json", "images/fig.jpg")
    }
    sidecar = json.loads((folder / "page.json").read_text())
    assert any("refused unsafe entry" in warning for warning in sidecar["warnings"])
    assert '<img src="images/fig.jpg"/>' in (folder / "page.md").read_text()


def test_a_symlink_entry_is_refused(tmp_path):
    payload = zip_payload(
        {"images/link.jpg": b"/etc/passwd", "images/fig.jpg": b"ok"}, symlinks=("images/link.jpg",)
    )
    figures = unpack_figures(payload, source="page.png")
    assert set(figures.files) == {"images/fig.jpg"}
    assert "images/link.jpg" in figures.warnings[0]


def test_a_zip_bomb_is_stopped_not_unpacked(tmp_path):
    bomb = zip_payload({"images/bomb.jpg": b"\0" * (4 * 1024 * 1024), "images/fig.jpg": b"ok"})
    figures = unpack_figures(bomb, source="page.png", max_bytes=1024 * 1024)
    assert figures.files == {}
    assert figures.raw is not None
    assert "refused" in figures.warnings[0]
    store = ResultStore(str(tmp_path / "out"), max_zip_bytes=1024 * 1024)
    record = store.write("page.png", "b" * 64, result_with(bomb))
    folder = Path(record["markdown_path"].removeprefix("file://")).parent
    assert "images" not in {path.name for path in folder.iterdir()}


def test_too_many_entries_are_refused():
    many = zip_payload({f"images/{n}.jpg": b"x" for n in range(20)})
    figures = unpack_figures(many, source="page.png", max_entries=10)
    assert figures.files == {}
    assert "20 entries" in figures.warnings[0]


def test_the_vendor_example_payload_is_kept_raw_without_crashing(tmp_path):
    record = ResultStore(str(tmp_path)).write("page.png", "c" * 64, result_with(VENDOR_EXAMPLE))
    folder = Path(record["markdown_path"].removeprefix("file://")).parent
    assert (folder / "convert_zip.raw").read_bytes() == base64.b64decode(VENDOR_EXAMPLE)
    assert json.loads((folder / "page.json").read_text())["raw_convert_zip"] == "convert_zip.raw"
    assert record["figure_paths"] == []


def test_every_file_a_store_writes_is_in_the_lineage_the_raw_payload_too(tmp_path):
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_doc2x.operators.doc2x import task_lineage
    from airflow_provider_doc2x.usage import Usage

    store = ResultStore(str(tmp_path))
    record = store.write("page.png", "c" * 64, result_with(VENDOR_EXAMPLE))
    lineage = task_lineage([record], Usage(), model="v2", lane="image", written=store.written_files)
    on_disk = {str(path) for path in tmp_path.rglob("*") if path.is_file()}
    assert {"convert_zip.raw", "page.md", "page.json"} == {path.rsplit("/", 1)[-1] for path in on_disk}
    assert {path for path in on_disk if not path.endswith(".json")} == {
        dataset.name for dataset in lineage.outputs
    }


def test_truncated_base64_is_kept_raw(tmp_path):
    truncated = zip_payload({"images/fig.jpg": b"ok"})[:-7]
    figures = unpack_figures(truncated, source="page.png")
    assert figures.files == {}
    assert figures.raw is not None
    assert figures.warnings


def test_data_prefix_and_missing_padding_are_accepted():
    payload = zip_payload({"images/fig.jpg": b"figure"})
    unpadded = "data:application/zip;base64," + payload.rstrip("=")
    assert unpack_figures(unpadded, source="page.png").files == {"images/fig.jpg": b"figure"}
    assert decode_base64("not base64 at all!") is None


# -- the content cache -----------------------------------------------------------------------------


def test_second_run_submits_nothing_a_changed_image_is_parsed_overwrite_resubmits(
    doc2x, make_image, tmp_path
):
    out = str(tmp_path / "lake")
    first, second = make_image("one.png", "One"), make_image("two.png", "Two")
    run_deferred(parse_operator([first, second], deferrable=True, output_path=out), {})
    assert doc2x.stats()["requests"]["submit"] == 2

    records = parse_operator([first, second], deferrable=True, output_path=out).execute(
        {}
    )  # no deferral needed
    assert [record["cached"] for record in records] == [True, True]
    assert doc2x.stats()["requests"]["submit"] == 2

    make_image("two.png", "Two, revised")  # same name, new content
    records = run_deferred(parse_operator([first, second], deferrable=True, output_path=out), {})
    assert [record["cached"] for record in records] == [True, False]
    assert doc2x.stats()["requests"]["submit"] == 3
    assert Path(records[1]["markdown_path"].removeprefix("file://")).read_text().startswith("# Two, revised")

    run_deferred(parse_operator([first], deferrable=True, output_path=out, overwrite=True), {})
    assert doc2x.stats()["requests"]["submit"] == 4


def test_an_interrupted_write_is_not_a_cache_hit(doc2x, make_image, tmp_path):
    out = tmp_path / "lake"
    image = make_image("half.png", "Half")
    (record,) = run_deferred(parse_operator([image], deferrable=True, output_path=str(out)), {})
    Path(record["sidecar_path"].removeprefix("file://")).unlink()
    run_deferred(parse_operator([image], deferrable=True, output_path=str(out)), {})
    assert doc2x.stats()["requests"]["submit"] == 2


# -- lineage ---------------------------------------------------------------------------------------


def test_openlineage_facets_list_images_and_every_file_written(doc2x, make_image, tmp_path):
    pytest.importorskip("airflow.providers.openlineage")
    images = [make_image("a.png", "A"), make_image("b.jpg", "B")]
    op = parse_operator(images, deferrable=True, output_path=str(tmp_path / "lake"))
    records = run_deferred(op, {})
    lineage = op.get_openlineage_facets_on_complete(None)
    assert [(dataset.namespace, dataset.name) for dataset in lineage.inputs] == [
        ("file", str(image)) for image in images
    ]
    assert [(dataset.namespace, dataset.name) for dataset in lineage.outputs] == [
        ("file", record["markdown_path"].removeprefix("file://")) for record in records
    ]  # a sidecar is the provider's bookkeeping, not a dataset


def test_openlineage_namespaces_for_object_storage():
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_doc2x.operators.doc2x import lineage_dataset

    named = {
        "s3://bucket/scans/page.png": ("s3://bucket", "scans/page.png"),
        "s3://aws_default@bucket/scans/page.png": ("s3://bucket", "scans/page.png"),  # Airflow 2 kept the id
        "s3://bucket/scans/hash#1.png": ("s3://bucket", "scans/hash#1.png"),  # the key read, whole
        "s3://bucket/k//p.png": ("s3://bucket", "k//p.png"),
        "gs://google_cloud_default@b/f/x.jpg": ("gs://b", "f/x.jpg"),
    }
    for uri, expected in named.items():
        dataset = lineage_dataset(uri)
        assert (dataset.namespace, dataset.name) == expected, uri


def test_lineage_datasets_made_by_folder_are_those_made_one_by_one(monkeypatch, tmp_path):
    """The datasets made from one ObjectStoragePath per folder name what each file's own would."""
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_doc2x.operators.doc2x import lineage_dataset, lineage_datasets

    monkeypatch.chdir(tmp_path)
    uris = [
        "file:///tmp/lake/a-123/a.md",
        "file:///tmp/lake/a-123/a.json",
        "/data/x/p1.png",
        "/data/x/p2.png",
        "p3.png",
        "s3://bucket/k/a.md",
        "s3://bucket/a.md",
        "s3://aws_default@bucket/k/x.md",
        "memory://lake/r/a-1/a.md",
        "file:///x.png",
        "/y.png",
        "file:///tmp/figure page #1.png",
        "/tmp/a/..",
        "/tmp/a/.x",
        "gs://b/f/images/fig.jpg",
        "s3://b/k//p.png",
        "gs://b/k//p.png",
        "file:///data//p.png",
        "/data/../p.png",
        "s3://b/k#1/p.png",
        "s3://b/k?v=1/p.png",
        "file://localhost/dir/x.png",
        "//host/x.png",
        "s3://bucket/a b/ü.png",
    ]
    made = [(dataset.namespace, dataset.name) for dataset in lineage_datasets(uris)]
    assert made == [(dataset.namespace, dataset.name) for dataset in map(lineage_dataset, uris)]
    for odd in ("s3://c@/k/x.md", "s3://@/k/x.md", "gs://c@/k/x.md"):  # no bucket: Airflow 3 refuses it

        def named(make, uri=odd):
            try:
                return [(dataset.namespace, dataset.name) for dataset in make(uri)]
            except ValueError as error:
                return type(error)

        assert named(lambda uri: lineage_datasets([uri])) == named(lambda uri: [lineage_dataset(uri)]), odd


LINEAGE_SCRIPT = """
import json, sys
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

op = Doc2XImageParseOperator(
    task_id="parse", image_path=sys.argv[1], output_path=sys.argv[2], poll_interval=0.05
)
op.execute({})
try:
    from airflow.sdk import lineage
    started = lineage.get_hook_lineage_collector.cache_info().currsize != 0
except ImportError:  # Airflow 2
    from airflow.lineage import hook
    started = hook._hook_lineage_collector is not None
facets = op.get_openlineage_facets_on_complete(None)
print(json.dumps({
    "collector_started": started,
    "inputs": [dataset.name for dataset in facets.inputs],
    "outputs": [dataset.name for dataset in facets.outputs],
}))
"""


def test_a_task_reads_and_writes_without_starting_the_hook_lineage_collector(doc2x, make_image, tmp_path):
    """With OpenLineage active, the task's lineage is its facets; Airflow's per-file collector never starts.

    Starting it imports every provider's asset factories (boto3 with the Amazon provider): about
    0.4 s of CPU in each process a task runs or resumes in, for lineage OpenLineage does not read
    from an operator that names its own datasets.
    """
    pytest.importorskip("airflow.providers.openlineage")
    image = make_image("seen.png", "Seen")
    result = subprocess.run(
        [sys.executable, "-c", LINEAGE_SCRIPT, str(image), str(tmp_path / "lake")],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json(),
            "AIRFLOW__OPENLINEAGE__TRANSPORT": '{"type": "console"}',
        },
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lineage = json.loads(result.stdout.strip().splitlines()[-1])
    assert lineage["collector_started"] is False
    assert lineage["inputs"] == [str(image)]
    assert {name.rsplit("/", 1)[-1] for name in lineage["outputs"]} == {"seen.md"}


# -- what counts as a hit ----------------------------------------------------------------------------

LAKE = "memory://lake/results"


@pytest.fixture
def faulty(monkeypatch):
    """``memory://`` with faults a test switches on (retries without waiting)."""
    with faulty_memory(monkeypatch) as fs:
        yield fs


def page_result(text: str, uid: str = "uid-1") -> protocol.Doc2XResult:
    return protocol.Doc2XResult(
        uid=uid, pages=(protocol.Doc2XPage(0, 10, 10, f"# {text}"),), convert_zip=None
    )


def markdown_of(fs, record) -> str:
    return fs.cat_file(MemoryFileSystem._strip_protocol(record["markdown_path"])).decode()


def test_renamed_copies_are_found_by_every_upload_thread_while_the_listing_is_slow(faulty):
    """Sixteen threads ask at once for contents stored under other names while the root's listing takes a while."""
    digests = [f"{number:02x}" * 32 for number in range(16)]
    writer = ResultStore(LAKE)
    for number, digest in enumerate(digests):
        writer.write(f"memory://inbox/original-{number}.png", digest, page_result(f"page {number}"))
    for number in range(200):  # a bucket of many other results
        writer.write(f"memory://inbox/other-{number}.png", f"{number + 1000:064x}", page_result("other"))
    FaultyFS.slow_listings["/lake/results"] = 0.5

    store = ResultStore(LAKE)
    start = threading.Barrier(len(digests), timeout=30)
    found: dict[int, dict | None] = {}

    def look(number: int) -> None:
        start.wait()
        found[number] = store.cached(digests[number], f"memory://inbox/renamed-{number}.png")

    threads = [threading.Thread(target=look, args=(number,)) for number in range(len(digests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(found.get(number) is not None for number in range(len(digests)))
    assert [markdown_of(faulty, found[number]) for number in range(len(digests))] == [
        f"# page {number}\n" for number in range(len(digests))
    ]
    assert FaultyFS.calls["ls"] == 1  # one listing, shared


def test_a_folder_of_the_same_name_and_hash_prefix_holding_another_content_is_not_a_hit(faulty):
    mine, other = "0123456789ab" + "1" * 52, "0123456789ab" + "2" * 52
    theirs = ResultStore(LAKE).write("memory://elsewhere/page.png", other, page_result("Theirs"))

    store = ResultStore(LAKE)
    assert store.cached(mine, "memory://inbox/page.png") is None
    record = store.write("memory://inbox/page.png", mine, page_result("Mine"))
    assert record["markdown_path"] != theirs["markdown_path"]  # a folder of its own
    assert record["markdown_path"].rsplit("/", 2)[1] == f"page-{mine}"
    assert markdown_of(faulty, theirs) == "# Theirs\n"  # not overwritten

    fresh = ResultStore(LAKE)
    assert markdown_of(faulty, fresh.cached(mine, "memory://inbox/page.png")) == "# Mine\n"
    assert markdown_of(faulty, fresh.cached(other, "memory://elsewhere/page.png")) == "# Theirs\n"
    assert markdown_of(faulty, ResultStore(LAKE).cached(mine, "memory://inbox/renamed.png")) == "# Mine\n"


def test_a_result_of_another_model_is_not_a_hit_and_old_sidecars_count_as_v2(faulty):
    digest = "ab" * 32
    record = ResultStore(LAKE).write("memory://inbox/page.png", digest, page_result("v2"))
    sidecar_path = MemoryFileSystem._strip_protocol(record["sidecar_path"])
    assert json.loads(faulty.cat_file(sidecar_path))["model"] == "v2"
    assert ResultStore(LAKE, model="v3-2026").cached(digest, "memory://inbox/page.png") is None
    assert ResultStore(LAKE, model="v2").cached(digest, "memory://inbox/page.png") is not None

    older = json.loads(faulty.cat_file(sidecar_path))
    for key in ("model", "format", "format_version"):
        older.pop(key)  # as the releases before the model was recorded wrote it
    faulty.pipe_file(sidecar_path, json.dumps(older).encode())
    assert ResultStore(LAKE).cached(digest, "memory://inbox/page.png") is not None
    assert ResultStore(LAKE, model="v3-2026").cached(digest, "memory://inbox/page.png") is None


def test_a_sidecar_that_cannot_be_read_fails_the_task_retryably_and_bills_nothing(doc2x, make_image, faulty):
    image = make_image("scan.png", "Scan")
    faulty.pipe_file("/inbox/scan.png", image.read_bytes())
    (first,) = parse_operator(["memory://inbox/scan.png"], output_path=LAKE).execute({})
    sidecar_path = MemoryFileSystem._strip_protocol(first["sidecar_path"])
    before = faulty.cat_file(sidecar_path)

    FaultyFS.failing_reads.add(sidecar_path)
    with pytest.raises(Doc2XStorageError, match=re.escape(first["sidecar_path"])):
        parse_operator(["memory://inbox/scan.png"], output_path=LAKE).execute({})
    assert doc2x.stats()["billed_total"] == 1
    FaultyFS.heal()
    assert faulty.cat_file(sidecar_path) == before  # not rewritten


def test_a_listing_of_the_results_that_fails_is_an_error_not_an_empty_folder(faulty):
    ResultStore(LAKE).write("memory://inbox/page.png", "cd" * 32, page_result("Page"))
    FaultyFS.failing_listings.add("/lake/results")
    with pytest.raises(Doc2XStorageError, match="listing the results under"):
        ResultStore(LAKE).cached("cd" * 32, "memory://inbox/renamed.png")


def test_sidecars_of_a_newer_release_are_kept_beside_todays(faulty):
    """Keys a later release added survive a rewrite; a sidecar of a higher format version is never overwritten."""
    added, newer = "a1" * 32, "b2" * 32
    first = ResultStore(LAKE).write("memory://inbox/added.png", added, page_result("Added"))
    second = ResultStore(LAKE).write("memory://inbox/newer.png", newer, page_result("Newer"))
    added_path = MemoryFileSystem._strip_protocol(first["sidecar_path"])
    newer_path = MemoryFileSystem._strip_protocol(second["sidecar_path"])
    sidecar = json.loads(faulty.cat_file(added_path))
    faulty.pipe_file(
        added_path, json.dumps({**sidecar, "source_document": "memory://inbox/book.pdf"}).encode()
    )
    sidecar = json.loads(faulty.cat_file(newer_path))
    newer_bytes = json.dumps({**sidecar, "format_version": 2, "converted_from": "tiff"}).encode()
    faulty.pipe_file(newer_path, newer_bytes)

    store = ResultStore(LAKE)
    assert store.cached(added, "memory://inbox/added.png") is not None  # unknown keys: still a result
    assert store.cached(newer, "memory://inbox/newer.png") is not None
    rewritten = store.write("memory://inbox/added.png", added, page_result("Added again"))
    assert rewritten["sidecar_path"] == first["sidecar_path"]
    assert json.loads(faulty.cat_file(added_path))["source_document"] == "memory://inbox/book.pdf"
    kept_apart = store.write("memory://inbox/newer.png", newer, page_result("Newer again"))
    assert kept_apart["sidecar_path"] != second["sidecar_path"]
    assert faulty.cat_file(newer_path) == newer_bytes  # never overwritten


def test_a_result_of_another_model_gets_a_folder_of_its_own_and_the_old_one_stays(faulty):
    """A folder never changes model: whatever points at the old model's result still finds it."""
    digest = "ef" * 32
    old = ResultStore(LAKE).write("memory://inbox/page.png", digest, page_result("By v2"))
    new = ResultStore(LAKE, model="v3-2026").write("memory://inbox/page.png", digest, page_result("By v3"))
    assert new["markdown_path"].rsplit("/", 2)[1] == f"page.v3-2026-{digest[:12]}"
    assert markdown_of(faulty, old) == "# By v2\n"
    assert json.loads(faulty.cat_file(MemoryFileSystem._strip_protocol(old["sidecar_path"])))["model"] == "v2"

    for model, text in (("v2", "# By v2\n"), ("v3-2026", "# By v3\n")):
        found = ResultStore(LAKE, model=model).cached(digest, "memory://inbox/page.png")
        assert found is not None and markdown_of(faulty, found) == text
        copy = ResultStore(LAKE, model=model).cached(digest, "memory://inbox/renamed.png")
        assert copy is not None and markdown_of(faulty, copy) == text
    again = ResultStore(LAKE, model="v3-2026").write(
        "memory://inbox/page.png", digest, page_result("v3 again")
    )
    assert again["markdown_path"] == new["markdown_path"]  # its own model's folder is rewritten in place
    assert markdown_of(faulty, old) == "# By v2\n"


def test_a_newer_release_sidecar_whose_keys_changed_shape_is_never_overwritten(faulty):
    """Taken whatever its keys look like; not a hit, since what this release reads of it is not usable."""
    digest = "c3" * 32
    first = ResultStore(LAKE).write("memory://inbox/page.png", digest, page_result("Page"))
    path = MemoryFileSystem._strip_protocol(first["sidecar_path"])
    sidecar = json.loads(faulty.cat_file(path))
    newer = json.dumps({**sidecar, "format_version": 2, "markdown": {"files": ["page.md"]}}).encode()
    faulty.pipe_file(path, newer)

    store = ResultStore(LAKE)
    assert store.cached(digest, "memory://inbox/page.png") is None
    record = store.write("memory://inbox/page.png", digest, page_result("Page again"))
    assert record["sidecar_path"] != first["sidecar_path"]
    assert faulty.cat_file(path) == newer
    assert (
        markdown_of(faulty, ResultStore(LAKE).cached(digest, "memory://inbox/page.png")) == "# Page again\n"
    )


@pytest.mark.parametrize("markdown", ["../other-c3c3c3c3c3c3/other.md", "sub/page.md", "/page.md"])
def test_a_sidecar_whose_markdown_lies_outside_its_folder_is_not_a_hit(faulty, markdown):
    """A record never points at another folder's file, whatever a sidecar says."""
    digest = "d4" * 32
    first = ResultStore(LAKE).write("memory://inbox/page.png", digest, page_result("Page"))
    path = MemoryFileSystem._strip_protocol(first["sidecar_path"])
    sidecar = json.loads(faulty.cat_file(path))
    assert ResultStore(LAKE).cached(digest, "memory://inbox/page.png") is not None  # the control
    faulty.pipe_file(path, json.dumps({**sidecar, "markdown": markdown}).encode())
    assert ResultStore(LAKE).cached(digest, "memory://inbox/page.png") is None


def test_a_rewrite_cut_short_leaves_no_hit_beside_a_half_written_markdown(faulty):
    """Rewriting a complete result in place removes its sidecar first: a cut leaves no false hit."""
    digest = "e5" * 32
    text = "A long title " * 20
    first = ResultStore(LAKE).write("memory://inbox/page.png", digest, page_result(text))
    assert ResultStore(LAKE).cached(digest, "memory://inbox/page.png") is not None  # the control
    faulty.failing_writes.add(MemoryFileSystem._strip_protocol(first["markdown_path"]))
    with pytest.raises(Doc2XStorageError, match=r"page\.md"):
        ResultStore(LAKE).write("memory://inbox/page.png", digest, page_result(text))  # overwrite=True
    faulty.heal()
    assert ResultStore(LAKE).cached(digest, "memory://inbox/page.png") is None  # parsed again, not half


@pytest.mark.parametrize("where", ["local", "local/with/slash/", "memory"])
def test_record_paths_are_the_object_storage_paths_of_the_files_written(tmp_path, memory_fs, where):
    """A record's paths (made without joining ObjectStoragePaths) name the files written, and read back."""
    from airflow_provider_doc2x.storage.objects import storage_path

    root = "memory://lake/paths" if where == "memory" else str(tmp_path / where)
    figure = zip_payload({"images/fig.jpg": b"\xff\xd8figure"})
    record = ResultStore(root).write("scans/A page.png", "d" * 64, result_with(figure, "![](fig.jpg)"))
    folder = storage_path(root) / "A_page-dddddddddddd"
    assert record["markdown_path"] == str(folder / "A_page.md")
    assert record["sidecar_path"] == str(folder / "A_page.json")
    assert record["figure_paths"] == [str(folder / "images" / "fig.jpg")]
    assert storage_path(record["figure_paths"][0]).read_bytes() == b"\xff\xd8figure"
    again = ResultStore(root).cached("d" * 64, "scans/A page.png")
    assert again is not None and again["markdown_path"] == record["markdown_path"]
    assert storage_path(again["markdown_path"]).read_text() == "![](images/fig.jpg)\n"
