"""
Partial success (``allowed_failures``): a bad page does not sink the batch when the user allows it;
the failures are named in the log, in XCom and under ``output_path``, and the next run sends them
again, nothing else.
"""

from __future__ import annotations

import json

import pytest
from airflow.exceptions import AirflowException

from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.failures import FAILURES_XCOM_KEY, allowed_count
from tests.helpers import TaskInstance, parse_operator, run_to_the_end

FAIL = "<!-- doc2x-fail: parse_error -->"


def run(op, ti):
    if op.deferrable:
        return run_to_the_end(op, {"ti": ti})[0]
    return op.execute({"ti": ti})


@pytest.mark.parametrize(("method", "deferrable"), [("async", True), ("sync", False), ("pdf", True)])
def test_failures_within_the_allowance_are_named_and_the_task_succeeds(
    doc2x, lane, make_image, tmp_path, method, deferrable
):
    good = [make_image(title=f"Good {n}") for n in range(3)]
    bad = make_image("bad.jpg", title="Bad", paragraphs=[FAIL])  # a JPEG keeps its text in a PDF too
    out = tmp_path / "out"
    ti = TaskInstance()
    op = parse_operator(
        [good[0], bad, *good[1:]],
        output_path=str(out),
        method=method,
        deferrable=deferrable,
        allowed_failures=1,
    )
    records = run(op, ti)
    assert [record["source"] for record in records] == [str(path) for path in good]
    (failure,) = ti.xcom[FAILURES_XCOM_KEY]
    assert failure["source"] == str(bad) and failure["code"] == "parse_error"
    assert failure["uid"] or method == "sync"  # the synchronous endpoint names no job
    (listed,) = (out / "_failures").rglob("*.jsonl")
    assert (
        listed.relative_to(out / "_failures").as_posix()
        == "nightly/parse/scheduled__2026-12-01/-1-try-1.jsonl"
    )
    assert [json.loads(line) for line in listed.read_text().splitlines()] == [failure]


def test_the_next_run_sends_the_failed_image_again_and_nothing_else(doc2x, make_image, tmp_path):
    images = [make_image(title=f"Good {n}") for n in range(3)]
    bad = make_image(title="Bad", paragraphs=[FAIL])
    kwargs = {
        "output_path": str(tmp_path / "out"),
        "incremental": True,
        "allowed_failures": 1,
        "deferrable": True,
    }
    run(parse_operator([*images, bad], **kwargs), TaskInstance())
    first = doc2x.stats()["jobs"]
    assert first == 4
    with pytest.raises(Doc2XError, match=r"1 of 4 images were not parsed"):
        run(parse_operator([*images, bad], **{**kwargs, "allowed_failures": 0}), TaskInstance())
    assert doc2x.stats()["jobs"] == first + 1  # only the failed image was sent again


def test_more_failures_than_allowed_fail_the_task_naming_each(doc2x, make_image):
    bad = [make_image(title=f"Bad {n}", paragraphs=[FAIL]) for n in range(2)]
    good = make_image(title="Good")
    with pytest.raises(Doc2XError) as caught:
        run(parse_operator([good, *bad], deferrable=True, allowed_failures=1), TaskInstance())
    message = str(caught.value)
    assert "2 of 3 images were not parsed" in message and all(str(path) in message for path in bad)


def test_a_fraction_allows_that_share_of_the_task_s_images_rounded_down():
    assert [allowed_count(0.01, total) for total in (99, 100, 250)] == [0, 1, 2]
    assert allowed_count(0.5, 2) == 1 and allowed_count(3, 10) == 3


@pytest.mark.parametrize("value", [-1, 1.0, 1.5, -0.1, "1", True, None])
def test_an_allowance_that_is_neither_a_count_nor_a_fraction_is_refused_when_the_dag_is_parsed(value):
    with pytest.raises((ValueError, AirflowException), match="allowed_failures"):
        parse_operator(["a.png"], allowed_failures=value)


def lineage_names(op) -> tuple[list[str], set[str]]:
    """What OpenLineage reports for the task: its inputs in order, its outputs' file names."""
    lineage = op.get_openlineage_facets_on_complete(None)
    return [dataset.name for dataset in lineage.inputs], {dataset.name for dataset in lineage.outputs}


@pytest.mark.parametrize("method", ["async", "pdf"])
def test_the_lineage_names_the_failed_image_and_the_list_of_failures(doc2x, make_image, tmp_path, method):
    pytest.importorskip("airflow.providers.openlineage")
    good = make_image(title="Good")
    bad = make_image("bad.jpg", title="Bad", paragraphs=[FAIL])
    out = tmp_path / "out"
    op = parse_operator([good, bad], output_path=str(out), method=method, deferrable=True, allowed_failures=1)
    run(op, TaskInstance())
    inputs, outputs = lineage_names(op)
    assert inputs == [str(good), str(bad)]  # the failed image was read and sent too
    written = {str(path) for path in out.rglob("*") if path.is_file() and path.suffix != ".json"}
    assert any("/_failures/" in path for path in written)
    assert written <= outputs  # every file written but the sidecars (bookkeeping)


def test_a_failed_task_still_names_what_it_read_and_wrote(doc2x, make_image, tmp_path):
    pytest.importorskip("airflow.providers.openlineage")
    good = [make_image(title=f"Good {n}") for n in range(2)]
    bad = make_image("bad.jpg", title="Bad", paragraphs=[FAIL])
    out = tmp_path / "out"
    op = parse_operator([*good, bad], output_path=str(out), deferrable=True)
    with pytest.raises(Doc2XError):
        run(op, TaskInstance())
    inputs, outputs = lineage_names(op)
    assert inputs == [str(path) for path in [*good, bad]]
    written = {str(path) for path in out.rglob("*") if path.is_file() and path.suffix == ".md"}
    assert len(written) == 2 and written <= outputs  # the paid results


def test_a_task_stopped_before_its_outcomes_still_names_the_images_it_took_on(doc2x, make_image):
    """Doc2X's quota runs out mid-batch: the task fails, and its lineage names every image it took on."""
    pytest.importorskip("airflow.providers.openlineage")
    images = [make_image(title=f"Page {n}") for n in range(3)]
    doc2x.configure(quota=1)
    op = parse_operator(images, deferrable=True)
    with pytest.raises(Doc2XError):
        run(op, TaskInstance())
    inputs, outputs = lineage_names(op)
    assert inputs == [str(path) for path in images] and outputs == set()
