"""The sensor: a job submitted elsewhere, waited for by poking or in the triggerer."""

from __future__ import annotations

import asyncio
import json

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x.events import LANE_PDF
from airflow_provider_doc2x.exceptions import Doc2XJobFailedError, Doc2XJobNotFoundError
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.pdf.packing import pack_images
from airflow_provider_doc2x.sensors.doc2x import Doc2XImageParseSensor
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from tests.helpers import REPO, STILL_PROCESSING, dags_test, first_event, wait_until

#: Every supported Airflow line runs these (docs/installation.md, "By Airflow line"), not only the newest and oldest.
pytestmark = pytest.mark.compat


def sensor(uid: str, **kwargs) -> Doc2XImageParseSensor:
    return Doc2XImageParseSensor(task_id="wait", uid=uid, poke_interval=0.05, timeout=30, **kwargs)


def test_poke_until_done_then_return_the_record(doc2x, make_image):
    doc2x.configure(processing_time=STILL_PROCESSING)
    uid = Doc2XHook().submit_image(make_image(title="Sensed"))
    waiter = sensor(uid)
    assert waiter.poke({}).is_done is False
    doc2x.configure(processing_time=0)
    done = wait_until(lambda: (value := waiter.poke({})).is_done and value)
    assert done.xcom_value["uid"] == uid
    assert done.xcom_value["markdown"].startswith("# Sensed")


def test_a_failed_or_unknown_job_fails_the_sensor_with_its_code(doc2x, make_image):
    uid = Doc2XHook().submit_image(make_image(paragraphs=["<!-- doc2x-fail: parse_error -->"]))
    waiter = sensor(uid)
    with pytest.raises(Doc2XJobFailedError, match=uid):
        wait_until(lambda: waiter.poke({}).is_done)
    with pytest.raises(Doc2XJobNotFoundError, match="no-such-uid"):
        sensor("no-such-uid").poke({})


def test_deferrable_defers_while_processing_and_not_once_done(doc2x, make_image):
    doc2x.configure(processing_time=30)
    uid = Doc2XHook().submit_image(make_image(title="Later"))
    with pytest.raises(TaskDeferred) as deferred:
        sensor(uid, deferrable=True).execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, Doc2XImageParseTrigger)
    assert [job["uid"] for job in trigger.jobs] == [uid]
    doc2x.configure(processing_time=0)
    record = sensor(uid, deferrable=True).execute({})
    assert record["markdown"].startswith("# Later")
    event = {"status": "success", "message": "", "jobs": [{"uid": uid, "source": uid, "status": "success"}]}
    assert sensor(uid).execute_complete({}, event)["uid"] == uid
    assert "sk-" not in json.dumps(trigger.serialize()[1])


def test_sensor_dag_pokes_and_defers(doc2x, airflow_db, make_image):
    image = make_image(title="Submitted Elsewhere")
    output = dags_test("doc2x_sensor", {"image": str(image)}, doc2x, dags_folder=REPO / "tests" / "dags")
    assert output.count(": # Submitted Elsewhere") == 2, output[-4000:]
    assert doc2x.stats()["billed_total"] == 1


@pytest.mark.parametrize("pickup_status", ["processing", "not_found"])
def test_the_sensor_waits_for_a_pdf_through_its_pickup(doc2x, tmp_path, pickup_status):
    doc2x.configure(pickup_delay=60, pickup_status=pickup_status, pdf_page_seconds=0)
    paths = []
    for title in ("Sensed One", "Sensed Two"):
        paths.append(tmp_path / f"{title}.jpg")
        paths[-1].write_bytes(render(Page(title=title), fmt="JPEG", size=(400, 300)))
    with pack_images(paths) as packed:
        submission = asyncio.run(Doc2XHook().pdf.asubmit_pdf(packed.pdfs[0].path, pages=2))
    sensor = Doc2XImageParseSensor(
        task_id="wait", uid=submission.uid, lane="pdf", poke_interval=0.05, timeout=30, deferrable=True
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    (job,) = deferred.value.trigger.jobs
    assert (job["uid"], job["lane"]) == (submission.uid, LANE_PDF)
    doc2x.configure(pickup_delay=0)
    event = asyncio.run(first_event(deferred.value.trigger))
    record = sensor.execute_complete({}, event)
    assert record["uid"] == submission.uid and [page["page_idx"] for page in record["pages"]] == [0, 1]
    assert record["markdown"].startswith("# Sensed One") and "# Sensed Two" in record["markdown"]
    poked = Doc2XImageParseSensor(task_id="poke", uid=submission.uid, lane="pdf").poke({})
    assert poked.is_done and poked.xcom_value["markdown"] == record["markdown"]
