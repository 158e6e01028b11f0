"""
What crosses the trigger boundary: a job the task made from what ``output_path`` holds is taken by
the trigger as the worker's own wait takes it, whatever the sidecar's uid looks like.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_provider_doc2x.local.samples import Page, render
from tests.helpers import parse_operator, run_to_the_end


@pytest.mark.parametrize("uid", [12345, ["0194f6a2", "page-3"]])
@pytest.mark.parametrize("deferrable", [False, True])
def test_a_stored_result_whose_sidecar_uid_is_not_a_string_is_reused_either_way(
    doc2x, tmp_path, uid, deferrable
):
    """A sidecar another tool (or a later format) wrote: reused as before, deferred or not."""
    doc2x.configure(pickup_delay=0)
    first, second = tmp_path / "first.jpg", tmp_path / "second.jpg"
    first.write_bytes(render(Page(title="Kept"), fmt="JPEG", size=(400, 300)))
    second.write_bytes(render(Page(title="New"), fmt="JPEG", size=(400, 300)))
    out = str(tmp_path / "out")
    (record,) = run_to_the_end(parse_operator([first], output_path=out), {})[0]
    sidecar = Path(record["sidecar_path"].removeprefix("file://"))
    meta = json.loads(sidecar.read_text())
    meta["uid"] = uid
    sidecar.write_text(json.dumps(meta))

    records = run_to_the_end(parse_operator([first, second], output_path=out, deferrable=deferrable), {})[0]
    assert [r["cached"] for r in records] == [True, False]
    assert records[0]["markdown_path"] == record["markdown_path"]
    assert doc2x.stats()["billed_total"] == 2
