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
import zipfile
from pathlib import Path

import pytest

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.archives import decode_base64, unpack_figures
from airflow_provider_doc2x.results import ResultStore
from tests.helpers import parse_operator, run_deferred

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
    assert sidecar["pages"] == [{"page_idx": 0, "page_width": 400, "page_height": 300}]
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


def test_openlineage_facets_list_images_and_markdown_files(doc2x, make_image, tmp_path):
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
    ]


def test_openlineage_namespaces_for_object_storage():
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_doc2x.operators.doc2x import lineage_dataset

    dataset = lineage_dataset("s3://bucket/scans/page.png")
    assert (dataset.namespace, dataset.name) == ("s3://bucket", "scans/page.png")


HOOK_LINEAGE_SCRIPT = """
import json, sys
try:
    from airflow.sdk.lineage import get_hook_lineage_collector
except ImportError:  # Airflow 2
    from airflow.lineage.hook import get_hook_lineage_collector
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

collector = get_hook_lineage_collector()
Doc2XImageParseOperator(
    task_id="parse", image_path=sys.argv[1], output_path=sys.argv[2], poll_interval=0.05
).execute({})
lineage = getattr(collector, "collected_assets", None) or collector.collected_datasets  # Airflow 2 says datasets
print(json.dumps({
    "collector": type(collector).__name__,
    "inputs": [info.asset.uri if hasattr(info, "asset") else info.dataset.uri for info in lineage.inputs],
    "outputs": [info.asset.uri if hasattr(info, "asset") else info.dataset.uri for info in lineage.outputs],
}))
"""


def test_reads_and_writes_feed_hook_level_lineage(doc2x, make_image, tmp_path):
    """With a lineage reader active (OpenLineage here), every read and write is collected."""
    pytest.importorskip("airflow.providers.openlineage")
    image = make_image("seen.png", "Seen")
    result = subprocess.run(
        [sys.executable, "-c", HOOK_LINEAGE_SCRIPT, str(image), str(tmp_path / "lake")],
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
    assert lineage["collector"] == "HookLineageCollector"
    assert f"file://{image}" in lineage["inputs"]
    written = {uri.rsplit("/", 1)[-1] for uri in lineage["outputs"]}
    assert {"seen.md", "seen.json"} <= written
