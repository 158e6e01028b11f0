"""
Spend capped before it happens: ``max_pages`` refuses a run over it with nothing sent; ``dry_run``
says what a run would bill, and the run that follows bills exactly that; a cap that runs out
mid-task (a PDF tried again) sends nothing new and names what it did not send.
"""

from __future__ import annotations

import shutil

import img2pdf
import pytest

from airflow_provider_doc2x.exceptions import Doc2XBudgetError, Doc2XError
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.usage import USAGE_XCOM_KEY
from tests.helpers import TaskInstance, parse_operator, run_to_the_end, use_connection


def billed(server) -> int:
    """Pages the local server billed: images of the image API and pages of the PDF API."""
    stats = server.stats()
    return stats["billed_total"] + stats["pdf_pages_billed"]


def a_document(tmp_path, name: str, pages: int):
    path = tmp_path / name
    path.write_bytes(
        img2pdf.convert(
            [render(Page(title=f"{name} page {n}"), fmt="JPEG", size=(400, 300)) for n in range(pages)]
        )
    )
    return path


@pytest.mark.parametrize("method", ["async", "pdf"])
def test_a_run_over_max_pages_is_refused_with_nothing_sent(lane, make_image, tmp_path, method):
    images = [make_image(title=f"Capped {n}") for n in range(2)]
    document = a_document(tmp_path, "three.pdf", 3)
    op = parse_operator([*images, document], method=method, deferrable=True, max_pages=4)
    with pytest.raises(Doc2XBudgetError) as caught:
        op.execute({})
    message = str(caught.value)
    assert "would bill 5 pages" in message and "max_pages=4" in message and "nothing was sent" in message
    stats = lane.stats()
    assert (
        billed(lane) == 0
        and stats["preuploads"] == 0
        and stats["requests"].get("POST /api/v2/parse/img", 0) == 0
    )


def test_a_dry_run_bills_nothing_and_the_next_run_bills_what_it_planned(lane, make_image, tmp_path):
    out = tmp_path / "out"
    parsed_before = make_image(title="Parsed Before")
    run_to_the_end(parse_operator([parsed_before], output_path=str(out), deferrable=True), {})
    before = billed(lane)
    new = [make_image(title=f"New {n}") for n in range(3)]
    twin = tmp_path / "twin.png"
    shutil.copy(new[0], twin)  # the same content under another name: sent once
    document = a_document(tmp_path, "four.pdf", 4)
    sources = [parsed_before, *new, twin, document]

    plan = parse_operator(sources, output_path=str(out), deferrable=True, dry_run=True).execute({})
    assert billed(lane) == before  # nothing sent
    assert plan["pages_to_bill"] == 3 + 4
    assert (plan["new_sources"], plan["cached_sources"], plan["duplicate_sources"]) == (4, 1, 1)
    assert [entry["state"] for entry in plan["sources"]] == [
        "cached",
        "new",
        "new",
        "new",
        "duplicate",
        "new",
    ]

    records, _ = run_to_the_end(parse_operator(sources, output_path=str(out), deferrable=True), {})
    assert len(records) == len(sources)
    assert billed(lane) - before == plan["pages_to_bill"]


def test_a_cap_that_runs_out_mid_task_sends_nothing_new_and_names_what_it_did_not_send(lane, make_image):
    """A PDF fails and its images are tried again: the second sending would take the task past max_pages."""
    images = [make_image(f"mid-{n}.jpg", title=f"Mid {n}") for n in range(4)]
    lane.configure(pdf_fail_next=1)
    op = parse_operator(images, method="pdf", deferrable=True, max_pages=4)
    with pytest.raises(Doc2XError) as caught:
        run_to_the_end(op, {})
    message = str(caught.value)
    for image in images:
        assert str(image) in message
    assert "budget_exceeded" in message
    stats = lane.stats()
    assert stats["pdf_tasks"] == 1  # the failed PDF only: nothing new was sent past the cap


def test_max_pages_is_checked_when_the_dag_is_parsed():
    with pytest.raises(ValueError, match="max_pages"):
        parse_operator(["a.png"], max_pages=-1)


@pytest.mark.parametrize("method", ["async", "pdf"])
def test_the_usage_says_what_was_billed_then_what_was_reused(lane, make_image, tmp_path, method):
    images = [make_image(title=f"Used {n}") for n in range(3)]
    document = a_document(tmp_path, "two.pdf", 2)
    out = tmp_path / "out"
    first = TaskInstance()
    op = parse_operator([*images, document], output_path=str(out), method=method, deferrable=True)
    run_to_the_end(op, {"ti": first})
    usage = first.xcom[USAGE_XCOM_KEY]
    assert (usage["pages_billed"], usage["pages_reused"], usage["pages_failed"]) == (5, 0, 0)
    assert usage["pages_billed"] == billed(lane)
    assert usage["lane"] == ("pdf" if method == "pdf" else "image") and usage["model"] == "v2"
    assert usage["wait_seconds"] > 0 and usage["upload_seconds"] > 0
    facets = op.get_openlineage_facets_on_complete(None).run_facets
    assert facets["doc2x_usage"].pages_billed == 5 and facets["doc2x_parser"].model == "v2"

    again = TaskInstance()
    run_to_the_end(
        parse_operator([*images, document], output_path=str(out), method=method, deferrable=True),
        {"ti": again},
    )
    usage = again.xcom[USAGE_XCOM_KEY]
    assert (usage["pages_billed"], usage["pages_reused"]) == (0, 5)
    assert billed(lane) == 5


def test_the_usage_of_a_failing_task_is_said_before_it_fails(lane, make_image):
    good = make_image(title="Good")
    bad = make_image(title="Bad", paragraphs=["<!-- doc2x-fail: parse_error -->"])
    ti = TaskInstance()
    with pytest.raises(Doc2XError):
        run_to_the_end(parse_operator([good, bad], deferrable=True), {"ti": ti})
    usage = ti.xcom[USAGE_XCOM_KEY]
    assert (usage["pages_billed"], usage["pages_failed"]) == (2, 1)


def test_a_daily_budget_runs_out_mid_task_and_the_next_task_sends_nothing(lane, make_image, monkeypatch):
    use_connection(monkeypatch, lane, daily_page_budget=3)
    images = [make_image(title=f"Daily {n}") for n in range(5)]
    with pytest.raises(Doc2XError) as caught:
        run_to_the_end(parse_operator(images, deferrable=True, max_concurrent_uploads=1), {})
    message = str(caught.value)
    assert "2 of 5 images were not parsed" in message and "budget_exceeded" in message
    assert billed(lane) == 3
    later = [make_image(title="Later")]
    with pytest.raises(Doc2XError) as caught:
        run_to_the_end(parse_operator(later, deferrable=True), {})
    assert "budget_exceeded" in str(caught.value) and str(later[0]) in str(caught.value)
    assert billed(lane) == 3  # the key's day is spent: nothing more was sent
