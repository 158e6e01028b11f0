"""
The cost controls attacked through the operator, against the local server: ``max_pages`` (0, a
document larger than the cap alone, PDFs tried again in smaller ones, a new try of the task),
``dry_run`` (what it must not write, and whether the run that follows bills what it said), the
key's ``daily_page_budget`` (pages given back for uploads refused unbilled and only for them,
tasks side by side, a store that cannot be trusted) and the usage each task reports (against the
server's own bill, across deferrals, with a hostile ``carried`` in its event).

What a server bills is read from the server itself (``/local/stats``); what the budget counts is
read from its store. Each test names the promise it checks in its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import img2pdf
import pytest
from airflow.providers.common.compat.sdk import AirflowFailException, TaskDeferred

from airflow_provider_doc2x import transport
from airflow_provider_doc2x.exceptions import (
    Doc2XBudgetError,
    Doc2XBudgetUnavailableError,
    Doc2XError,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.pacing import daily_budget_for, key_digest
from airflow_provider_doc2x.usage import MOST_READ_BACK, USAGE_XCOM_KEY
from tests.helpers import (
    API_KEY,
    REPO,
    StateStore,
    TaskInstance,
    first_event,
    free_port,
    parse_operator,
    run_to_the_end,
    use_connection,
    wait_until,
)

FAIL = "<!-- doc2x-fail: parse_error -->"


def billed(server) -> int:
    """Pages the local server billed: images of the image API and pages of the PDF API."""
    stats = server.stats()
    return stats["billed_total"] + stats["pdf_pages_billed"]


def sent(server) -> int:
    """Uploads that reached the server at all: image submits and parses, PDF preuploads."""
    stats = server.stats()
    requests = stats["requests"]
    return (
        requests.get("submit", 0)
        + requests.get("parse", 0)
        + requests.get("POST /api/v2/parse/img", 0)
        + stats["preuploads"]
    )


def a_document(tmp_path: Path, name: str, pages: int, *, fail: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes(
        img2pdf.convert(
            [
                render(
                    Page(title=f"{name} page {n}", paragraphs=[FAIL] if fail else []),
                    fmt="JPEG",
                    size=(400, 300),
                )
                for n in range(pages)
            ]
        )
    )
    return path


def run(op, ti: TaskInstance | None = None, store: StateStore | None = None):
    """One try of the task, to its end (deferrals included)."""
    context = {"ti": ti or TaskInstance(), **({"task_state_store": store} if store is not None else {})}
    if op.deferrable:
        return run_to_the_end(op, context)[0]
    return op.execute(context)


def budget_of_the_connection():
    """The key's daily budget as the task sees it (its store read afresh)."""
    return daily_budget_for(Doc2XHook().settings)


# -- max_pages ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["async", "sync", "pdf"])
def test_max_pages_zero_refuses_a_single_new_image_without_retries_and_sends_nothing(
    lane, make_image, method
):
    """Promise 1: over the cap (0) nothing is sent, and the failure skips Airflow's retries."""
    op = parse_operator([make_image(title="Zero")], method=method, deferrable=True, max_pages=0)
    with pytest.raises(Doc2XBudgetError) as caught:
        run(op)
    assert isinstance(caught.value, AirflowFailException)
    assert "max_pages=0" in str(caught.value) and "would bill 1 page" in str(caught.value)
    assert sent(lane) == 0 and billed(lane) == 0


def test_max_pages_zero_lets_a_fully_cached_run_through_billing_nothing(lane, make_image, tmp_path):
    """Promise 1: a cap of 0 is a cap on what is billed, and a run of cached images bills nothing."""
    out = tmp_path / "out"
    images = [make_image(title=f"Cached {n}") for n in range(2)]
    run(parse_operator(images, output_path=str(out), deferrable=True))
    before = billed(lane)
    records = run(parse_operator(images, output_path=str(out), deferrable=True, max_pages=0))
    assert [record["cached"] for record in records] == [True, True]
    assert billed(lane) == before


@pytest.mark.parametrize("method", ["async", "sync", "pdf"])
def test_one_document_larger_than_max_pages_alone_is_refused_before_anything_is_sent(
    lane, make_image, tmp_path, method
):
    """Promise 1: a five-page PDF against max_pages=4 sends nothing, whatever else is small."""
    document = a_document(tmp_path, "five.pdf", 5)
    op = parse_operator([document], method=method, deferrable=True, max_pages=4)
    with pytest.raises(Doc2XBudgetError, match=r"would bill 5 pages.*max_pages=4"):
        run(op)
    assert sent(lane) == 0 and billed(lane) == 0


@pytest.mark.parametrize("max_pages", [4, 5, 6, 7, 8])
def test_pdfs_tried_again_in_smaller_pdfs_never_bill_past_max_pages(lane, make_image, max_pages):
    """Promise 1: a PDF of 4 images fails (billed, as Doc2X may bill it) and its images are tried again."""
    lane.configure(pdf_fail_next=1, bill_failed_pdfs=True)
    images = [make_image(f"again-{n}.jpg", title=f"Again {n}") for n in range(4)]
    op = parse_operator(images, method="pdf", deferrable=True, max_pages=max_pages, pdf_max_pages=4)
    ti = TaskInstance()
    failure: list[Doc2XError] = []
    try:
        run(op, ti)
    except Doc2XError as error:
        failure.append(error)
    assert all("budget_exceeded" in str(error) for error in failure)
    assert billed(lane) <= max_pages
    assert ti.xcom[USAGE_XCOM_KEY]["pages_billed"] == billed(lane)


def test_max_pages_caps_each_try_and_a_new_try_pays_only_for_what_the_first_did_not_parse(lane, make_image):
    """Promise 1, as documented: the cap is per try; a new try reconnects to what the first paid for.

    Try 1 bills both images and fails (one of them failed at Doc2X); the retry reconnects to the
    good one through the task state store and sends only the failed image again.
    """
    images = [make_image(title="Good"), make_image(title="Bad", paragraphs=[FAIL])]
    store = StateStore()
    with pytest.raises(Doc2XError):
        run(parse_operator(images, deferrable=True, max_pages=2), TaskInstance(try_number=1), store)
    assert billed(lane) == 2
    second = TaskInstance(try_number=2)
    with pytest.raises(Doc2XError):
        run(parse_operator(images, deferrable=True, max_pages=2), second, store)
    assert billed(lane) - 2 <= 2  # the second try within its own cap
    usage = second.xcom[USAGE_XCOM_KEY]
    assert (usage["pages_reconnected"], usage["pages_billed"]) == (1, billed(lane) - 2)


# -- dry_run --------------------------------------------------------------------------------------------


def test_a_dry_run_writes_nothing_anywhere(lane, make_image, tmp_path, monkeypatch):
    """Promise 2: no task state store write, no XCom, no manifest, no output folder, no budget file."""
    use_connection(monkeypatch, lane, daily_page_budget=100)
    out = tmp_path / "never" / "out"
    pacing = Path(os.environ["DOC2X_PACING_DIR"])
    before_pacing = sorted(pacing.rglob("*")) if pacing.exists() else []
    images = [make_image(title=f"Dry {n}") for n in range(2)]
    store, ti = StateStore(), TaskInstance()
    op = parse_operator(
        [*images, a_document(tmp_path, "two.pdf", 2)],
        output_path=str(out),
        incremental=True,
        deferrable=True,
        dry_run=True,
    )
    plan = op.execute({"ti": ti, "task_state_store": store})
    assert plan["pages_to_bill"] == 4
    assert store.values == {} and ti.xcom == {}
    assert not out.exists() and not out.parent.exists()
    assert (sorted(pacing.rglob("*")) if pacing.exists() else []) == before_pacing
    assert sent(lane) == 0


def test_a_dry_run_with_a_manifest_plans_what_the_incremental_run_bills(lane, make_image, tmp_path):
    """Promise 2: manifest-known, changed, new, twin and document sources, then the real run."""
    out = tmp_path / "out"
    known = [make_image(f"known-{n}.png", title=f"Known {n}") for n in range(3)]
    run(parse_operator(known, output_path=str(out), incremental=True, deferrable=True))
    before = billed(lane)
    known[0].write_bytes(render(Page(title="Known 0, changed"), fmt="PNG", size=(400, 300)))
    new = [make_image(f"new-{n}.png", title=f"New {n}") for n in range(2)]
    twin = tmp_path / "twin-of-known-1.png"
    shutil.copy(known[1], twin)  # a manifest-known content under a new name: its result is in the cache
    document = a_document(tmp_path, "three.pdf", 3)
    sources = [*known, *new, twin, document]

    plan = parse_operator(
        sources, output_path=str(out), incremental=True, deferrable=True, dry_run=True
    ).execute({})
    assert billed(lane) == before
    run(parse_operator(sources, output_path=str(out), incremental=True, deferrable=True))
    assert billed(lane) - before == plan["pages_to_bill"], plan


@pytest.mark.parametrize("method", ["async", "sync", "pdf"])
def test_a_dry_run_plans_what_the_run_bills_with_twins_documents_and_cache(
    lane, make_image, tmp_path, method
):
    """Promise 2: the same content under two names, a PDF twice, cached ones; every method."""
    out = tmp_path / "out"
    cached = make_image("cached.jpg", title="Cached")
    run(parse_operator([cached], output_path=str(out), method=method, deferrable=True))
    before = billed(lane)
    new = [make_image(f"fresh-{n}.jpg", title=f"Fresh {n}") for n in range(3)]
    twin = tmp_path / "fresh-twin.jpg"
    shutil.copy(new[1], twin)
    cached_twin = tmp_path / "cached-twin.jpg"
    shutil.copy(cached, cached_twin)
    document = a_document(tmp_path, "doc.pdf", 2)
    document_twin = tmp_path / "doc-twin.pdf"
    shutil.copy(document, document_twin)
    sources = [cached, *new, twin, cached_twin, document, document_twin]
    plan = parse_operator(
        sources, output_path=str(out), method=method, deferrable=True, dry_run=True
    ).execute({})
    assert plan["pages_to_bill"] == 3 + 2
    run(parse_operator(sources, output_path=str(out), method=method, deferrable=True))
    assert billed(lane) - before == plan["pages_to_bill"]


# -- the daily page budget -------------------------------------------------------------------------------


def test_uploads_refused_with_429_past_their_retries_give_their_pages_back(lane, make_image, monkeypatch):
    """Promise 3: a 429 storm refuses uploads unbilled; the day keeps only what the server billed."""
    use_connection(monkeypatch, lane, daily_page_budget=10, max_retries=0, max_concurrent_uploads=1)
    lane.configure(rate_limit=1, rate_window=600)
    images = [make_image(title=f"Storm {n}") for n in range(4)]
    with pytest.raises(Doc2XError):
        run(parse_operator(images, deferrable=True))
    assert lane.stats()["rate_limited"] >= 1
    assert budget_of_the_connection().remaining() == 10 - billed(lane)


def test_a_sync_parse_that_doc2x_failed_after_billing_keeps_its_pages_on_the_day(
    lane, make_image, monkeypatch
):
    """Promise 3: only an upload refused unbilled gives its pages back; a parse Doc2X failed was billed.

    The synchronous endpoint bills an image once the engine read it, then answers its failure code.
    The day then counts fewer pages than were billed, and the next task bills past the budget.
    """
    use_connection(monkeypatch, lane, daily_page_budget=2)
    bad = [make_image(title=f"Sync Bad {n}", paragraphs=[FAIL]) for n in range(2)]
    with pytest.raises(Doc2XError, match="parse_error"):
        run(parse_operator(bad, method="sync", deferrable=False))
    assert billed(lane) == 2
    later = [make_image(title=f"Sync Later {n}") for n in range(2)]
    with contextlib.suppress(Doc2XError):  # refused for the budget, as it should be
        run(parse_operator(later, method="sync", deferrable=False))
    assert billed(lane) <= 2, f"a daily budget of 2 pages let {billed(lane)} billed pages through"


def test_a_sync_parse_that_doc2x_failed_is_in_the_usage_and_counts_against_max_pages(lane, make_image):
    """Promises 1 and 4: the usage's pages_billed is the server's bill, and max_pages bounds it."""
    images = [make_image(title="Sync Good"), make_image(title="Sync Bad", paragraphs=[FAIL])]
    ti = TaskInstance()
    with pytest.raises(Doc2XError):
        run(parse_operator(images, method="sync", deferrable=False), ti)
    assert ti.xcom[USAGE_XCOM_KEY]["pages_billed"] == billed(lane) == 2


def test_budget_exceeded_is_never_an_allowed_failure(lane, make_image, monkeypatch):
    """Promise 3: images the budget kept back fail the task whatever ``allowed_failures`` says."""
    use_connection(monkeypatch, lane, daily_page_budget=2)
    images = [make_image(title=f"Allowed {n}") for n in range(4)]
    with pytest.raises(Doc2XError, match="budget_exceeded"):
        run(parse_operator(images, deferrable=True, allowed_failures=0.9, max_concurrent_uploads=1))
    assert billed(lane) == 2


def test_max_pages_running_out_is_never_an_allowed_failure(lane, make_image):
    """Promise 3 for max_pages: the images of a PDF not tried again for the cap are never "allowed"."""
    lane.configure(pdf_fail_next=1)
    images = [make_image(f"cap-{n}.jpg", title=f"Cap {n}") for n in range(4)]
    with pytest.raises(Doc2XError, match="budget_exceeded"):
        run(parse_operator(images, method="pdf", deferrable=True, max_pages=4, allowed_failures=0.99))


@pytest.mark.parametrize("method", ["async", "pdf"])
def test_a_budget_file_that_cannot_be_trusted_sends_nothing_and_leaves_the_retries(
    lane, make_image, monkeypatch, method
):
    """Promise 3: fails closed, and the failure is Doc2XBudgetUnavailableError (retries left)."""
    use_connection(monkeypatch, lane, daily_page_budget=10)
    settings = Doc2XHook().settings
    folder = Path(os.environ["DOC2X_PACING_DIR"])
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    budget_file = folder / f"{key_digest(settings.base_url, settings.api_key)}.budget.json"
    budget_file.write_text("not a budget")
    budget_file.chmod(0o600)
    images = [make_image(f"closed-{n}.jpg", title=f"Closed {n}") for n in range(2)]
    with pytest.raises(Doc2XError) as caught:
        run(parse_operator(images, method=method, deferrable=True))
    assert isinstance(caught.value, Doc2XBudgetUnavailableError), repr(caught.value)
    assert not isinstance(caught.value, AirflowFailException)
    assert sent(lane) == 0 and billed(lane) == 0


#: One task in a process of its own, started at the barrier's "go" (a worker process of a host).
TASK = """
import json, os, sys, time
from pathlib import Path
from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator
barrier, *images = sys.argv[1:]
op = Doc2XImageParseOperator(task_id="parse", image_path=images, poll_interval=0.05)
Path(barrier, f"ready-{os.getpid()}").touch()
while not Path(barrier, "go").exists():
    time.sleep(0.005)
try:
    op.execute({})
    print(json.dumps({"error": None}))
except Doc2XError as error:
    print(json.dumps({"error": str(error)}))
"""


def test_two_tasks_booking_one_daily_budget_at_the_same_moment_never_pass_it(
    lane, make_image, monkeypatch, tmp_path
):
    """Promise 3: two tasks of one host, each a process of its own, share a budget of 5 pages."""
    use_connection(monkeypatch, lane, daily_page_budget=5)
    batches = [[str(make_image(title=f"Side {side} {n}")) for n in range(4)] for side in range(2)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TASK, str(barrier), *images],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        for images in batches
    ]
    wait_until(lambda: len(list(barrier.glob("ready-*"))) == 2, timeout=120, message="both tasks")
    (barrier / "go").touch()
    outcomes = [json.loads(process.communicate(timeout=180)[0].splitlines()[-1]) for process in processes]
    assert billed(lane) == 5
    errors = [outcome["error"] for outcome in outcomes if outcome["error"]]
    assert errors and all("budget_exceeded" in error for error in errors)


def test_booking_on_a_locked_budget_file_never_blocks_the_transports_loop(lane, make_image, monkeypatch):
    """Promise 5: another holder keeps the budget file's lock; the transport's loop keeps running."""
    use_connection(monkeypatch, lane, daily_page_budget=10)
    budget = budget_of_the_connection()
    budget.release(budget.book(1, what="made the file"))  # the file exists, private, with 0 pages
    holder = os.open(budget._state_path(), os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    inode = os.fstat(holder).st_ino
    seen: dict[str, bool] = {}

    def probe_then_unlock():
        """While a booking waits on the lock, the loop must still run a coroutine; then let go."""
        try:
            wait_until(lambda: _waits_for_lock(inode), timeout=60, message="a booking waiting on the lock")
            answered = threading.Event()
            threading.Thread(
                target=lambda: (transport.run_sync(asyncio.sleep(0)), answered.set()), daemon=True
            ).start()
            seen["loop answered"] = answered.wait(30)
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)

    prober = threading.Thread(target=probe_then_unlock)
    prober.start()
    try:
        records = run(parse_operator([make_image(title="Locked")], deferrable=False))
    finally:
        prober.join(timeout=120)
    assert seen == {"loop answered": True}, "the transport's loop was blocked by a booking"
    assert len(records) == 1 and billed(lane) == 1


def _waits_for_lock(inode: int) -> bool:
    """Whether some process waits for a lock on this inode (``/proc/locks`` marks waiters ``->``)."""
    with open("/proc/locks") as locks:
        return any("->" in line and f":{inode} " in line for line in locks)


# -- usage -----------------------------------------------------------------------------------------------


def test_the_usage_of_a_pdf_lane_that_defers_many_times_is_the_servers_bill(lane, make_image, monkeypatch):
    """Promise 4: the PDF lane defers once per wave; every wave's pages reach the usage."""
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = [make_image(f"wave-{n}.jpg", title=f"Wave {n}") for n in range(6)]
    ti = TaskInstance()
    op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=2)
    _, deferrals = run_to_the_end(op, {"ti": ti})
    assert deferrals >= 3
    usage = ti.xcom[USAGE_XCOM_KEY]
    assert usage["pages_billed"] == billed(lane) == 6
    assert (usage["pages_reused"], usage["pages_failed"], usage["pages_reconnected"]) == (0, 0, 0)
    assert API_KEY not in json.dumps(usage)


def resumed_with(op, context, carried):
    """Run a deferrable task to its end, with ``carried`` put into its first event (as the database gives it)."""
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    event = {**asyncio.run(first_event(deferred.value.trigger)), "carried": carried}
    while True:
        try:
            return op.execute_complete(context, event)
        except TaskDeferred as again:
            event = asyncio.run(first_event(again.trigger))


HOSTILE_CARRIED = {
    "pages 1e308": {"usage": {"pages_billed": 1e308}},
    "pages 10**30": {"usage": {"pages_billed": 10**30}},
    "pages 2**63": {"usage": {"pages_billed": 2**63, "pages_reused": 1e300, "rate_limited": 9e18}},
    "seconds 1e308": {"usage": {"upload_seconds": 1e308}},
    "deferred long ago": {"deferred_at": -1e308},
    "garbage": {"usage": "garbage", "deferred_at": "yesterday"},
    "a list": ["not", "a", "mapping"],
}


@pytest.mark.parametrize("carried", HOSTILE_CARRIED.values(), ids=HOSTILE_CARRIED.keys())
def test_a_hostile_carried_in_the_event_never_makes_the_usage_absurd(lane, make_image, carried):
    """Promise 4: what comes back from the database is read within bounds, never as 1e308 or 2**63.

    The figures are the task's own (from its trigger's kwargs); one that is garbled reads as 0, one
    absurdly large as at most ``MOST_READ_BACK``, and a deferral adds at most its own timeout.
    """
    images = [make_image(f"hostile-{n}.jpg", title=f"Hostile {n}") for n in range(4)]
    ti = TaskInstance()
    op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=2)
    records = resumed_with(op, {"ti": ti}, carried)
    assert len(records) == 4
    usage = ti.xcom[USAGE_XCOM_KEY]
    assert billed(lane) == 4
    assert all(0 <= usage[name] <= MOST_READ_BACK + 4 for name in usage if name not in ("model", "lane")), (
        usage
    )
    assert usage["wait_seconds"] <= MOST_READ_BACK + op.timeout + 60, usage


@pytest.mark.parametrize("carried", HOSTILE_CARRIED.values(), ids=HOSTILE_CARRIED.keys())
def test_a_hostile_carried_in_the_event_never_makes_a_capped_task_bill_past_its_cap(
    lane, make_image, monkeypatch, carried
):
    """Promise 1 and 4: the PDF lane sends its second PDF after the resume; max_pages=10 holds.

    A carried count larger than the cap cannot be the task's own (it never books past it): the task
    then fails closed, naming what it did not send, rather than send past its cap.
    """
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    images = [make_image(f"capped-{n}.jpg", title=f"Capped {n}") for n in range(4)]
    op = parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=2, max_pages=10)
    outcome: object
    try:
        outcome = resumed_with(op, {"ti": TaskInstance()}, carried)
    except Doc2XError as error:
        outcome = error
    if isinstance(outcome, Doc2XError):
        assert "budget_exceeded" in str(outcome)
    else:
        assert isinstance(outcome, list) and len(outcome) == 4
    assert billed(lane) <= 10


def test_the_usage_of_a_task_stopped_by_an_empty_quota_is_still_said(lane, make_image):
    """Promise 4 (README: "At its end (failed or not) each task says what it cost")."""
    lane.configure(quota=2)
    images = [make_image(title=f"Quota {n}") for n in range(4)]
    ti = TaskInstance()
    with pytest.raises(Doc2XError):
        run(parse_operator(images, deferrable=True, max_concurrent_uploads=1), ti)
    assert billed(lane) == 2
    assert ti.xcom.get(USAGE_XCOM_KEY, {}).get("pages_billed") == 2, ti.xcom


def test_uploads_stopped_before_they_were_sent_give_their_pages_back(lane, make_image, monkeypatch):
    """Promise 3: the quota runs out; uploads still waiting for the key's window are never sent.

    They were booked before they waited for the window; the batch stops them (not a Doc2X error),
    and the day must keep only what the server billed.
    """
    use_connection(
        monkeypatch,
        lane,
        daily_page_budget=100,
        rate_limit_images=1,
        rate_limit_window=1,
        max_concurrent_uploads=4,
    )
    lane.configure(quota=1)
    images = [make_image(title=f"Stopped {n}") for n in range(4)]
    with pytest.raises(Doc2XError):
        run(parse_operator(images, deferrable=True))
    assert billed(lane) == 1
    assert budget_of_the_connection().remaining() == 100 - billed(lane)


def test_a_lost_upload_answer_keeps_its_pages_on_the_day(lane, make_image, monkeypatch):
    """Promise 3: Doc2X took (and billed) the image and its answer never came: its page stays counted."""
    use_connection(monkeypatch, lane, daily_page_budget=10, timeout=1.0)
    lane.configure(stall_next=1, stall_seconds=3)
    images = [make_image(title="Lost"), make_image(title="Kept")]
    with pytest.raises(Doc2XError, match="upload_answer_lost"):
        run(parse_operator(images, deferrable=True))
    assert billed(lane) == 2
    assert budget_of_the_connection().remaining() == 10 - 2


def test_preuploads_refused_with_429_give_their_pages_back(lane, make_image, monkeypatch):
    """Promise 3: the PDF API refuses a preupload (429) past its retries: the PDF's pages come back."""
    use_connection(monkeypatch, lane, daily_page_budget=50, max_retries=0, pdf_max_in_flight=2)
    lane.configure(preupload_rate_limit=1, rate_window=600)
    images = [make_image(f"pre-{n}.jpg", title=f"Pre {n}") for n in range(4)]
    ti = TaskInstance()
    # The PDFs refused are tried again through the image lane: the task succeeds.
    run(parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=2), ti)
    assert ti.xcom[USAGE_XCOM_KEY]["pages_billed"] == billed(lane) == 4
    assert budget_of_the_connection().remaining() == 50 - billed(lane)


def test_pdfs_refused_for_the_keys_limits_give_their_pages_back(lane, make_image, monkeypatch):
    """Promise 3 (limit codes) and 4: Doc2X refuses a PDF task for its tasks in progress, unbilled.

    The PDF is sent again as it was packed; the day and the usage must count it once.
    """
    use_connection(monkeypatch, lane, daily_page_budget=100, pdf_max_in_flight=2)
    lane.configure(max_tasks_in_progress=1, pdf_page_seconds=0.3)
    images = [make_image(f"limit-{n}.jpg", title=f"Limit {n}") for n in range(4)]
    ti = TaskInstance()
    run(parse_operator(images, method="pdf", deferrable=True, pdf_max_pages=2), ti)
    stats = lane.stats()
    assert stats["pdf_tasks_failed"] >= 1  # a task was refused for the limit (the attack took place)
    assert billed(lane) == 4
    assert (ti.xcom[USAGE_XCOM_KEY]["pages_billed"], budget_of_the_connection().remaining()) == (4, 100 - 4)


def test_a_dry_run_counts_a_manifest_known_image_whose_result_was_deleted(lane, make_image, tmp_path):
    """Promise 2: the manifest knows an image whose result folder someone removed; what does the run bill?"""
    out = tmp_path / "out"
    images = [make_image(f"gone-{n}.png", title=f"Gone {n}") for n in range(2)]
    records = run(parse_operator(images, output_path=str(out), incremental=True, deferrable=True))
    shutil.rmtree(Path(records[0]["markdown_path"].removeprefix("file://")).parent)
    before = billed(lane)
    plan = parse_operator(
        images, output_path=str(out), incremental=True, deferrable=True, dry_run=True
    ).execute({})
    run(parse_operator(images, output_path=str(out), incremental=True, deferrable=True))
    assert billed(lane) - before == plan["pages_to_bill"], plan


@pytest.mark.parametrize("method", ["async", "pdf"])
def test_a_dry_run_plans_a_large_scan_under_two_names_as_the_run_bills_it(lane, tmp_path, method):
    """Promise 2: a PNG over 7 MB goes as a one-page PDF (a document); twice under two names, once billed."""
    from PIL import Image

    big = tmp_path / "big.png"
    Image.frombytes("RGB", (1800, 1600), os.urandom(1800 * 1600 * 3)).save(big, compress_level=0)
    assert big.stat().st_size > 7 * 1024 * 1024
    twin = tmp_path / "big-twin.png"
    shutil.copy(big, twin)
    plan = parse_operator([big, twin], method=method, deferrable=True, dry_run=True).execute({})
    run(parse_operator([big, twin], method=method, deferrable=True))
    assert billed(lane) == plan["pages_to_bill"] == 1, plan


@pytest.mark.parametrize("method", ["async", "sync", "pdf"])
def test_a_budget_in_a_redis_nobody_answers_sends_nothing_and_leaves_the_retries(
    lane, make_image, monkeypatch, method
):
    """Promise 3: fails closed in Redis too (pacing falls back to the host; the budget must not)."""
    pytest.importorskip("airflow.providers.redis.hooks.redis")
    monkeypatch.setenv("AIRFLOW_CONN_PACING_REDIS", f"redis://127.0.0.1:{free_port()}/0")
    use_connection(monkeypatch, lane, daily_page_budget=10, pacing_conn_id="pacing_redis")
    images = [make_image(f"redis-{n}.jpg", title=f"Redis {n}") for n in range(2)]
    with pytest.raises(Doc2XError) as caught:
        run(parse_operator(images, method=method, deferrable=method != "sync"))
    assert isinstance(caught.value, Doc2XBudgetUnavailableError), repr(caught.value)
    assert not isinstance(caught.value, AirflowFailException)
    assert sent(lane) == 0 and billed(lane) == 0
