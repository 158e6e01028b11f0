"""
The task's journal under a slow task state store: PDFs submitted side by side must each be found in
the task's list of PDFs, so that a new try reconnects to all of them instead of paying again.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x.journal import STATE_INDEX_KEY
from airflow_provider_doc2x.local.samples import Page, render
from tests.helpers import StateStore, parse_operator, run_to_the_end


class SlowStore(StateStore):
    """A task state store whose reads take a while (a busy supervisor), as a fault injected."""

    def __init__(self) -> None:
        super().__init__()
        self.calls_at_once = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            self.calls_at_once += 1
            self.most_at_once = max(self.most_at_once, self.calls_at_once)
        try:
            time.sleep(0.3)
            return super().get(key, default)
        finally:
            with self._lock:
                self.calls_at_once -= 1


def two_sizes(tmp_path):
    """Four images of two sizes: two PDFs, submitted side by side."""
    paths = []
    for n, size in enumerate([(400, 300), (400, 300), (300, 500), (300, 500)]):
        path = tmp_path / f"page-{n}.jpg"
        path.write_bytes(render(Page(title=f"Side {n}"), fmt="JPEG", size=size))
        paths.append(path)
    return paths


def test_pdfs_submitted_side_by_side_on_a_first_try_are_all_in_the_task_s_list(lane, tmp_path):
    """A first try submits two PDFs at once; its worker is lost; the retry must reconnect to both, not pay again."""
    images = two_sizes(tmp_path)
    store = SlowStore()
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute({"task_state_store": store, "ti": SimpleNamespace(try_number=1)})
    assert lane.stats()["pdf_tasks"] == 2
    # The worker is lost here; the retry reads the journal.
    retry = parse_operator(images, method="pdf", deferrable=True)
    records = run_to_the_end(retry, {"task_state_store": store, "ti": SimpleNamespace(try_number=2)})[0]
    assert [record["markdown"].splitlines()[0] for record in records] == [f"# Side {n}" for n in range(4)]
    assert len(store.values[STATE_INDEX_KEY]["uids"]) == 2
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"]) == (2, 4)  # no PDF paid twice


def test_pdfs_submitted_side_by_side_at_a_resume_are_all_in_the_task_s_list(lane, tmp_path, monkeypatch):
    """The same at a resume within one try (a new journal object, nothing read yet)."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", lane.connection_json(pdf_max_in_flight=2, pdf_max_pages_in_flight=4)
    )
    images = [tmp_path / f"r-{n}.jpg" for n in range(6)]
    for n, path in enumerate(images):
        path.write_bytes(render(Page(title=f"Resume {n}"), fmt="JPEG", size=(400, 300)))
    store = SlowStore()
    context = {"task_state_store": store, "ti": SimpleNamespace(try_number=1)}
    op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=1)
    records = run_to_the_end(op, context)[0]
    assert len(records) == 6
    stats = lane.stats()
    assert sorted(store.values[STATE_INDEX_KEY]["uids"]) == sorted({r["uid"] for r in records})
    assert stats["pdf_tasks"] == 6
    assert store.most_at_once == 1  # one store call at a time
