"""
The task's lineage when it fails in a later process: a fresh operator per resume, as Airflow runs
it, and OpenLineage's own extraction on failure. Every image taken on is named, and every result
file written by any process of the try (sidecars and the manifest are bookkeeping, not datasets).
"""

from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path

import img2pdf
import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x.local.samples import Page, render
from tests.helpers import StateStore, TaskInstance, first_event, parse_operator, use_connection

pytest.importorskip("airflow.providers.openlineage")


def openlineage_names(op) -> tuple[list[str], set[str]]:
    """What OpenLineage reports for the failed task: its inputs and its outputs, by name."""
    from airflow.providers.openlineage.extractors.manager import ExtractorManager
    from airflow.utils.state import TaskInstanceState

    metadata = ExtractorManager().extract_metadata(
        dagrun=types.SimpleNamespace(run_id="r1"),
        task=op,
        task_instance_state=TaskInstanceState.FAILED,
        task_instance=None,
    )
    return [dataset.name for dataset in metadata.inputs], {dataset.name for dataset in metadata.outputs}


def result_files(out: Path) -> set[str]:
    """The result files under ``out``: not the sidecars, not the manifest."""
    return {
        str(path)
        for path in out.rglob("*")
        if path.is_file() and "_manifest" not in path.parts and path.suffix != ".json"
    }


def run_fresh(make_operator, context, event_of=lambda number, event: event):
    """Run a task as Airflow does: a new operator for each resume; the last operator and the error."""
    operators = [make_operator()]
    call = lambda: operators[-1].execute(context)  # noqa: E731
    resumes = 0
    while True:
        try:
            call()
            return operators[-1], None
        except TaskDeferred as deferred:
            resumes += 1
            event = event_of(resumes, json.loads(json.dumps(asyncio.run(first_event(deferred.trigger)))))
            operators.append(make_operator())
            method = getattr(operators[-1], deferred.method_name)
            call = lambda method=method, event=event: method(context, event)  # noqa: E731
        except Exception as error:  # the task's failure is what the test looks at
            return operators[-1], error


def jpeg(path: Path, title: str, **page) -> Path:
    path.write_bytes(render(Page(title=title, **page), fmt="JPEG", size=(400, 300)))
    return path


def context() -> dict:
    return {"ti": TaskInstance(try_number=None), "task_state_store": StateStore()}


def an_error_at(resume: int):
    def event_of(number: int, event: dict) -> dict:
        if number != resume:
            return event
        return {
            **event,
            "status": "error",
            "message": "status calls failed 5 rounds in a row",
            "code": "server_error",
        }

    return event_of


@pytest.mark.parametrize("resume", [1, 3])
def test_an_error_in_a_later_resume_names_what_earlier_ones_stored(lane, tmp_path, monkeypatch, resume):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = [jpeg(tmp_path / f"p{n}.jpg", f"P {n}", figure=n == 0) for n in range(4)]
    out = tmp_path / "out"
    op, error = run_fresh(
        lambda: parse_operator(images, output_path=str(out), method="pdf", deferrable=True, pdf_max_pages=1),
        context(),
        an_error_at(resume),
    )
    assert error is not None
    inputs, outputs = openlineage_names(op)
    assert inputs == [str(image) for image in images]
    assert result_files(out) == outputs


def test_a_write_that_fails_in_a_later_resume_still_names_what_earlier_ones_stored(
    lane, tmp_path, monkeypatch
):
    from airflow_provider_doc2x.storage import results as results_module

    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = [jpeg(tmp_path / f"p{n}.jpg", f"P {n}", figure=n == 0) for n in range(4)]
    out = tmp_path / "out"
    writing, made = results_module.put_object, []

    def denied_from_the_third_operator(fs, path, data, *, uri):
        if len(made) >= 3 and path.endswith(".md"):
            raise PermissionError(13, "Access Denied", path)
        return writing(fs, path, data, uri=uri)

    monkeypatch.setattr(results_module, "put_object", denied_from_the_third_operator)

    def make_operator():
        made.append(1)
        return parse_operator(images, output_path=str(out), method="pdf", deferrable=True, pdf_max_pages=1)

    op, error = run_fresh(make_operator, context())
    assert error is not None
    inputs, outputs = openlineage_names(op)
    assert inputs == [str(image) for image in images]
    assert result_files(out) and result_files(out) == outputs


@pytest.mark.xfail(
    strict=True,
    reason="known gap: a raw convert_zip payload stored by an earlier process is in no record, so the "
    "last process cannot name it",
)
def test_a_raw_payload_stored_by_an_earlier_process_is_named(lane, tmp_path, monkeypatch):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    image = jpeg(tmp_path / "fig.jpg", "Figure page", figure=True)
    documents = []
    for n in range(3):
        path = tmp_path / f"d{n}.pdf"
        path.write_bytes(
            img2pdf.convert(
                [render(Page(title=f"D{n} {side}"), fmt="JPEG", size=(400, 300)) for side in "ab"]
            )
        )
        documents.append(path)
    out = tmp_path / "out"

    def make_operator():
        op = parse_operator([image, *documents], output_path=str(out), method="async", deferrable=True)
        op.results.max_zip_entries = 0  # a payload kept raw, as a malformed convert_zip is
        return op

    op, error = run_fresh(make_operator, context())
    assert error is None
    assert result_files(out) <= openlineage_names(op)[1]
