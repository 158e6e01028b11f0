"""A hostile review of the packed trigger jobs (``airflow_provider_doc2x.wait_state``).

What a deferred task keeps in its XCom, what its trigger's kwargs and event carry, and what the
task makes of them when it resumes: against the local server, through the operator's public
interface, with hostile kwargs and events as Airflow's database could hand them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import textwrap
import time

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x import events
from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.local.samples import Page, render, write_documents
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from airflow_provider_doc2x.wait_state import WAIT_XCOM_KEY, images_of, pack
from tests.helpers import (
    AIRFLOW_VERSION,
    API_KEY,
    DeferredRun,
    StateStore,
    TaskInstance,
    airflow_cli,
    dags_test,
    first_event,
    parse_operator,
    use_connection,
)

#: What "a few KB" means for a trigger's kwargs or its event.
FEW_KB = 8_000


def size(value) -> int:
    return len(json.dumps(value))


def titles(records) -> list[str]:
    return [record["markdown"].splitlines()[0] for record in records]


@pytest.fixture
def page(tmp_path):
    """``page("a.jpg", "Title")``: a small JPEG page with known Markdown."""

    def write(name: str, title: str, *, fail: str | None = None):
        path = tmp_path / name
        paragraphs = [f"<!-- doc2x-fail: {fail} -->"] if fail else []
        path.write_bytes(render(Page(title=title, paragraphs=paragraphs), fmt="JPEG", size=(200, 150)))
        return path

    return write


@pytest.fixture
def fast_uploads(doc2x, monkeypatch):
    """No rate window worth the name: hundreds of image-lane uploads in seconds."""
    doc2x.configure(rate_limit=100_000, rate_window=1)
    use_connection(monkeypatch, doc2x, rate_limit_images=100_000, rate_limit_window=1)
    return doc2x


# -- promise 3: small kwargs and events whatever the task ----------------------------------------------------


def test_an_image_lane_task_of_hundreds_of_images_defers_with_a_few_kilobytes(fast_uploads, page):
    images = [page(f"p{n:04d}.jpg", f"Page {n}") for n in range(200)]
    run = DeferredRun(parse_operator(images, deferrable=True), TaskInstance())
    records = run.to_the_end()
    assert titles(records) == [f"# Page {n}" for n in range(200)]
    sizes = [(size(kwargs), size(event)) for kwargs, event in zip(run.kwargs, run.events, strict=True)]
    # The trigger polls each image's uid, so its kwargs carry them (about 40 B an image); the event
    # leaves them out (the task has them in its XCom).
    assert all(kwargs < 50 * len(images) and event < FEW_KB for kwargs, event in sizes), sizes


def test_a_task_of_many_documents_packs_to_one_small_group_a_document():
    """Each document is a PDF of its own (its uid, its upload time): the packed jobs grow by PDF, not by page."""
    queued = [
        events.queued_document(
            f"s3://lake/contracts/2026/contract-{n:05d}.pdf",
            f"{n:064x}",
            chunk=n,
            pages=12,
            source_format="pdf",
            converted=None,
        )
        for n in range(300)
    ]
    submitted = [
        events.document_job(
            f"0194c0de-{n:04x}-7000-8000-000000000000",
            entry["source"],
            entry["sha256"],
            pages=12,
            uploaded_at=1764000000.0 + n,
            source_format="pdf",
            converted=None,
        )
        for n, entry in enumerate(queued)
    ]
    token = images_of(queued)["token"]
    assert size(pack(queued, token)) < 200 * len(queued) and size(pack(submitted, token)) < 200 * len(queued)


def test_a_pdf_lane_task_with_a_failing_pdf_split_across_deferrals_stays_small_and_right(lane, page):
    """A PDF fails for one page: it is cut, deferral after deferral, down to the image lane; every page kept."""
    images = [page(f"ok-{n:03d}.jpg", f"Fine {n}") for n in range(60)]
    images.insert(33, page("bad.jpg", "Bad", fail="parse_error"))
    images.insert(5, images[40])  # the same file listed twice
    twin = page("twin.jpg", "Fine 7")  # the same content as ok-007.jpg, under another name
    shutil.copyfile(images[8], twin)
    images.append(twin)
    run = DeferredRun(
        parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=20, allowed_failures=1),
        TaskInstance(),
    )
    records = run.to_the_end()
    expected = [
        "# Fine " + str(int(p.stem.split("-")[1])) if p.name.startswith("ok-") else "# Fine 7"
        for p in images
        if p.name != "bad.jpg"
    ]
    assert titles(records) == expected
    assert [record["source"] for record in records] == [str(p) for p in images if p.name != "bad.jpg"]
    assert len(run.events) >= 3  # failed, cut, and cut again across deferrals
    assert all(size(kwargs) < FEW_KB for kwargs in run.kwargs), [size(k) for k in run.kwargs]
    assert all(size(event) < FEW_KB for event in run.events), [size(e) for e in run.events]
    assert run.ti.xcom[WAIT_XCOM_KEY] == {}  # emptied at the end (an allowed failure)


# -- promise 1: never loses or confuses a page ------------------------------------------------------------------


def test_documents_images_duplicates_and_copies_each_end_with_their_own_result(doc2x, page, tmp_path):
    documents = write_documents(tmp_path / "docs")  # report.pdf, fax.tiff, photo.webp, letter.png, scan.jpg
    a, b = page("a.jpg", "Alpha"), page("b.jpg", "Beta")
    copy_of_a = tmp_path / "copy-of-a.jpg"
    shutil.copyfile(a, copy_of_a)
    sources = [a, documents[0], b, a, documents[1], copy_of_a, documents[3], b, documents[2], documents[4]]
    ti = TaskInstance()
    run = DeferredRun(parse_operator(sources, deferrable=True), ti)
    records = run.to_the_end()
    assert [record["source"] for record in records] == [str(s) for s in sources]
    by_source = {}
    for record in records:
        by_source.setdefault(record["source"], set()).add(record["markdown"].splitlines()[0])
    assert all(len(heads) == 1 for heads in by_source.values()), by_source
    assert titles(records)[0] == titles(records)[3] == titles(records)[5] == "# Alpha"
    assert titles(records)[2] == titles(records)[7] == "# Beta"
    assert run.events and ti.xcom[WAIT_XCOM_KEY] == {}
    for kept in (*run.kwargs, *run.events, *run.xcoms):
        assert API_KEY not in json.dumps(kept)


def test_an_event_is_never_joined_to_the_xcom_of_another_map_index_or_try(lane, page):
    """Each wait's own XCom: an event handed to a task instance with other images is refused by name."""
    a, b, c = page("a.jpg", "Alpha"), page("b.jpg", "Beta"), page("c.jpg", "Gamma")
    first = TaskInstance(map_index=0)
    op = parse_operator([a, b, c], method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": first})
    event = json.loads(json.dumps(asyncio.run(first_event(deferred.value.trigger))))

    # Another map index of the same task, whose images are the same ones in another order.
    other = TaskInstance(map_index=1)
    with pytest.raises(TaskDeferred):
        parse_operator([c, b, a], method="pdf", deferrable=True).execute({"ti": other})
    with pytest.raises(Doc2XError, match=WAIT_XCOM_KEY):
        parse_operator([c, b, a], method="pdf", deferrable=True).execute_complete({"ti": other}, event)

    # A new try (XCom cleared by Airflow) with the inputs reordered: refused, then its own event works.
    new_try = TaskInstance(try_number=2)
    op2 = parse_operator([b, a, c], method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as again:
        op2.execute({"ti": new_try})
    with pytest.raises(Doc2XError, match=WAIT_XCOM_KEY):
        op2.execute_complete({"ti": new_try}, event)
    own = asyncio.run(first_event(again.value.trigger))
    assert titles(op2.execute_complete({"ti": new_try}, own)) == ["# Beta", "# Alpha", "# Gamma"]
    # And the first task still resumes with its own event.
    assert titles(op.execute_complete({"ti": first}, event)) == ["# Alpha", "# Beta", "# Gamma"]


def test_an_event_whose_count_matches_but_whose_token_does_not_is_refused(lane, page):
    a, b = page("a.jpg", "Alpha"), page("b.jpg", "Beta")
    ti = TaskInstance()
    op = parse_operator([a, b], method="pdf", deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    event = json.loads(json.dumps(asyncio.run(first_event(deferred.value.trigger))))
    forged = {**event, "jobs": {**event["jobs"], "images": "0" * 16}}
    with pytest.raises(Doc2XError, match=WAIT_XCOM_KEY):
        op.execute_complete({"ti": ti}, forged)
    assert titles(op.execute_complete({"ti": ti}, event)) == ["# Alpha", "# Beta"]


# -- promise 2: a new try reconnects ----------------------------------------------------------------------------


def test_a_new_try_after_a_deferral_reconnects_instead_of_resubmitting(lane, page):
    images = [page(f"r{n}.jpg", f"Retry {n}") for n in range(6)]
    store = StateStore()
    first = TaskInstance(try_number=1)
    with pytest.raises(TaskDeferred):
        parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=3).execute(
            {"ti": first, "task_state_store": store}
        )
    submitted = lane.stats()["pdf_tasks"]
    assert submitted >= 1
    # The try is lost while deferred; Airflow's new try starts with the XCom cleared.
    second = TaskInstance(try_number=2)
    run = DeferredRun(
        parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=3),
        second,
        {"task_state_store": store},
    )
    assert titles(run.to_the_end()) == [f"# Retry {n}" for n in range(6)]
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"]) == (2, 6)
    # A new try that deferred empties its wait XCom at its end; one that found every PDF done never wrote it.
    assert second.xcom.get(WAIT_XCOM_KEY) == ({} if run.kwargs else None)


def test_a_new_try_of_the_image_lane_reconnects_too(doc2x, page):
    doc2x.configure(processing_time=0.5)
    images = [page(f"i{n}.jpg", f"Image {n}") for n in range(4)]
    store = StateStore()
    with pytest.raises(TaskDeferred):
        parse_operator(images, deferrable=True).execute({"ti": TaskInstance(), "task_state_store": store})
    run = DeferredRun(
        parse_operator(images, deferrable=True), TaskInstance(try_number=2), {"task_state_store": store}
    )
    assert titles(run.to_the_end()) == [f"# Image {n}" for n in range(4)]
    assert doc2x.stats()["requests"]["submit"] == 4


# -- promise 4: hostile kwargs and events ---------------------------------------------------------------------


def _packed(count: int = 3) -> tuple[dict, list]:
    jobs = [
        events.pdf_job("u1", f"/a/{n}.jpg", f"{n:064x}", page_idx=n, pages=count, uploaded_at=1.0)
        for n in range(count)
    ]
    images = images_of(jobs)
    return json.loads(json.dumps(pack(jobs, images["token"]))), images


GARBLES = {
    "count is True": lambda p: p.update(count=True),
    "count negative": lambda p: p.update(count=-1),
    "count a float": lambda p: p.update(count=3.0),
    "count huge": lambda p: p.update(count=10**40),
    "runs overlap": lambda p: p["groups"][0].update(at=[[0, 2], [1, 2]]),
    "run of bools": lambda p: p["groups"][0].update(at=[[False, True], [1, 2]]),
    "run negative": lambda p: p["groups"][0].update(at=[[-1, 4]]),
    "run nested": lambda p: p["groups"][0].update(at=[[[0], 3]]),
    "run of length 0": lambda p: p["groups"][0]["at"].append([1, 0]),
    "run enormous": lambda p: p["groups"][0].update(at=[[0, 10**18]]),
    "pages enormous": lambda p: p["groups"][0].update(page_idx=[[0, 10**18]]),
    "pages negative": lambda p: p["groups"][0].update(page_idx=[[-3, 3]]),
    "groups a dict": lambda p: p.update(groups={"0": p["groups"][0]}),
    "group a list": lambda p: p.update(groups=[[0, 3]]),
    "job's uid a list": lambda p: p["groups"][0]["job"].update(uid=["u1"]),
    "token a number": lambda p: p.update(images=7),
    "job's own key": lambda p: p["groups"][0]["job"].update(sha256="0" * 64),
}


@pytest.mark.parametrize("garble", GARBLES.values(), ids=GARBLES.keys())
def test_hostile_packed_kwargs_are_refused_by_name_in_the_trigger(garble):
    packed, _ = _packed()
    garble(packed)
    with pytest.raises(Doc2XError, match="Doc2X"):
        Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=packed, poll_interval=1, deadline=1)


@pytest.mark.parametrize("garble", GARBLES.values(), ids=GARBLES.keys())
def test_hostile_packed_events_are_refused_by_name_when_the_task_resumes(doc2x, garble):
    packed, images = _packed()
    garble(packed)
    ti = TaskInstance()
    ti.xcom[WAIT_XCOM_KEY] = images
    event = {"status": "success", "message": "done", "code": None, "jobs": packed}
    with pytest.raises(Doc2XError, match="Doc2X"):
        parse_operator([f"/a/{n}.jpg" for n in range(3)], method="pdf", deferrable=True).execute_complete(
            {"ti": ti}, event
        )


def test_nested_junk_in_a_packed_failed_job_gives_a_doc2x_error(lane):
    packed, images = _packed()
    packed["groups"][0]["job"].update(status="failed", code={"nested": ["junk"]}, message=["x"])
    ti = TaskInstance()
    ti.xcom[WAIT_XCOM_KEY] = images
    event = {"status": "failed", "message": "done", "code": None, "jobs": packed}
    op = parse_operator([f"/a/{n}.jpg" for n in range(3)], method="pdf", deferrable=True)
    with pytest.raises(Doc2XError):
        op.execute_complete({"ti": ti}, event)


@pytest.mark.parametrize("jobs", [None, 7])
def test_kwargs_whose_jobs_are_neither_packed_nor_a_list_are_refused_by_name(jobs):
    with pytest.raises(Doc2XError):
        Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=jobs, poll_interval=1, deadline=1)


@pytest.mark.parametrize("fmt", [True, 1.0])
def test_a_format_that_is_not_the_integer_1_is_refused(fmt):
    packed, _ = _packed()
    packed["format"] = fmt
    with pytest.raises(Doc2XError, match="format"):
        Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=packed, poll_interval=1, deadline=1)


def test_a_tiny_hostile_kwargs_cannot_make_the_trigger_work_for_seconds():
    count = 1_000_000
    packed = {
        "format": 1,
        "images": "0" * 16,
        "count": count,
        "groups": [
            {
                "job": {"uid": "u", "status": "processing", "lane": "pdf", "pages": 1},
                "at": [[0, count]],
                "page_idx": [[0, count]],
            }
        ],
    }
    assert size(packed) < 300
    began = time.monotonic()
    with contextlib.suppress(Doc2XError):
        Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=packed, poll_interval=1, deadline=1)
    assert time.monotonic() - began < 2.0


# -- promise 5: the XCom emptied, the key nowhere ---------------------------------------------------------


def test_the_xcom_is_emptied_when_too_many_images_fail(lane, page):
    images = [page("good.jpg", "Good"), page("bad.jpg", "Bad", fail="parse_error")]
    ti = TaskInstance()
    run = DeferredRun(parse_operator(images, deferrable=True), ti)
    with pytest.raises(Doc2XError, match=r"bad\.jpg"):
        run.to_the_end()
    assert run.events and ti.xcom[WAIT_XCOM_KEY] == {}


def test_the_xcom_is_emptied_when_the_wait_itself_fails(doc2x, page, monkeypatch):
    doc2x.configure(processing_time=5)
    ti = TaskInstance()
    op = parse_operator([page("a.jpg", "Alpha")], deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json("sk-revoked"))
    event = asyncio.run(first_event(deferred.value.trigger))
    assert event["status"] == "error"
    with pytest.raises(Doc2XError):
        op.execute_complete({"ti": ti}, event)
    assert ti.xcom[WAIT_XCOM_KEY] == {}


def test_an_echoed_key_never_reaches_the_xcom_kwargs_or_events(doc2x, page, tmp_path):
    doc2x.configure(echo_key=True)
    documents = write_documents(tmp_path / "docs")
    images = [page("a.jpg", "Alpha"), page("bad.jpg", "Bad", fail="parse_error"), documents[0]]
    run = DeferredRun(parse_operator(images, deferrable=True, allowed_failures=1), TaskInstance())
    run.to_the_end()
    assert run.events
    for kept in (*run.kwargs, *run.events, *run.xcoms):
        assert API_KEY not in json.dumps(kept)


# -- promise 6: real Airflow, mapped ------------------------------------------------------------------------


MAPPED_DAG = textwrap.dedent(
    '''
    """Mapped deferrable Doc2X tasks; a downstream task writes what each map index returned and kept."""
    import json

    from airflow.providers.common.compat.sdk import DAG, Param, task

    from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

    with DAG(
        "doc2x_hostile_mapped_METHOD",
        schedule=None,
        params={"chunks": Param([], type="array"), "out": Param("", type="string")},
    ) as dag:

        @task
        def chunks(params=None):
            return params["chunks"]

        parsed = Doc2XImageParseOperator.partial(
            task_id="parse", poll_interval=0.1, deferrable=True, method="METHOD"
        ).expand(image_path=chunks())

        @task
        def collect(params=None, ti=None):
            count = len(params["chunks"])
            returned = ti.xcom_pull(task_ids="parse", map_indexes=list(range(count)))
            kept = ti.xcom_pull(task_ids="parse", key="doc2x_wait", map_indexes=list(range(count)))
            with open(params["out"], "w") as out:
                json.dump({"returned": list(returned), "kept": list(kept)}, out)

        parsed >> collect()
    '''
)


@pytest.mark.parametrize("method", ["async", "pdf"])
def test_mapped_tasks_under_airflow_dags_test_each_get_their_own_pages(
    doc2x, airflow_db, tmp_path, make_image, method
):
    doc2x.configure(pickup_delay=0, pdf_page_seconds=0, export_seconds=0)
    a, b = make_image("a.jpg", "Alpha"), make_image("b.jpg", "Beta")
    copy_of_a = tmp_path / "copy-of-a.jpg"
    shutil.copyfile(a, copy_of_a)
    chunks = [[str(a), str(b)], [str(b), str(a)], [str(a), str(a)], [str(copy_of_a), str(b)]]
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "hostile_mapped.py").write_text(MAPPED_DAG.replace("METHOD", method))
    out = tmp_path / "out.json"
    dags_test(
        f"doc2x_hostile_mapped_{method}",
        {"chunks": chunks, "out": str(out)},
        doc2x,
        dags_folder=dags,
    )
    seen = json.loads(out.read_text())
    heads = {str(a): "# Alpha", str(copy_of_a): "# Alpha", str(b): "# Beta"}
    returned = seen["returned"]
    assert [[record["source"] for record in records] for records in returned] == chunks
    assert [titles(records) for records in returned] == [[heads[s] for s in chunk] for chunk in chunks]
    # Each map index's XCom emptied to {} (Airflow 3.0 refuses a null XCom).
    assert all(kept == {} for kept in seen["kept"]), seen["kept"]


def test_mapped_tasks_under_dag_test_each_get_their_own_pages(doc2x, airflow_db, tmp_path, make_image):
    doc2x.configure(pickup_delay=0, pdf_page_seconds=0, export_seconds=0)
    a, b = make_image("a.jpg", "Alpha"), make_image("b.jpg", "Beta")
    chunks = [[str(a), str(b)], [str(b), str(a), str(b)]]
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "hostile_mapped.py").write_text(MAPPED_DAG.replace("METHOD", "pdf"))
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2
        from airflow.models.dagbag import DagBag
    if AIRFLOW_VERSION >= (3, 0):  # dag.test() runs only a DAG the database knows
        done = airflow_cli("dags", "reserialize", env={"AIRFLOW__CORE__DAGS_FOLDER": str(dags)})
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    dag = DagBag(dag_folder=str(dags)).dags["doc2x_hostile_mapped_pdf"]
    out = tmp_path / "out.json"
    run = dag.test(run_conf={"chunks": chunks, "out": str(out)})
    assert getattr(run, "state", run) == "success"
    seen = json.loads(out.read_text())
    heads = {str(a): "# Alpha", str(b): "# Beta"}
    assert [titles(records) for records in seen["returned"]] == [
        [heads[s] for s in chunk] for chunk in chunks
    ]
    assert all(kept == {} for kept in seen["kept"]), seen["kept"]
