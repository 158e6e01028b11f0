"""What the task's journal holds of each PDF, and how a new try reconnects to what an earlier one submitted.

A PDF is recorded before its PUT starts (its uid and page map, the sha256 of each page), then
when the PUT is answered, or when its answer was lost. A new try (a retry, a lost triggerer, a
manual clear) reads the records, asks Doc2X once per PDF, and gives each image the job of the
newest PDF that holds it, instead of paying again; what Doc2X no longer knows is planned again,
saying in the log whether it may be billed twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import document_job, job, pdf_job
from airflow_provider_doc2x.exceptions import Doc2XJobNotFoundError, Doc2XProtocolError
from airflow_provider_doc2x.journal import TaskJournal
from airflow_provider_doc2x.records import FETCH_ATTEMPTS, recorded_status
from airflow_provider_doc2x.spending import Spending
from airflow_provider_doc2x.storage.sources import ImageSource

if TYPE_CHECKING:
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.storage.results import ResultStore

#: Upload states recorded for a PDF: its PUT started, the store answered 200, or the answer was lost.
PUT_STARTED = "put"
UPLOADED = "uploaded"
UNCERTAIN = "uncertain"


@dataclass
class RecordedPdf:
    """What the task state store holds of one PDF of an earlier try (or of this one)."""

    uid: str
    pages: list[str]
    state: str
    uploaded_at: float | None = None
    round: int = 0
    fallback: str | None = None
    #: When its PUT started (a PUT that was never answered may have landed from then on): set when
    #: the PUT starts, kept by every later write of the record.
    at: float | None = None
    #: A document's: its pages, its ``source_format`` and what it was converted into (``pages``
    #: then holds the document's one sha256); None for a PDF of packed images.
    document: dict[str, Any] | None = None

    @classmethod
    def of(cls, uid: str, value: Any) -> RecordedPdf | None:
        """A record read back, or None when it is not one this provider wrote."""
        if not isinstance(value, dict):
            return None
        pages, state = value.get("pages"), value.get("state")
        if (
            not isinstance(pages, list)
            or not all(isinstance(page, str) for page in pages)
            or not isinstance(state, str)
        ):
            return None
        round_ = value.get("round")
        return cls(
            uid,
            pages,
            state,
            _seconds(value.get("uploaded_at")),
            round_ if isinstance(round_, int) and not isinstance(round_, bool) else 0,
            value.get("fallback") if isinstance(value.get("fallback"), str) else None,
            _seconds(value.get("at")),
            _document(value.get("document"), pages),
        )

    def to_json(self) -> dict[str, Any]:
        """The record as the store keeps it; ``at`` as it was (a rewrite, a fallback say, keeps when the PUT started)."""
        value: dict[str, Any] = {
            "pages": self.pages,
            "state": self.state,
            "at": self.at if self.at is not None else time.time(),
        }
        if self.uploaded_at is not None:
            value["uploaded_at"] = self.uploaded_at
        if self.round:
            value["round"] = self.round
        if self.fallback:
            value["fallback"] = self.fallback
        if self.document:
            value["document"] = self.document
        return value


class PdfReconnection:
    """The PDF lane's side of the journal: reuse stored results, reconnect to recorded PDFs, note fallbacks.

    :param hook: the hook (status calls of recorded PDFs).
    :param journal: the task's journal.
    :param results: where results go, or None (XCom); with its ``overwrite``, nothing is reused.
    :param log: the task's logger.
    :param spending: the task's usage (its reconnections, its pages possibly billed twice).
    """

    def __init__(
        self,
        hook: Doc2XHook,
        journal: TaskJournal,
        results: ResultStore | None,
        log: Any,
        spending: Spending | None = None,
    ) -> None:
        """Keep the parts; nothing is read until asked."""
        self.spending = spending or Spending()
        self.hook = hook
        self.journal = journal
        self.results = results
        self.log = log

    def write(self, pdf: RecordedPdf) -> None:
        """Queue a PDF's newer record for the journal (nothing before Doc2X named it, nor without a store)."""
        if pdf.uid:
            self.journal.pdf_answered(pdf.uid, pdf.to_json())

    async def reuse_and_reconnect(
        self,
        sources: Sequence[ImageSource],
        by_content: dict[str, list[int]],
        jobs: list[dict[str, Any] | None],
    ) -> set[int]:
        """Fill the jobs of contents already parsed or in a recorded PDF; return those for the image lane."""
        if self.results is not None and not self.results.overwrite:
            for digest, indices in by_content.items():
                record = await asyncio.to_thread(self.results.cached, digest, sources[indices[0]].uri)
                if record is not None:
                    self.log.info(
                        "Cache hit: %s is already parsed in %s; not submitted",
                        sources[indices[0]].uri,
                        record["markdown_path"],
                    )
                    for index in indices:
                        jobs[index] = job(record["uid"], sources[index].uri, digest, protocol.STATUS_SUCCESS)
        if not self.journal.keeps:
            # Even on a first try: Airflow may run a first try's execute again from its start (its
            # resume lost in a race), and what that execute's first run submitted is recorded.
            return set()
        latest: dict[str, tuple[RecordedPdf, int]] = {}  # a content's newest PDF, and its page there
        for pdf in await self._recorded():
            for page_idx, digest in enumerate(pdf.pages):
                latest[digest] = (pdf, page_idx)
        by_pdf: dict[str, list[tuple[str, int]]] = {}
        recorded: dict[str, RecordedPdf] = {}
        for digest, indices in by_content.items():
            if jobs[indices[0]] is None and digest in latest:
                pdf, page_idx = latest[digest]
                recorded[pdf.uid] = pdf
                by_pdf.setdefault(pdf.uid, []).append((digest, page_idx))
        image_lane: set[int] = set()
        for uid, contents in by_pdf.items():
            pdf = recorded[uid]
            if pdf.fallback == "image":  # its images went through the image lane: it reconnects them
                image_lane.update(index for digest, _ in contents for index in by_content[digest])
                continue
            found = await self._reconnect(pdf)
            if found is None:
                continue  # planned again with the others
            status, extra = found
            if pdf.document is not None and status == protocol.STATUS_FAILED:
                # A failed document is submitted again by a new try, as a failed image of the
                # image lane is: it is never cut, and its failure was named by the earlier try.
                self.log.warning(
                    "Recorded Doc2X PDF %s of %s failed (code %s); the document is submitted again "
                    "and is billed again",
                    uid,
                    sources[by_content[contents[0][0]][0]].uri,
                    extra.get("code"),
                )
                continue
            if status != protocol.STATUS_FAILED:
                self.spending.reconnected(len(contents) if pdf.document is None else pdf.document["pages"])
            for digest, page_idx in contents:
                for index in by_content[digest]:
                    jobs[index] = {**_job_of(pdf, sources[index].uri, digest, page_idx, status), **extra}
        return image_lane

    async def _recorded(self) -> list[RecordedPdf]:
        """The PDFs the store holds for this task, oldest first."""
        found = [RecordedPdf.of(uid, value) for uid, value in (await self.journal.pdf_records()).items()]
        return [pdf for pdf in found if pdf is not None]

    async def _reconnect(self, pdf: RecordedPdf) -> tuple[str, dict[str, Any]] | None:
        """The status of a PDF an earlier try recorded, and its images' extra keys; None to submit them again.

        None when Doc2X does not know the uid (expired, or its upload never landed). A failed PDF
        comes back failed: :meth:`advance` tries its images again. A status answer that is malformed
        (cut off, or a page_idx twice or missing, say) is asked again, as the result fetch does; a PDF
        whose answer stays malformed comes back failed with ``protocol_error``: its images are named,
        not paid for again, and the other PDFs go on.
        """
        # A PUT that was never answered may have landed moments ago: the pickup delay counts from it.
        since = pdf.uploaded_at if pdf.state == UPLOADED else (pdf.uploaded_at or pdf.at)
        try:
            status = await recorded_status(
                self.hook,
                lambda: self.hook.pdf.aget_pdf_status(pdf.uid, uploaded_at=since),
                self.log,
                f"Recorded Doc2X PDF {pdf.uid} ({len(pdf.pages)} pages)",
            )
        except Doc2XJobNotFoundError:
            if pdf.state == UPLOADED:
                self.log.warning(
                    "Recorded Doc2X PDF %s (%d pages) is no longer known (its result expired or was lost); "
                    "its images are submitted again and billed again",
                    pdf.uid,
                    len(pdf.pages),
                )
            else:
                self.spending.possibly_billed_twice(len(pdf.pages))
                self.log.warning(
                    "An earlier try's upload of Doc2X PDF %s (%d pages) %s, and Doc2X does not know the uid: "
                    "its images are submitted again and are possibly billed twice",
                    pdf.uid,
                    len(pdf.pages),
                    "lost its answer" if pdf.state == UNCERTAIN else "started and was never answered",
                )
            return None
        except Doc2XProtocolError as malformed:
            self.log.error(
                "Recorded Doc2X PDF %s (%d pages) answered its status malformed %d times; its images fail "
                "with protocol_error: %s",
                pdf.uid,
                len(pdf.pages),
                FETCH_ATTEMPTS,
                malformed,
            )
            return protocol.STATUS_FAILED, {"code": malformed.failure_code, "message": malformed.summary}
        if status.status == protocol.STATUS_FAILED:
            error = status.failure()
            self.log.warning("Recorded Doc2X PDF %s failed (%s); its images are tried again", pdf.uid, error)
            return protocol.STATUS_FAILED, {"code": error.failure_code, "message": error.summary}
        self.log.info(
            "Reconnected %d images to Doc2X PDF %s (%r), recorded by an earlier try",
            len(pdf.pages),
            pdf.uid,
            status.status,
        )
        if status.status == protocol.STATUS_AWAITING_PICKUP:
            # Not known yet: polled as a lost answer is (if Doc2X never shows it, the images are named).
            return protocol.STATUS_PROCESSING, ({} if pdf.state == UPLOADED else {"uncertain": 1})
        if pdf.state != UPLOADED:
            pdf.state, pdf.uploaded_at = UPLOADED, since or time.time()
            self.write(pdf)
        return status.status, {}

    async def mark_fallback(self, uid: str, fallback: str) -> None:
        """Note in a failed PDF's record where its images went next, so that a new try follows them."""
        pdf = RecordedPdf.of(uid, await self.journal.pdf(uid))
        if pdf is not None:
            pdf.fallback = fallback
            self.write(pdf)


def _job_of(pdf: RecordedPdf, source: str, digest: str, page_idx: int, status: str) -> dict[str, Any]:
    """The job of one content of a recorded PDF: its page of packed images, or the whole document."""
    uploaded_at = pdf.uploaded_at or pdf.at or time.time()
    if pdf.document is not None:
        return document_job(
            pdf.uid,
            source,
            digest,
            pages=pdf.document["pages"],
            uploaded_at=uploaded_at,
            source_format=pdf.document["source_format"],
            converted=pdf.document.get("converted"),
            status=status,
        )
    return pdf_job(
        pdf.uid,
        source,
        digest,
        page_idx=page_idx,
        pages=len(pdf.pages),
        uploaded_at=uploaded_at,
        status=status,
        round_=pdf.round,
    )


def _document(value: Any, pages: list[str]) -> dict[str, Any] | None:
    """A document's keys read back: its page count (a whole number), format and conversion (texts), or None."""
    if not isinstance(value, dict) or len(pages) != 1:
        return None
    count, source_format, converted = value.get("pages"), value.get("source_format"), value.get("converted")
    if (
        isinstance(count, bool)
        or not isinstance(count, int)
        or count < 1
        or not isinstance(source_format, str)
    ):
        return None
    if converted is not None and not isinstance(converted, str):
        return None
    return {"pages": count, "source_format": source_format, "converted": converted}


def _seconds(value: Any) -> float | None:
    """A time read back from the store: a finite number, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)
