"""
The example DAGs are the docs' snippets and the end-to-end tests: they import cleanly without
touching the network, and run against the local server with ``airflow dags test``, deferrable
(trigger run in line) and not.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from airflow.providers.common.compat.sdk import BaseHook

from tests.helpers import AIRFLOW_VERSION, HAS_TASK_STATE_STORE, REPO, airflow_cli, dags_test, register_assets

#: Every supported Airflow line runs these (docs/installation.md, "By Airflow line"), not only the newest and oldest.
pytestmark = pytest.mark.compat

EXAMPLES = REPO / "example_dags"
#: The lines between the newest and the oldest run the compatibility suite: each example DAG once,
#: end to end. What a second run proves (nothing paid again) is the provider's own logic, run on
#: 3.3 and 2.11 with the whole suite.
ONCE = (3, 0) <= AIRFLOW_VERSION < (3, 3)
EXAMPLE_DAG_IDS = {
    "example_doc2x_parse_image",
    "example_doc2x_parse_folder",
    "example_doc2x_parse_to_storage",
    "example_doc2x_incremental",
    "example_doc2x_incremental_index",
    "example_doc2x_bulk_pdf",
    "example_doc2x_documents",
    "example_doc2x_cost_control",
}
TITLES = {
    "invoice": "# Invoice 2026-0042",
    "letter": "# Letter of Intent",
    "report": "# Quarterly Report",
    "scan": "# Shipping Manifest",
}


def dag_bag():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2
        from airflow.models.dagbag import DagBag
    return DagBag(dag_folder=str(EXAMPLES))  # [core] load_examples is off in the suite


def test_every_example_dag_imports_without_opening_a_connection(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("parsing a DAG file must not open a connection or call the network")

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(no_network))
    monkeypatch.setattr(httpx.Client, "send", no_network)
    monkeypatch.setattr(httpx.AsyncClient, "send", no_network)
    bag = dag_bag()
    assert bag.import_errors == {}
    assert set(bag.dag_ids) >= EXAMPLE_DAG_IDS
    for dag_id in EXAMPLE_DAG_IDS:
        assert set(bag.dags[dag_id].tags) == {"example", "doc2x"}


def markdown_files(folder: Path) -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(folder.glob("*.md"))}


@pytest.mark.parametrize(
    ("dag_id", "expected"),
    [("example_doc2x_parse_image", {"invoice"}), ("example_doc2x_parse_folder", set(TITLES))],
)
def test_example_dag_with_airflow_dags_test_deferrable(doc2x, airflow_db, tmp_path, dag_id, expected):
    dags_test(dag_id, {"markdown_dir": str(tmp_path)}, doc2x)
    written = markdown_files(tmp_path)
    assert set(written) == expected
    for stem, text in written.items():
        assert text.startswith(TITLES[stem])
    assert doc2x.stats()["max_billed_per_image"] == 1


def test_example_dag_to_storage_twice_pays_once(doc2x, airflow_db, tmp_path):
    lake = tmp_path / "lake"
    first = dags_test("example_doc2x_parse_to_storage", {"output_path": str(lake)}, doc2x)
    assert first.count("parsed: ") == len(TITLES)
    folders = sorted(path.name for path in lake.iterdir())
    assert [name.rsplit("-", 1)[0] for name in folders] == sorted(TITLES)
    assert (lake / folders[0] / "invoice.md").read_text().startswith(TITLES["invoice"])
    if ONCE:
        return
    second = dags_test("example_doc2x_parse_to_storage", {"output_path": str(lake)}, doc2x)
    assert second.count("reused: ") == len(TITLES)
    assert doc2x.stats()["requests"]["submit"] == len(TITLES)


def test_cost_control_example_plans_what_the_parse_then_bills_and_reports_its_usage(
    doc2x, airflow_db, tmp_path
):
    lake = tmp_path / "lake"
    first = dags_test("example_doc2x_cost_control", {"output_path": str(lake)}, doc2x)
    said = [line for line in first.splitlines() if "planned: " in line or "Doc2X usage" in line]
    assert f"planned: {len(TITLES)} pages; billed: {len(TITLES)} pages" in first, said
    assert doc2x.stats()["billed_total"] == len(TITLES)
    if ONCE:
        return
    again = dags_test("example_doc2x_cost_control", {"output_path": str(lake)}, doc2x)
    assert "planned: 0 pages; billed: 0 pages" in again
    assert f"reused: {len(TITLES)} pages; failed: 0 images" in again
    assert doc2x.stats()["billed_total"] == len(TITLES)


def run_dag(dag, **run_conf):
    run = dag.test(run_conf=run_conf)
    return run.state if hasattr(run, "state") else run


def test_example_dag_not_deferrable(doc2x, airflow_db, tmp_path):
    dag = dag_bag().dags["example_doc2x_parse_folder"]
    dag.get_task("parse").partial_kwargs["deferrable"] = False
    assert run_dag(dag, markdown_dir=str(tmp_path)) == "success"
    written = markdown_files(tmp_path)
    assert set(written) == set(TITLES)
    assert written["report"].startswith(TITLES["report"])
    assert "<!-- Media -->" in written["report"]


def test_a_forced_second_try_makes_no_new_submission(doc2x, airflow_db, make_image):
    """Tries that time out while Doc2X still works; each next try reconnects to the recorded uid."""
    if not HAS_TASK_STATE_STORE:
        pytest.skip("the task state store arrived in Airflow 3.3; older versions resubmit on a new try")
    doc2x.configure(processing_time=1.5)
    image = make_image(title="Pay Once")
    output = dags_test(
        "doc2x_forced_retry", {"image": str(image)}, doc2x, dags_folder=REPO / "tests" / "dags"
    )
    assert "Reconnected" in output  # the later tries said what they did
    assert "still processing at the deadline" in output  # and the first one did time out
    stats = doc2x.stats()
    assert stats["requests"]["submit"] == 1
    assert stats["billed_total"] == 1


def asset_events_and_queue(uri: str, dag_id: str) -> tuple[list[dict], bool]:
    """The extras of an asset's events, oldest first, and whether a run of ``dag_id`` is queued on it."""
    from airflow.utils.session import create_session

    if AIRFLOW_VERSION >= (3, 0):
        from airflow.models import asset as models

        Model, Event, Queue = models.AssetModel, models.AssetEvent, models.AssetDagRunQueue
        event_key, queue_key = Event.asset_id, Queue.asset_id
    else:  # Airflow 2: datasets
        from airflow.models import dataset as models

        Model, Event, Queue = models.DatasetModel, models.DatasetEvent, models.DatasetDagRunQueue
        event_key, queue_key = Event.dataset_id, Queue.dataset_id
    with create_session() as session:
        (asset_id,) = session.query(Model.id).filter(Model.uri == uri).one()
        extras = [
            event.extra for event in session.query(Event).filter(event_key == asset_id).order_by(Event.id)
        ]
        queued = session.query(Queue).filter(queue_key == asset_id, Queue.target_dag_id == dag_id).count() > 0
    return extras, queued


def test_incremental_example_two_daily_runs_bill_what_is_new_and_trigger_the_index(
    doc2x, airflow_db, tmp_path, make_image
):
    """
    ``dags test`` for two consecutive days. A run's window ends at its data interval's end (its
    logical date under ``dags test``, on both Airflow lines) and starts an hour before the last
    successful run's: an image stored just before the first day's end is listed twice, and skipped
    the second time without being read.
    """
    inbox, lake = tmp_path / "inbox", tmp_path / "lake"
    inbox.mkdir()
    stored = {
        "old": datetime(2025, 12, 31, 12, tzinfo=timezone.utc),  # first run only
        "edge": datetime(2025, 12, 31, 23, 30, tzinfo=timezone.utc),  # both runs (look-back)
        "new": datetime(2026, 1, 1, 12, tzinfo=timezone.utc),  # second run only
    }
    for name, at in stored.items():
        image = inbox / f"{name}.png"
        make_image(f"{name}.png", f"Page {name.title()}").rename(image)
        os.utime(image, (at.timestamp(), at.timestamp()))
    env = {"AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json()}
    conf = json.dumps({"prefix": str(inbox), "output_path": str(lake)})
    upstream, downstream = "example_doc2x_incremental", "example_doc2x_incremental_index"

    def day(date: str) -> str:
        result = airflow_cli("dags", "test", upstream, date, "-c", conf, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        return result.stdout + result.stderr

    # What the dag processor does: the DAGs and their assets in the database; the index unpaused.
    for command in (("dags", "reserialize"), ("dags", "unpause", downstream)):
        result = airflow_cli(*command, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    first = day("2026-01-01")
    assert "new images: 2" in first
    assert doc2x.stats()["billed_total"] == 2
    if ONCE:  # the index DAG too, once, on what the first day stored
        result = airflow_cli("dags", "test", downstream, "2026-01-01", env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert "indexed: " in result.stdout + result.stderr
        return
    second = day("2026-01-02")
    assert "new images: 2" in second  # edge (listed again) and new
    assert "Manifest: 1 of 2 images unchanged" in second  # edge was not read
    assert doc2x.stats()["billed_total"] == 3  # only new
    assert doc2x.stats()["max_billed_per_image"] == 1

    extras, queued = asset_events_and_queue("file:///tmp/doc2x-incremental/lake", downstream)
    folders = [
        [path.split("/")[-2].rsplit("-", 1)[0] for path in extra["markdown_paths"]] for extra in extras
    ]
    assert folders[-2:] == [["edge", "old"], ["new"]]
    assert queued  # the scheduler would start the index now

    result = airflow_cli("dags", "test", downstream, "2026-01-02", env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (indexed,) = [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("indexed: ")
    ]
    assert "/new-" in indexed


def test_bulk_pdf_example_with_airflow_dags_test_defers_per_wave_and_pays_once(doc2x, airflow_db, tmp_path):
    """
    The bulk lane under ``dags test``: two pages in flight (the connection's bound) make two PDFs of
    two pages, one at a time, so the task resumes and defers again; the figure is stored from the
    PDF's export. A second run reuses every result.
    """
    doc2x.configure(pickup_delay=0.2, pdf_page_seconds=0.05, export_seconds=0)
    lake = tmp_path / "lake"
    env = {
        "AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json(
            pdf_max_pages_in_flight=2, retry_wait=0.01, retry_wait_max=0.05
        )
    }
    conf = json.dumps({"output_path": str(lake)})
    register_assets(env)
    result = airflow_cli("dags", "test", "example_doc2x_bulk_pdf", "-c", conf, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("parsed: ") == len(TITLES) and "page 1 of PDF" in output
    assert output.count("running trigger in line") >= 2  # one wait per PDF in flight
    folders = {path.name.rsplit("-", 1)[0]: path for path in lake.iterdir()}
    assert set(folders) == set(TITLES)
    for stem in ("report", "scan"):  # JPEG pages keep their text in the PDF (the local engine reads it)
        assert (folders[stem] / f"{stem}.md").read_text().startswith(TITLES[stem])
    (figure,) = (folders["report"] / "images").iterdir()
    assert f'<img src="images/{figure.name}"/>' in (folders["report"] / "report.md").read_text()
    stats = doc2x.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"], stats["max_pdf_billed_per_page"]) == (2, 4, 1)
    assert stats["max_pages_in_progress"] <= 2 and stats["billed_total"] == 0
    if ONCE:
        return
    again = airflow_cli("dags", "test", "example_doc2x_bulk_pdf", "-c", conf, env=env)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("reused: ") == len(TITLES)
    assert doc2x.stats()["preuploads"] == 2


def test_documents_example_parses_a_mixed_folder_one_record_per_file_and_a_rerun_bills_nothing(
    doc2x, airflow_db, tmp_path
):
    """
    ``example_dags/documents/`` under ``dags test``, deferrable: a PDF and a fax TIFF are documents
    of 3 pages each through the PDF API, the PNG, the JPEG and the WebP (converted to PNG) are
    images of the image API; each file is billed its pages once, and a second run reuses them all.
    """
    doc2x.configure(pickup_delay=0.2, pdf_page_seconds=0.05, export_seconds=0)
    lake = tmp_path / "lake"
    output = dags_test("example_doc2x_documents", {"output_path": str(lake)}, doc2x)
    assert "running trigger in line" in output
    assert output.count("parsed: ") == 5
    assert "report.pdf (pdf, as it is): 3 pages" in output
    assert "fax.tiff (tiff, packed into a PDF): 3 pages" in output
    assert "photo.webp (webp, converted to PNG): 1 page" in output
    folders = {path.name.rsplit("-", 1)[0]: path for path in lake.iterdir()}
    assert set(folders) == {"report", "fax", "photo", "letter", "scan"}
    sidecars = {stem: json.loads((folder / f"{stem}.json").read_text()) for stem, folder in folders.items()}
    markdown = {stem: (folder / f"{stem}.md").read_text() for stem, folder in folders.items()}

    for stem, source_format in (("report", "pdf"), ("fax", "tiff")):
        sidecar = sidecars[stem]
        assert sidecar["source"] == str(EXAMPLES / "documents" / f"{stem}.{source_format}")
        assert sidecar["document"] is True and sidecar["source_format"] == source_format
        assert [(page["page"], page["page_idx"]) for page in sidecar["pages"]] == [(1, 0), (2, 1), (3, 2)]
        assert [number for number, _ in pages_of(markdown[stem])] == [1, 2, 3]
    assert "converted" not in sidecars["report"] and sidecars["fax"]["converted"] == "pdf"
    assert [text.splitlines()[0] for _, text in pages_of(markdown["report"])] == [
        "# Annual Report 2025",
        "# Pages by Department",
        "Appendix: Contacts",  # the born-digital page: its text layer
    ]
    assert (sidecars["photo"]["source_format"], sidecars["photo"]["converted"]) == ("webp", "png")
    assert markdown["letter"].startswith(TITLES["letter"]) and markdown["scan"].startswith(TITLES["scan"])
    assert "<!-- page" not in markdown["letter"]  # an image is one page: no marker

    billed = doc2x.stats()
    assert (billed["billed_total"], billed["max_billed_per_image"]) == (3, 1)  # letter, scan, photo
    assert (billed["pdf_tasks"], billed["pdf_pages_billed"], billed["max_pdf_billed_per_page"]) == (2, 6, 1)
    if ONCE:
        return

    again = dags_test("example_doc2x_documents", {"output_path": str(lake)}, doc2x)
    assert again.count("reused: ") == 5 and "parsed: " not in again
    after = doc2x.stats()
    assert (after["billed_total"], after["pdf_pages_billed"]) == (3, 6)
    assert (after["requests"]["submit"], after["preuploads"]) == (3, 2)  # nothing sent again


def pages_of(markdown: str) -> list[tuple[int, str]]:
    """A document's Markdown split on its page markers (``<!-- page N -->``), as a chunker would."""
    parts = re.split(r"<!-- page (\d+) -->", markdown)
    return [(int(parts[i]), parts[i + 1].strip()) for i in range(1, len(parts), 2)]
