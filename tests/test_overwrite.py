"""
``overwrite=True`` parses again what ``output_path`` already holds, in every lane and however the
task waits; without it the stored result is reused and nothing is paid.
"""

from __future__ import annotations

import pytest

from airflow_provider_doc2x.local.samples import Page, render
from tests.helpers import StateStore, parse_operator, run_to_the_end

LANES = [
    pytest.param({"method": "async", "deferrable": True}, id="async-deferred"),
    pytest.param({"method": "async", "deferrable": False}, id="async-worker"),
    pytest.param({"method": "sync"}, id="sync"),
    pytest.param({"method": "pdf", "deferrable": True}, id="pdf-deferred"),
    pytest.param({"method": "pdf", "deferrable": False}, id="pdf-worker"),
]


@pytest.fixture
def server(doc2x):
    doc2x.configure(pickup_delay=0, pdf_page_seconds=0, export_seconds=0)
    return doc2x


def paid(stats) -> int:
    return stats["billed_total"] + stats.get("pdf_pages_billed", 0)


@pytest.mark.parametrize("lane", LANES)
def test_overwrite_parses_again_what_output_path_holds(server, tmp_path, lane):
    images = []
    for n in range(2):
        path = tmp_path / f"img-{n}.jpg"
        path.write_bytes(render(Page(title=f"Again {n}"), fmt="JPEG", size=(400, 300)))
        images.append(path)
    out = str(tmp_path / "out")
    store = StateStore()
    first = run_to_the_end(parse_operator(images, output_path=out, **lane), {"task_state_store": store})[0]
    assert [record["cached"] for record in first] == [False, False]
    assert paid(server.stats()) == 2

    reused = run_to_the_end(
        parse_operator(images, output_path=out, **lane), {"task_state_store": StateStore()}
    )[0]
    assert [record["cached"] for record in reused] == [True, True]
    assert paid(server.stats()) == 2

    again = run_to_the_end(
        parse_operator(images, output_path=out, overwrite=True, **lane), {"task_state_store": StateStore()}
    )[0]
    assert [record["cached"] for record in again] == [False, False]
    assert paid(server.stats()) == 4
    assert [record["markdown_path"] for record in again] == [record["markdown_path"] for record in first]
