"""One PDF of the lane sent to Doc2X: recorded before its PUT, then its jobs become the PDF's, or failed.

Two kinds of PDF go through the same steps (:meth:`PdfSender.send`): a PDF of packed images, each
image a page of it, and a *document*, one source sent as one PDF (a PDF as it is, a multi-page TIFF
or a large scan packed into one). Either way the PDF's uid and page map are written to the task's
journal before its PUT starts, so that a PUT that lands and is never answered can still be found;
a PUT whose answer was lost is polled by its uid, never sent again within the try; a refused key or
an empty quota is raised once the PDF's jobs say so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import LANE_PDF, document_job, failed_job, pdf_job, source_keys
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XBudgetError,
    Doc2XBudgetUnavailableError,
    Doc2XError,
    Doc2XInputError,
    Doc2XQuotaError,
    Doc2XSubmitUncertainError,
    Doc2XTaskStateError,
)
from airflow_provider_doc2x.journal import TaskJournal
from airflow_provider_doc2x.pdf_lane.reconnect import (
    PUT_STARTED,
    UNCERTAIN,
    UPLOADED,
    PdfReconnection,
    RecordedPdf,
)
from airflow_provider_doc2x.spending import Spending

if TYPE_CHECKING:
    from airflow_provider_doc2x.documents.intake import Intake
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook

Jobs = list[dict[str, Any]]


class PdfSender:
    """Sends the lane's PDFs, one at a time per call, and turns each one's jobs into the PDF's.

    :param hook: the hook (the PDF API's calls).
    :param journal: the task's journal (the PDF's uid, before its PUT).
    :param recorded: the lane's records of PDFs (written before the PUT and after its answer).
    :param log: the task's logger.
    :param model: the PDF API's model, or None for the service's default.
    :param spending: the task's pages, booked before each PDF leaves (its budgets).
    """

    def __init__(
        self,
        hook: Doc2XHook,
        journal: TaskJournal,
        recorded: PdfReconnection,
        log: Any,
        model: str | None,
        spending: Spending,
    ) -> None:
        """Keep the parts; nothing is sent until asked."""
        self.spending = spending
        self.hook = hook
        self.journal = journal
        self.recorded = recorded
        self.log = log
        self.model = model

    async def packed(self, jobs: Jobs, indices: list[int], pdf: Any) -> None:
        """Send one PDF of packed images (:class:`~airflow_provider_doc2x.pdf.packing.PackedPdf`); its file goes after."""
        round_ = int(jobs[indices[0]].get("round") or 0)
        page_of = {page.sha256: page.page_idx for page in pdf.pages}
        mine = [index for index in indices if jobs[index]["sha256"] in page_of]

        def submitted(uid: str, uploaded_at: float, lost: dict[str, Any]) -> None:
            for index in mine:
                entry = jobs[index]
                jobs[index] = (
                    pdf_job(
                        uid,
                        entry["source"],
                        entry["sha256"],
                        page_idx=page_of[entry["sha256"]],
                        pages=pdf.page_count,
                        uploaded_at=uploaded_at,
                        round_=round_,
                    )
                    | lost
                )

        def failed(error: Doc2XError) -> None:
            for index in mine:
                entry = jobs[index]
                jobs[index] = {
                    **failed_job(entry["source"], entry["sha256"], error, uid=error.uid),
                    "lane": LANE_PDF,
                    "page_idx": page_of[entry["sha256"]],
                    "pages": pdf.page_count,
                    "chunk": entry["chunk"],
                    **({"round": round_} if round_ else {}),
                }

        record = RecordedPdf("", [page.sha256 for page in pdf.pages], PUT_STARTED, round=round_)
        try:
            await self.send(
                pdf.path,
                pdf.page_count,
                pdf.sources,
                record,
                f"a PDF of {len(mine)} images",
                submitted,
                failed,
            )
        finally:
            pdf.remove()

    async def document(self, jobs: Jobs, indices: list[int], intake: Intake) -> None:
        """Send one document as its PDF (made by the intake); its jobs (its content under each name) become the PDF's."""
        head = jobs[indices[0]]
        source_format, converted, digest = head["source_format"], head.get("converted"), head["sha256"]
        sources = tuple(jobs[index]["source"] for index in indices)

        def failed(error: Doc2XError) -> None:
            keys = {"lane": LANE_PDF, "pages": head["pages"], **source_keys(source_format, converted)}
            for index in indices:
                jobs[index] = {**failed_job(jobs[index]["source"], digest, error, uid=error.uid), **keys}

        try:
            path, pages = await asyncio.to_thread(
                intake.pdf_of, head["source"], digest, source_format, converted, head["pages"]
            )
        except Doc2XInputError as error:
            self.log.error("%s", error)
            failed(error)
            return
        except (SystemExit, KeyboardInterrupt) as error:
            # Raised in the packing thread (a library's exit): let through, it would stop the
            # transport's event loop, and every later call of the task would wait on it forever.
            raise RuntimeError(f"packing {head['source']} into a PDF stopped: {error!r}") from error

        def submitted(uid: str, uploaded_at: float, lost: dict[str, Any]) -> None:
            for index in indices:
                jobs[index] = (
                    document_job(
                        uid,
                        jobs[index]["source"],
                        digest,
                        pages=pages,
                        uploaded_at=uploaded_at,
                        source_format=source_format,
                        converted=converted,
                    )
                    | lost
                )

        document = {"pages": pages, "source_format": source_format, "converted": converted}
        record = RecordedPdf("", [digest], PUT_STARTED, document=document)
        name = " = ".join(sources)  # the document (under each name it was given), not its private copy
        await self.send(path, pages, sources, record, f"document {name}", submitted, failed, name=name)

    async def send(
        self,
        path: Path,
        pages: int,
        sources: tuple[str, ...],
        record: RecordedPdf,
        what: str,
        submitted: Callable[[str, float, dict[str, Any]], None],
        failed: Callable[[Doc2XError], None],
        *,
        name: str | None = None,
    ) -> None:
        """Preupload, record, PUT; then ``submitted(uid, uploaded_at, lost)`` or ``failed(error)`` sets the jobs.

        A PUT whose answer was lost counts as submitted, its jobs marked ``uncertain`` (``lost``):
        polled by its uid, and named if Doc2X never shows it.
        A refused key or an empty quota is raised after ``failed``: it stops the lane.
        """

        async def before_put(upload: protocol.Doc2XPreupload) -> None:
            record.uid, record.state, record.at = upload.uid, PUT_STARTED, time.time()
            await self.journal.pdf_started(upload.uid, record.to_json())

        try:
            booking = await self.spending.book(pages, what=name or what)
        except Doc2XBudgetError as error:
            self.log.error("%s", error)
            failed(error)
            return
        except Doc2XBudgetUnavailableError as error:
            failed(error)
            raise
        try:
            submission = await self.hook.pdf.asubmit_pdf(
                path, pages=pages, sources=sources, model=self.model, before_put=before_put, name=name
            )
        except Doc2XSubmitUncertainError as error:
            # The PUT may have landed: the uid is known, so it is polled, never sent again here.
            uid = error.uid or record.uid
            record.state, record.uploaded_at = UNCERTAIN, time.time()
            self.recorded.write(record)
            self.log.warning("%s; PDF %s is polled by its uid to learn whether Doc2X took it", error, uid)
            submitted(uid, record.uploaded_at, {"uncertain": 1})
            return
        except Doc2XError as error:
            await self.spending.release(booking)  # Doc2X answered: it did not take the PDF
            failed(error)
            if isinstance(error, (Doc2XAuthError, Doc2XQuotaError, Doc2XTaskStateError)):
                raise
            self.log.warning("The upload of %s failed: %s", what, error)
            return
        record.uid, record.state, record.uploaded_at = (
            submission.uid,
            UPLOADED,
            round(submission.uploaded_at, 1),
        )
        self.recorded.write(record)
        submitted(submission.uid, submission.uploaded_at, {})
