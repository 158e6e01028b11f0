"""Local paths through the ``file`` store attached up front, and what else shares the process with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator
from airflow_provider_doc2x.storage import objects as storage
from tests.helpers import AIRFLOW_VERSION, parse_operator, run_deferred
from tests.helpers import s3 as s3_api

s3_server, s3 = s3_api.s3_server, s3_api.s3  # the fixtures

#: What the scripts below share: run the operator over argv[1] (a JSON list) into argv[2].
PARSE = """
import json, os, sys
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator
from airflow_provider_doc2x.storage.objects import storage_path

def parse(images, output):
    records = Doc2XImageParseOperator(
        task_id="parse", image_path=images, output_path=output, deferrable=False, poll_interval=0.05
    ).execute({})
    return [storage_path(record["markdown_path"]).read_text().splitlines()[0] for record in records]
"""


def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh Python process of this venv; its last printed line, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", PARSE + script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_spelling_of_a_local_image_is_parsed_and_a_second_run_is_cached(
    doc2x, make_image, tmp_path, monkeypatch
):
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    monkeypatch.chdir(tmp_path)
    paths = [make_image(f"p{number}.png", f"Page {number}") for number in range(6)]
    images = [
        str(paths[0]),
        f"file://{paths[1]}",
        f"FILE://{paths[2]}",
        paths[3].name,  # relative to the working folder
        paths[4],  # a pathlib.Path
        ObjectStoragePath(f"file://{paths[5]}"),
    ]
    if AIRFLOW_VERSION < (3, 0):
        images.remove(f"FILE://{paths[2]}")  # Airflow 2.11's paths refuse an upper-case scheme
        paths.pop(2)
    output = str(tmp_path / "lake")

    op = Doc2XImageParseOperator(
        task_id="parse", image_path=images, output_path=output, deferrable=True, poll_interval=0.05
    )
    headings = [Path(r["markdown_path"][len("file://") :]).read_text() for r in run_deferred(op, {})]
    assert [text.splitlines()[0] for text in headings] == [f"# Page {path.stem[1:]}" for path in paths]
    assert doc2x.stats()["billed_total"] == len(paths)
    again = Doc2XImageParseOperator(
        task_id="parse", image_path=images, output_path=f"file://{output}", poll_interval=0.05
    ).execute({})
    assert [record["cached"] for record in again] == [True] * len(paths)
    assert doc2x.stats()["billed_total"] == len(paths)


def test_local_reads_and_writes_are_in_the_task_lineage(doc2x, make_image, tmp_path):
    """The ``file://`` image and the files written, in the facets of a process where the store was attached up front."""
    pytest.importorskip("airflow.providers.openlineage")
    image = make_image("seen.png", "Seen")
    script = """
op = Doc2XImageParseOperator(task_id="parse", image_path=[sys.argv[1]], output_path=sys.argv[2], poll_interval=0.05)
op.execute({})
facets = op.get_openlineage_facets_on_complete(None)
print(json.dumps({"inputs": [(d.namespace, d.name) for d in facets.inputs], "outputs": [d.name for d in facets.outputs]}))
"""
    lineage = run_script(
        script,
        f"file://{image}",
        f"file://{tmp_path / 'lake'}",
        env={
            "AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json(),
            "AIRFLOW__OPENLINEAGE__TRANSPORT": '{"type": "console"}',
        },
    )
    assert lineage["inputs"] == [["file", str(image)]]
    assert {name.rsplit("/", 1)[-1] for name in lineage["outputs"]} == {"seen.md"}


def test_s3_and_memory_still_work_in_a_process_that_used_a_local_path_first(doc2x, s3, make_image, tmp_path):
    """Local first, then s3 (images and results) and memory, in one fresh process: one task of both kinds."""
    local = make_image("local.png", "Local Page")
    s3.client().put_object(
        Bucket=s3.bucket, Key="scans/remote.png", Body=render(Page(title="Remote Page"), size=(400, 300))
    )
    script = """
from airflow.providers.common.compat.sdk import ObjectStoragePath
from airflow_provider_doc2x.storage.objects import ensure_filesystem
local, remote, output = sys.argv[1:4]
first = len(storage_path(local).read_bytes())
ensure_filesystem("memory")
memory = ObjectStoragePath("memory://scratch/a.txt")
memory.parent.mkdir(parents=True, exist_ok=True)
memory.write_text("kept")
memory_text = storage_path("memory://scratch/a.txt").read_text()
print(json.dumps([first > 0, parse([local, remote], output), memory_text, len(storage_path(remote).read_bytes()) > 0]))
"""
    answer = run_script(
        script,
        str(local),
        s3.url("scans/remote.png"),
        s3.url("lake", conn_id="aws_default"),
        env={"AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json()},
    )
    assert answer == [True, ["# Local Page", "# Remote Page"], "kept", True]
    assert any(key.startswith("lake/") for key in s3.objects())


def test_local_images_with_results_on_s3_in_the_test_process(doc2x, s3, make_image):
    images = [make_image("a.png", "Alpha"), make_image("b.png", "Beta")]
    storage.storage_path(images[0]).read_bytes()  # a local path first
    records = run_deferred(parse_operator(images, deferrable=True, output_path=s3.url("lake")), {})
    assert [record["markdown_path"].startswith("s3://") for record in records] == [True, True]
    headings = [storage.storage_path(r["markdown_path"]).read_text().splitlines()[0] for r in records]
    assert headings == ["# Alpha", "# Beta"]


def test_a_file_store_the_user_attached_first_is_kept_and_used(doc2x, make_image, tmp_path):
    image = make_image("mine.png", "Mine")
    script = """
from fsspec.implementations.local import LocalFileSystem
try:
    from airflow.sdk.io import attach
except ImportError:  # Airflow 2.11
    from airflow.io.store import attach

class UsersLocal(LocalFileSystem):
    cachable = False

users = attach(protocol="file", fs=UsersLocal(auto_mkdir=True))
headings = parse([sys.argv[1]], sys.argv[2])
print(json.dumps({
    "headings": headings,
    "kept": attach(protocol="file") is users,
    "used": type(storage_path(sys.argv[1]).fs).__name__,
}))
"""
    answer = run_script(
        script,
        str(image),
        str(tmp_path / "lake"),
        env={"AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json()},
    )
    assert answer == {"headings": ["# Mine"], "kept": True, "used": "UsersLocal"}


def test_file_uris_with_a_conn_id_and_local_uris_are_parsed(doc2x, make_image, tmp_path):
    """``file://conn@/path`` gets its own store (not the one attached for ``file``); ``local://`` is fsspec's."""
    with_conn, local_scheme = make_image("conn.png", "With Conn"), make_image("scheme.png", "Local Scheme")
    images = [f"file://fs_local@{with_conn}", f"local://{local_scheme}"]
    if AIRFLOW_VERSION < (3, 0):
        images.pop()  # Airflow 2.11 registers no filesystem for ``local``
    answer = run_script(
        "print(json.dumps(parse(json.loads(sys.argv[1]), sys.argv[2])))",
        json.dumps(images),
        str(tmp_path / "lake"),
        env={"AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json()},
    )
    assert answer == ["# With Conn", "# Local Scheme"][: len(images)]


def test_a_task_runner_forked_after_the_attach_reads_and_writes_local_files(doc2x, make_image, tmp_path):
    """LocalExecutor's way: the parent touched a local path (store attached), the child runs the task."""
    before, after = make_image("parent.png", "Parent"), make_image("child.png", "Child")
    script = """
storage_path(sys.argv[1]).read_bytes()
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.close(read)
    try:
        headings = parse([sys.argv[2]], sys.argv[3])
    except BaseException as error:
        headings = [repr(error)]
    os.write(write, json.dumps(headings).encode())
    os._exit(0)
os.close(write)
with os.fdopen(read) as pipe:
    headings = json.loads(pipe.read() or "[]")
status = os.waitpid(child, 0)[1]
print(json.dumps({"status": status, "child": headings, "parent_after": parse([sys.argv[1]], sys.argv[3])}))
"""
    answer = run_script(
        script,
        str(before),
        str(after),
        str(tmp_path / "lake"),
        env={"AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json()},
    )
    assert answer == {"status": 0, "child": ["# Child"], "parent_after": ["# Parent"]}


def test_a_local_path_round_trips_through_xcom_serialization(tmp_path):
    """Serialized in a process that attached the store, read back in one that did not (and in the same one)."""
    image = tmp_path / "round.png"
    image.write_bytes(render(Page(title="Round"), size=(400, 300)))
    serialize = """
try:
    from airflow.sdk.serde import serialize, deserialize
except ImportError:  # Airflow 2.11
    from airflow.serialization.serde import serialize, deserialize
path = storage_path(sys.argv[1])
data = json.loads(json.dumps(serialize(path)))
back = deserialize(data)
print(json.dumps({"data": data, "same": back == path and str(back) == str(path), "read": len(back.read_bytes())}))
"""
    here = run_script(serialize, str(image))
    assert here["same"] is True and here["read"] == image.stat().st_size
    elsewhere = run_script(
        """
try:
    from airflow.sdk.serde import deserialize
except ImportError:  # Airflow 2.11
    from airflow.serialization.serde import deserialize
back = deserialize(json.loads(sys.argv[1]))
print(json.dumps({"path": str(back), "read": len(back.read_bytes())}))
""",
        json.dumps(here["data"]),
    )
    assert elsewhere == {"path": f"file://{image}", "read": image.stat().st_size}


CLIENTS_LOADED = """
from airflow.providers.common.compat.sdk import ObjectStoragePath
images = json.loads(sys.argv[1])
if sys.argv[3] == "ObjectStoragePath":
    images = [ObjectStoragePath(f"file://{image}") for image in images]
headings = parse(images, sys.argv[2])
loaded = sorted(name for name in ("boto3", "botocore", "s3fs", "gcsfs", "adlfs") if name in sys.modules)
print(json.dumps({"headings": headings, "loaded": loaded}))
"""


@pytest.mark.parametrize("spelling", ["str", "ObjectStoragePath"])
def test_a_task_over_local_files_loads_no_object_store_client(doc2x, make_image, tmp_path, spelling):
    """The change's promise, seen from a whole task: local images in, local results out, no boto3."""
    pytest.importorskip("airflow.providers.amazon", reason="the Amazon provider is what loads boto3")
    images = [str(make_image("a.png", "Alpha")), str(make_image("b.png", "Beta"))]
    answer = run_script(
        CLIENTS_LOADED,
        json.dumps(images),
        str(tmp_path / "lake"),
        spelling,
        env={"AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json()},
    )
    assert answer == {"headings": ["# Alpha", "# Beta"], "loaded": []}
