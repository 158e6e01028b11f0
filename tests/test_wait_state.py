"""A deferred task's jobs cross the trigger packed: small whatever the task's size, and never joined to other images.

Airflow 3's triggerer passes trigger kwargs and logs events through sockets of about 200 KB; a
task of a thousand images carried about 300 KB each way, and the triggerer stalled
(apache/airflow#65286). These tests run the operator against the local server and look at what
Airflow's database would keep: the trigger's kwargs, its event and the task's XCom.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import UserDict

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x import events
from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from airflow_provider_doc2x.wait_state import WAIT_XCOM_KEY, images_of, is_packed, pack, unpack
from tests.helpers import TaskInstance, first_event, parse_operator


@pytest.fixture
def scans(tmp_path):
    """Small JPEG pages with known titles, in a folder with a long name (as a lake's paths are)."""
    folder = tmp_path / "archive" / "scanned-correspondence-1970-1999" / "box-0042"
    folder.mkdir(parents=True)

    def write(count: int):
        paths = []
        for number in range(count):
            path = folder / f"page-{number:05d}.jpg"
            path.write_bytes(render(Page(title=f"Page {number}"), fmt="JPEG", size=(200, 150)))
            paths.append(path)
        return paths

    return write


def size(value) -> int:
    return len(json.dumps(value))


def test_a_large_pdf_lane_task_defers_and_resumes_with_kwargs_and_events_of_a_few_kilobytes(lane, scans):
    images = scans(150)
    op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=50)
    ti = TaskInstance()
    context = {"ti": ti}
    resume, event, sizes = None, None, []
    while True:
        try:
            records = op.execute(context) if resume is None else resume(context, event)
            break
        except TaskDeferred as deferred:
            kwargs = deferred.trigger.serialize()[1]
            # While the task waits, its XCom names each image, in the task's order.
            waiting = ti.xcom[WAIT_XCOM_KEY]
            assert [source for source, _ in waiting["images"]] == [str(image) for image in images]
            assert [digest for _, digest in waiting["images"]] == [
                hashlib.sha256(image.read_bytes()).hexdigest() for image in images
            ]
            event = asyncio.run(first_event(deferred.trigger))
            resume = getattr(op, deferred.method_name)
            sizes.append((size(kwargs), size(event)))

    assert [record["markdown"].splitlines()[0] for record in records] == [f"# Page {n}" for n in range(150)]
    print("kwargs and event sizes per deferral:", sizes)
    assert sizes
    # One image's entry alone took about 250 bytes before; now a whole PDF's group takes about that.
    assert all(kwargs < 2000 and event < 2000 for kwargs, event in sizes), sizes
    assert ti.xcom[WAIT_XCOM_KEY] == {}  # emptied once the task no longer waits


def test_jobs_of_every_kind_come_back_as_they_were_sent(tmp_path):
    jobs = [
        events.pdf_job("u1", "/a/1.jpg", "a" * 64, page_idx=0, pages=3, uploaded_at=1.0),
        events.pdf_job("u1", "/a/2.jpg", "b" * 64, page_idx=2, pages=3, uploaded_at=1.0),
        events.queued_job("/a/3.jpg", "c" * 64, chunk=1),
        events.pdf_job("u1", "/a/2-copy.jpg", "b" * 64, page_idx=2, pages=3, uploaded_at=1.0),
        events.document_job(
            "u2", "/a/d.pdf", "d" * 64, pages=20, uploaded_at=2.0, source_format="pdf", converted=None
        ),
        {
            **events.job("u3", "/a/e.png", "e" * 64, "failed"),
            "code": "parse_error",
            "message": "x",
            "trace_id": "t-1",
        },
        {**events.job("u4", "/a/f.png", "f" * 64, "success"), "stored": 1},
        events.job(None, "/a/g.png", None, "failed"),
        {**events.queued_job("/a/h.jpg", "0" * 64, chunk=2, round_=1)},
    ]
    images = images_of(jobs)
    packed = pack(jobs, images["token"])
    assert unpack(json.loads(json.dumps(packed)), images["images"]) == [
        events.Job.of(entry).to_json() for entry in jobs
    ]


@pytest.mark.parametrize(
    "garble",
    [
        lambda packed: packed["groups"][0]["at"].append([0, 1]),  # a place twice
        lambda packed: packed.update(count=packed["count"] + 1),  # a place nobody has
        lambda packed: packed["groups"][0]["at"].__setitem__(0, [0, 10**9]),  # past the count
        lambda packed: packed["groups"][0].update(page_idx=[[0, 1]]),  # fewer pages than places
        lambda packed: packed["groups"][0]["job"].update(source="/etc/passwd"),  # an image's own key
        lambda packed: packed.update(format=2),  # a format this release does not know
        lambda packed: packed["groups"][0]["job"].update(status=7),  # a job that is not one
    ],
)
def test_packed_jobs_that_are_not_well_formed_are_refused_by_name(garble):
    jobs = [
        events.pdf_job("u1", f"/a/{n}.jpg", f"{n:064d}", page_idx=n, pages=3, uploaded_at=1.0)
        for n in range(3)
    ]
    images = images_of(jobs)
    packed = json.loads(json.dumps(pack(jobs, images["token"])))
    garble(packed)
    with pytest.raises(Doc2XError, match="Doc2X"):
        unpack(packed, images["images"])


def test_a_resume_never_joins_the_statuses_to_another_list_of_images(lane, scans):
    """The XCom of another wait (other images, a cleared XCom) is refused, naming what to do; nothing is fetched."""
    images = scans(4)
    ti = TaskInstance()
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    event = asyncio.run(first_event(deferred.value.trigger))
    ti.xcom[WAIT_XCOM_KEY] = images_of([events.job(None, str(image), "0" * 64) for image in reversed(images)])
    with pytest.raises(Doc2XError, match=f"{WAIT_XCOM_KEY}.*clear the task"):
        op.execute_complete({"ti": ti}, event)
    ti.xcom.pop(WAIT_XCOM_KEY)
    with pytest.raises(Doc2XError, match="is missing"):
        op.execute_complete({"ti": ti}, event)


def test_a_trigger_row_of_an_earlier_release_still_resumes(lane, scans):
    """One job per image in the kwargs (earlier releases): the event comes back in kind and the task finishes."""
    images = scans(3)
    ti = TaskInstance()
    op = parse_operator(images, method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    kwargs = deferred.value.trigger.serialize()[1]
    old = {**kwargs, "jobs": unpack(kwargs["jobs"], ti.xcom[WAIT_XCOM_KEY]["images"])}
    event = asyncio.run(first_event(Doc2XImageParseTrigger(**json.loads(json.dumps(old)))))
    assert isinstance(event["jobs"], list) and [job["source"] for job in event["jobs"]] == [
        str(i) for i in images
    ]
    records = op.execute_complete({"ti": ti}, event)
    assert [record["markdown"].splitlines()[0] for record in records] == ["# Page 0", "# Page 1", "# Page 2"]


def test_a_context_that_is_a_mapping_not_a_dict_packs_too(lane, scans):
    """Airflow 2's task context is a ``MutableMapping`` of its own, not a dict: its tasks defer packed too."""
    images = scans(3)
    ti = TaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        parse_operator(images, method="pdf", deferrable=True).execute(UserDict({"ti": ti}))
    assert is_packed(deferred.value.trigger.serialize()[1]["jobs"])
    assert [source for source, _ in ti.xcom[WAIT_XCOM_KEY]["images"]] == [str(image) for image in images]
