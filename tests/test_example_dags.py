"""
The example DAGs are the docs' snippets and the end-to-end tests: they import cleanly without
touching the network, and run against the local server with ``airflow dags test``, deferrable
(trigger run in line) and not.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from airflow.providers.common.compat.sdk import BaseHook

from tests.helpers import HAS_TASK_STATE_STORE, REPO, dags_test

EXAMPLES = REPO / "example_dags"
EXAMPLE_DAG_IDS = {
    "example_doc2x_parse_image",
    "example_doc2x_parse_folder",
    "example_doc2x_parse_to_storage",
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
    second = dags_test("example_doc2x_parse_to_storage", {"output_path": str(lake)}, doc2x)
    assert second.count("reused: ") == len(TITLES)
    assert doc2x.stats()["requests"]["submit"] == len(TITLES)


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
