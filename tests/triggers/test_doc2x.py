"""The trigger in an event loop against the local server: statuses, failures, timeouts, restarts."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time

import pytest

from airflow_provider_doc2x import events
from airflow_provider_doc2x.exceptions import Doc2XJobFailedError
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.pdf.packing import pack_images
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from tests.helpers import API_KEY, async_wait_until, first_event


def make_trigger(uids, *, timeout: float = 30, **kwargs) -> Doc2XImageParseTrigger:
    return Doc2XImageParseTrigger(
        doc2x_conn_id="doc2x_default",
        jobs=[{"uid": uid, "source": f"image-{n}.png"} for n, uid in enumerate(uids)],
        poll_interval=kwargs.pop("poll_interval", 0.05),
        deadline=time.time() + timeout,
        **kwargs,
    )


def submit(*images) -> list[str]:
    hook = Doc2XHook()
    return [hook.submit_image(image) for image in images]


def rebuild(trigger: Doc2XImageParseTrigger) -> Doc2XImageParseTrigger:
    """What the triggerer does after a restart: import the class path, call it with the kwargs."""
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))


def test_serialize_round_trip_is_json_and_holds_no_key(doc2x):
    trigger = make_trigger(["uid-1", "uid-2"], max_concurrent_polls=3)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_doc2x.triggers.doc2x.Doc2XImageParseTrigger"
    assert rebuild(trigger).serialize() == (classpath, kwargs)
    assert API_KEY not in json.dumps(kwargs)
    assert set(kwargs) == {
        "doc2x_conn_id",
        "jobs",
        "poll_interval",
        "deadline",
        "max_concurrent_polls",
        "max_consecutive_errors",
    }


async def test_processing_then_success(doc2x, make_image):
    uids = submit(make_image(title="One"), make_image(title="Two"))
    event = await first_event(make_trigger(uids))
    assert event["status"] == "success"
    assert [job["uid"] for job in event["jobs"]] == uids
    assert {job["status"] for job in event["jobs"]} == {"success"}
    assert "markdown" not in json.dumps(event)  # results are fetched by the task, not carried here
    assert doc2x.stats()["requests"]["status"] >= 2


async def test_a_failure_code_is_reported_with_the_others_finished(doc2x, make_image):
    uids = submit(
        make_image(title="Fine"), make_image(title="Bad", paragraphs=["<!-- doc2x-fail: parse_error -->"])
    )
    event = await first_event(make_trigger(uids))
    assert event["status"] == "failed"
    good, bad = event["jobs"]
    assert good["status"] == "success"
    assert (bad["status"], bad["code"]) == ("failed", "parse_error")
    assert bad["message"] == Doc2XJobFailedError.summary  # a fixed text: the server's words stay out


async def test_unknown_uid_fails_that_job(doc2x):
    event = await first_event(make_trigger(["no-such-uid"]))
    assert event["status"] == "failed"
    assert event["jobs"][0]["code"] == "parse_status_not_found"


async def test_timeout_names_what_is_still_processing(doc2x, make_image):
    doc2x.configure(processing_time=30)
    uids = submit(make_image())
    event = await first_event(make_trigger(uids, timeout=0.3))
    assert event["status"] == "timeout"
    assert event["jobs"][0]["status"] == "processing"
    assert event["jobs"][0]["uid"] == uids[0]


async def test_a_run_of_5xx_is_tolerated(doc2x, make_image, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_retries=0))
    uids = submit(make_image())
    doc2x.configure(fail_next=3)
    event = await first_event(make_trigger(uids, max_consecutive_errors=5))
    assert event["status"] == "success"


async def test_too_long_a_run_of_5xx_gives_up_with_a_clear_error(doc2x, make_image, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_retries=0))
    uids = submit(make_image())
    doc2x.configure(fail_next=100)
    event = await first_event(make_trigger(uids, max_consecutive_errors=2))
    assert event["status"] == "error"
    assert "3 rounds in a row" in event["message"]
    assert "HTTP 503" in event["message"]


async def test_a_refused_key_stops_the_wait(doc2x, make_image, monkeypatch):
    uids = submit(make_image())
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(api_key="sk-revoked"))
    event = await first_event(make_trigger(uids))
    assert (event["status"], event["code"]) == ("error", "unauthorized")


async def test_rebuilt_mid_poll_it_resumes_the_same_uid(doc2x, make_image):
    doc2x.configure(processing_time=1.0)
    uids = submit(make_image(title="Survivor"))
    trigger = make_trigger(uids)
    running = asyncio.ensure_future(first_event(trigger))
    await async_wait_until(  # polled at least twice, still processing
        lambda: doc2x.stats()["requests"].get("status", 0) >= 2, message="two status calls"
    )
    running.cancel()  # the triggerer dies
    with pytest.raises(asyncio.CancelledError):
        await running
    event = await first_event(rebuild(trigger))
    assert event["status"] == "success"
    assert event["jobs"][0]["uid"] == uids[0]
    assert doc2x.stats()["billed_total"] == 1
    assert doc2x.stats()["requests"]["submit"] == 1


async def test_the_first_status_round_waits_one_interval(doc2x, make_image):
    uids = submit(make_image())
    waiting = asyncio.ensure_future(first_event(make_trigger(uids, poll_interval=30)))
    done, _ = await asyncio.wait({waiting}, timeout=0.5)
    waiting.cancel()
    assert not done
    # The task has just submitted (or checked) the job: asking again at once would be wasted.
    assert doc2x.stats()["requests"].get("status", 0) == 0


async def test_jobs_that_arrive_terminal_are_not_polled(doc2x):
    trigger = Doc2XImageParseTrigger(
        doc2x_conn_id="doc2x_default",
        jobs=[
            {"uid": None, "source": "lost.png", "status": "failed", "code": None, "message": "upload lost"},
            {"uid": "done-uid", "source": "done.png", "status": "success"},
        ],
        poll_interval=0.05,
        deadline=time.time() + 5,
    )
    event = await first_event(trigger)
    assert event["status"] == "failed"
    assert doc2x.stats()["requests"] == {}


async def test_it_never_takes_the_synchronous_connection_path(doc2x, make_image, monkeypatch):
    uids = submit(make_image())

    def blocked(self):
        raise AssertionError("the sync connection lookup ran on the event loop")

    monkeypatch.setattr(Doc2XHook, "settings", property(blocked))
    ticks = 0

    async def heartbeat():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beating = asyncio.ensure_future(heartbeat())
    try:
        event = await first_event(make_trigger(uids))
    finally:
        beating.cancel()
    assert event["status"] == "success"
    assert ticks > 5  # the loop kept running other work while the trigger waited


async def test_polls_are_bounded_and_every_job_is_reported(doc2x, make_image):
    doc2x.configure(processing_time=0.3)
    uids = submit(*(make_image(title=f"Many {n}") for n in range(6)))
    doc2x.configure(latency=0.05)
    event = await first_event(make_trigger(uids, max_concurrent_polls=2))
    assert event["status"] == "success"
    assert [job["uid"] for job in event["jobs"]] == uids
    assert doc2x.stats()["max_in_flight"] <= 2


#: Two triggers run one after the other in a fresh process, as in a triggerer.
TWO_TRIGGERS_IN_A_PROCESS = """
import asyncio, gc, time
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger

async def main():
    for n in range(2):
        trigger = Doc2XImageParseTrigger(
            doc2x_conn_id="doc2x_default",
            jobs=[{"uid": f"uid-{n}", "source": f"page-{n}.png", "status": "success"}],
            poll_interval=1,
            deadline=time.time() + 60,
        )
        async for event in trigger.run():
            assert event.payload["status"] == "success"
    print("frozen objects:", gc.get_freeze_count())

asyncio.run(main())
"""


@pytest.mark.parametrize("setting", [None, "False"])
def test_the_first_trigger_of_a_process_freezes_its_start_up_heap(setting):
    env = {key: value for key, value in os.environ.items() if key != "AIRFLOW__DOC2X__FREEZE_TRIGGERER_HEAP"}
    if setting is not None:
        env["AIRFLOW__DOC2X__FREEZE_TRIGGERER_HEAP"] = setting
    result = subprocess.run(
        [sys.executable, "-c", TWO_TRIGGERS_IN_A_PROCESS],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    frozen = int(result.stdout.split("frozen objects:")[1])
    logs = result.stdout + result.stderr
    if setting is None:
        assert frozen > 10_000  # Airflow's modules, classes and functions
        assert logs.count("out of garbage collection") == 1  # once per process
    else:
        assert frozen == 0
        assert "out of garbage collection" not in logs


# -- one status call per uid: duplicates, and the images of a PDF ------------------------------------------


async def test_jobs_of_one_uid_are_asked_about_once(doc2x, make_image):
    image = make_image(title="Listed Twice")
    (uid,) = submit(image)
    await async_wait_until(lambda: Doc2XHook().get_job_status(uid).is_terminal, message="the job to finish")
    requests = doc2x.stats()["requests"]["status"]
    trigger = Doc2XImageParseTrigger(
        doc2x_conn_id="doc2x_default",
        jobs=[events.job(uid, "a.png", None), events.job(uid, "copy-of-a.png", None)],
        poll_interval=0.05,
        deadline=time.time() + 30,
        max_concurrent_polls=1,
    )
    event = await first_event(trigger)
    assert [job["status"] for job in event["jobs"]] == ["success", "success"]
    assert doc2x.stats()["requests"]["status"] == requests + 1


async def submitted_pdf(doc2x, tmp_path, *titles):
    """A PDF of JPEG pages with these titles, submitted and parsed; its submission and packed pages."""
    doc2x.configure(pickup_delay=0, pdf_page_seconds=0)
    paths = []
    for title in titles:
        path = tmp_path / f"{title.replace(' ', '-')}.jpg"
        path.write_bytes(render(Page(title=title), fmt="JPEG", size=(400, 300)))
        paths.append(path)
    with pack_images(paths) as packed:
        (pdf,) = packed.pdfs
        submission = await Doc2XHook().pdf.asubmit_pdf(pdf.path, pages=pdf.page_count)
    hook = Doc2XHook()

    async def finished():
        try:
            return (
                await hook.pdf.aget_pdf_status(submission.uid, uploaded_at=submission.uploaded_at)
            ).is_terminal
        except Doc2XJobFailedError:  # a failure in the envelope's shape
            return True

    deadline = time.monotonic() + 30
    while not await finished():
        assert time.monotonic() < deadline, "the PDF did not finish within 30 s"
        await asyncio.sleep(0.02)
    return submission, pdf.pages, paths


async def test_the_images_of_a_pdf_are_updated_from_one_status_call(doc2x, tmp_path):
    submission, pages, paths = await submitted_pdf(doc2x, tmp_path, "Pdf One", "Pdf Two", "Pdf Three")
    jobs = [
        events.pdf_job(
            submission.uid,
            str(path),
            page.sha256,
            page_idx=page.page_idx,
            pages=len(pages),
            uploaded_at=submission.uploaded_at,
        )
        for path, page in zip(paths, pages, strict=True)
    ]
    trigger = make_trigger([], max_concurrent_polls=1)
    trigger.jobs = jobs
    kept = []

    async def keep(unit, status):
        kept.append(([entry["page_idx"] for entry in unit], len(status.result.pages)))

    requests = doc2x.stats()["requests"]["pdf_status"]
    event = await rebuild(trigger).waiter(Doc2XHook()).wait(on_result=keep)
    assert event["status"] == "success"
    assert [(job["lane"], job["page_idx"], job["status"]) for job in event["jobs"]] == [
        ("pdf", 0, "success"),
        ("pdf", 1, "success"),
        ("pdf", 2, "success"),
    ]
    assert kept == [([0, 1, 2], 3)]  # the worker's own wait gets the PDF once, with its images
    assert doc2x.stats()["requests"]["pdf_status"] == requests + 1
    assert "markdown" not in json.dumps(event) and "md" not in event["jobs"][0]


@pytest.mark.parametrize("shape", ["status", "envelope"])
async def test_a_failed_pdf_fails_each_of_its_images_with_the_code_in_both_shapes(doc2x, tmp_path, shape):
    doc2x.configure(pdf_fail_next=1, pdf_fail_reason="parse_timeout", pdf_failure_shape=shape)
    submission, pages, paths = await submitted_pdf(doc2x, tmp_path, "Fail One", "Fail Two")
    trigger = make_trigger([])
    trigger.jobs = [
        events.pdf_job(submission.uid, str(path), page.sha256, page_idx=page.page_idx, pages=2, uploaded_at=0)
        for path, page in zip(paths, pages, strict=True)
    ]
    event = await first_event(trigger)
    assert event["status"] == "progress"  # its images are to be tried again by the task
    assert {(job["status"], job["code"], job["message"]) for job in event["jobs"]} == {
        ("failed", "parse_timeout", Doc2XJobFailedError.summary)
    }
    assert [events.retry_plan(job) for job in event["jobs"]] == ["split", "split"]


async def test_queued_images_are_not_polled_and_the_wait_hands_back_at_half(doc2x, tmp_path):
    submission, pages, paths = await submitted_pdf(doc2x, tmp_path, "Half One")
    trigger = make_trigger([])
    trigger.jobs = [
        events.pdf_job(submission.uid, str(paths[0]), pages[0].sha256, page_idx=0, pages=1, uploaded_at=0),
        events.queued_job("later.jpg", "0" * 64, chunk=1),
    ]
    event = await first_event(trigger)
    assert event["status"] == "progress"
    assert [job["status"] for job in event["jobs"]] == ["success", events.STATUS_QUEUED]
    assert event["jobs"][1]["chunk"] == 1


# -- a job whose answers stay malformed fails alone ------------------------------------------------


async def test_a_job_whose_status_stays_malformed_fails_alone_after_the_bound(doc2x, make_image):
    images = [make_image(title="Good One"), make_image(title="Garbled"), make_image(title="Good Two")]
    uids = submit(*images)
    doc2x.configure(malformed_status=[hashlib.sha256(images[1].read_bytes()).hexdigest()])
    event = await first_event(make_trigger(uids, max_consecutive_errors=3))
    assert event["status"] == "failed"  # not "error": the wait went on for the others
    good, bad, other = event["jobs"]
    assert (good["status"], other["status"]) == ("success", "success")
    assert (bad["uid"], bad["source"], bad["status"], bad["code"]) == (
        uids[1],
        "image-1.png",
        "failed",
        "protocol_error",
    )
    assert "malformed 4 times in a row" in bad["message"]  # the bound is counted for that uid


async def test_the_count_of_malformed_answers_goes_on_from_the_wait_before(doc2x, make_image):
    """The PDF lane waits again and again: a job's count rides in its event, so the bound is the task's."""
    image = make_image(title="Garbled Across Waits")
    (uid,) = submit(image)
    doc2x.configure(malformed_status=[hashlib.sha256(image.read_bytes()).hexdigest()])
    carried = {"uid": uid, "source": "image-0.png"}
    # Short waits (a busy machine may poll once or not at all in one), until two malformed answers
    # were counted; each wait carries the count on to the next, which is what is tested.
    for _ in range(50):
        first = await first_event(
            Doc2XImageParseTrigger(
                doc2x_conn_id="doc2x_default",
                jobs=[carried],
                poll_interval=0.05,
                deadline=time.time() + 0.3,
                max_consecutive_errors=5,
            )
        )
        assert first["status"] == "timeout"
        (carried,) = first["jobs"]
        if carried.get("malformed", 0) >= 2:
            break
    assert carried["status"] == "processing" and carried["malformed"] >= 2
    trigger = Doc2XImageParseTrigger(
        doc2x_conn_id="doc2x_default", jobs=[carried], poll_interval=0.05, deadline=time.time() + 30
    )
    event = await first_event(trigger)
    (job,) = event["jobs"]
    assert (job["status"], job["code"]) == ("failed", "protocol_error")
    assert "malformed 6 times in a row" in job["message"]
    assert "malformed" not in job
