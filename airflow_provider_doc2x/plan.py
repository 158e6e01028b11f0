"""What a run would send and bill, counted before the first upload: ``max_pages`` and ``dry_run``.

Doc2X bills per page. The plan counts, after every source was checked, the pages that must really
be sent: each content once (the same bytes under two names are sent once), less what the manifest
knows (never opened) and what ``output_path`` already holds (the cache). An image is one page; a
document (a PDF, a multi-page TIFF, a scan over 7 MB) is its pages. It reads each JPEG and PNG once
more to learn its sha256 (the lanes read it again when they send it), so it is only made when a task
asks for it: with ``max_pages`` or ``dry_run``.

What it cannot know: an upload whose answer was lost and that is sent again by a later try, and
the pages of a PDF that fails as a whole and is tried again in smaller PDFs (``method="pdf"``).
``max_pages`` also bounds those, as each upload books its pages against it
(:mod:`~airflow_provider_doc2x.spending`); the plan is what a run that goes well bills.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_doc2x.documents.intake import Checked, Document
from airflow_provider_doc2x.exceptions import Doc2XBudgetError

if TYPE_CHECKING:
    from airflow_provider_doc2x.storage.results import ResultStore

#: Sources hashed at once (reading is I/O; hashing lets go of the GIL).
PLAN_THREADS = 4
#: How a source is counted: sent (billed), its content sent under another name, in the cache, or
#: known by the manifest.
NEW, DUPLICATE, CACHED, MANIFEST = "new", "duplicate", "cached", "manifest"


@dataclass
class Plan:
    """What a run would do with each source, and the pages it would bill."""

    #: One entry per source, those the manifest knows first, then the others in input order:
    #: ``{"source", "pages", "state"}`` (state: new, duplicate, cached or manifest).
    sources: list[dict[str, Any]] = field(default_factory=list)

    def pages(self, state: str) -> int:
        """Pages of the sources in this state."""
        return sum(entry["pages"] for entry in self.sources if entry["state"] == state)

    def count(self, state: str) -> int:
        """Sources in this state."""
        return sum(entry["state"] == state for entry in self.sources)

    @property
    def pages_to_bill(self) -> int:
        """The pages a run that goes well bills: those of the new contents."""
        return self.pages(NEW)

    def to_json(self) -> dict[str, Any]:
        """The plan as XCom keeps it: the totals, then each source."""
        return {
            "pages_to_bill": self.pages_to_bill,
            **{f"{state}_sources": self.count(state) for state in (NEW, DUPLICATE, CACHED, MANIFEST)},
            **{f"{state}_pages": self.pages(state) for state in (CACHED, MANIFEST)},
            "sources": self.sources,
        }

    def describe(self) -> str:
        """One line for the task's log."""
        return (
            f"Doc2X plan: {_pages(self.pages_to_bill)} to bill for {self.count(NEW)} new sources; "
            f"{self.count(CACHED)} sources ({self.pages(CACHED)} pages) already parsed in output_path, "
            f"{self.count(MANIFEST)} ({self.pages(MANIFEST)} pages) known by the manifest, "
            f"{self.count(DUPLICATE)} the same content as another source"
        )

    def check(self, max_pages: int | None) -> None:
        """Refuse a plan over ``max_pages`` before anything is sent (no Airflow retries)."""
        if max_pages is not None and self.pages_to_bill > max_pages:
            raise Doc2XBudgetError(
                f"This run would bill {_pages(self.pages_to_bill)} ({self.count(NEW)} new sources), over "
                f"max_pages={max_pages}; nothing was sent. Check image_path and output_path (a wrong "
                "output_path misses the cache), or raise max_pages on the task",
                code="budget_exceeded",
            )


def make_plan(
    items: Sequence[Checked],
    *,
    manifest_known: dict[str, dict[str, Any]] | None = None,
    results: ResultStore | None = None,
) -> Plan:
    """Count each source: the manifest's known ones, then each checked one.

    :param items: the intake's checked sources (those the manifest did not know).
    :param manifest_known: the manifest's records of the sources it knows (never opened).
    :param results: the task's result store (its cache), or None.
    """
    with ThreadPoolExecutor(PLAN_THREADS, thread_name_prefix="doc2x-plan") as pool:
        digests = list(pool.map(_digest, items))
    plan = Plan()
    for uri, record in (manifest_known or {}).items():
        plan.sources.append({"source": uri, "pages": _record_pages(record), "state": MANIFEST})
    seen: set[str] = set()
    for item, digest in zip(items, digests, strict=True):
        pages = item.pages if isinstance(item, Document) else 1
        if digest in seen:
            state = DUPLICATE
        elif results is not None and not results.overwrite and results.cached(digest, item.uri):
            state = CACHED
        else:
            state = NEW
        seen.add(digest)
        plan.sources.append({"source": item.uri, "pages": pages, "state": state})
    return plan


def planned(
    items: Sequence[Checked],
    split: Any,
    results: ResultStore | None,
    *,
    max_pages: int | None,
    dry_run: bool,
    log: Any,
) -> dict[str, Any] | None:
    """A task's plan, when it asks for one: said in its log; returned for a dry run; refused over ``max_pages``.

    :param split: the manifest's split of the sources (its ``known`` ones), or None.
    Returns the plan for a dry run (nothing is to be sent), else None.
    """
    if not dry_run and max_pages is None:
        return None
    plan = make_plan(items, manifest_known=split.known if split is not None else None, results=results)
    log.info("%s", plan.describe())
    if dry_run:
        return plan.to_json()
    plan.check(max_pages)
    return None


def _digest(item: Checked) -> str:
    """The sha256 that keys a source in the cache and the journal (a JPEG or PNG is read for it)."""
    if isinstance(item, Document):
        return item.sha256
    digest = getattr(item, "sha256", "")  # a converted raster knows its source's
    return digest or item.read_with_digest()[1]


def _record_pages(record: dict[str, Any]) -> int:
    pages = record.get("pages")
    return len(pages) if isinstance(pages, list) and pages else 1


def _pages(count: int) -> str:
    return f"{count} page" if count == 1 else f"{count} pages"
