"""The worker's side of the PDF lane (``method="pdf"``): images packed into PDFs, a few PDFs in flight.

Doc2X's image API takes 30 images per 30 s per key; its PDF API takes multi-page PDFs, one image
being one page of quota either way. This lane plans PDFs of images of one aspect ratio
(:func:`~airflow_provider_doc2x.pdf.packing.plan_pdfs`), packs each losslessly when its turn comes
(:func:`~airflow_provider_doc2x.pdf.packing.pack_images`), and submits it with the hook's PDF calls
(preupload, PUT to the presigned url). What the task hands the trigger is still one job per
image, with its PDF's uid and its ``page_idx`` (see :mod:`airflow_provider_doc2x.events`).

- **Bounded in flight.** At most the connection's ``pdf_max_in_flight`` PDFs and
  ``pdf_max_pages_in_flight`` pages are submitted and unfinished at once (pdfdeal's 5 and 1000),
  counted over the task's jobs, so the bound holds across deferrals: the other images wait
  ``queued``; the trigger hands the task back once half of the PDFs in flight are done, and the
  task submits the next ones (:meth:`PdfLane.advance`).
- **One billing per image.** The same content listed twice is one page; a content with a complete
  result under ``output_path`` is not submitted; the task state store records each PDF's uid and
  its page map (the sha256 of each page) before its PUT starts, then its upload, so that a new
  try reconnects to the PDF (one status call per PDF) instead of paying again. A PUT whose answer
  was lost is never sent again within the try: its uid is known before the PUT, so it is polled,
  and if Doc2X does not know it after the pickup delay the task fails naming its images; a new try
  asks Doc2X again and submits them only if it still does not know the uid, saying so in the log.
- **No page lost.** A PDF that fails as a whole (``parse_error``, ``parse_timeout``, a refused
  file) does not drop its images: they are packed again into PDFs of a quarter of the pages, and
  a PDF of fewer than ``IMAGE_LANE_BELOW`` pages sends its images through the image lane. A PDF
  refused for the service's limits (or lost by it, or whose upload failed) is submitted again as
  it was, after the trigger's back-off, at most the connection's ``max_retries`` times, then its
  images go through the image lane. Either way the log says they may be billed again: whether
  Doc2X bills a failed PDF is not documented. In the end every image is parsed or named in the
  task's error with its code.
- **Images a PDF cannot hold losslessly** (a PNG with alpha, a CMYK JPEG, ...; see
  :mod:`~airflow_provider_doc2x.pdf.packing`) go through the image lane, with the reason in the log.
- **Remote images** (object storage) are copied into a private temporary folder of the worker
  (mode 0700) while the task runs; local files are read where they are.

On Airflow before 3.3 there is no task state store: a new try of the task submits its images again
(as in the image lane).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.documents.intake import ConvertedSource, Document, Intake
from airflow_provider_doc2x.events import (
    RETRY_SAME,
    is_document,
    is_pdf,
    is_pending,
    is_queued,
    queued_document,
    queued_job,
    retry_plan,
)
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XQuotaError,
    Doc2XRateLimitError,
)
from airflow_provider_doc2x.journal import TaskJournal
from airflow_provider_doc2x.pdf.packing import (
    DEFAULT_ASPECT_TOLERANCE,
    DEFAULT_PDF_MAX_PAGES,
    PackImage,
    plan_pdfs,
)
from airflow_provider_doc2x.pdf_lane.reconnect import (
    PdfReconnection,
)
from airflow_provider_doc2x.pdf_lane.sending import PdfSender
from airflow_provider_doc2x.pdf_lane.staging import PdfStaging
from airflow_provider_doc2x.storage.sources import ImageSource

if TYPE_CHECKING:
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.image_lane.uploads import ImageUploads
    from airflow_provider_doc2x.storage.results import ResultStore

#: A failed PDF's images are packed again into PDFs of this many times fewer pages.
SPLIT_BY = 4
#: A failed PDF whose images would go into PDFs of fewer pages than this sends them through the
#: image lane instead (200 pages: 50, then 12, then the image lane).
IMAGE_LANE_BELOW = 4


class PdfLane:
    """One task's images through Doc2X's PDF API, as jobs: :meth:`prepare`, then :meth:`advance` after each wait.

    Use it as a context manager: the private temporary folder (remote images, packed PDFs) is
    removed on exit.

    :param hook: the hook, its connection already read (``hook.settings``) in the worker's thread.
    :param images: the image lane of the same task, for images a PDF cannot hold or that failed in
        small PDFs.
    :param journal: the task's journal in the task state store (the PDFs of this task's tries).
    :param results: where results go (``output_path``), or None (XCom); with its ``overwrite``,
        nothing stored is reused.
    :param log: the task's logger.
    :param model: the PDF API's model (``"v2"``, ``"v3-2026"``), or None for the service's default (v2).
    :param pdf_max_pages: most pages per PDF (also bounded by the connection's
        ``pdf_max_pages_in_flight``).
    :param aspect_tolerance: the packer's grouping (0: by exact pixel size).
    :param allow_schemes: URL schemes the operator reads images from beyond storage (its own).
    :param intake: the task's checked sources (:class:`~airflow_provider_doc2x.documents.intake.Intake`),
        which makes each document's PDF when its turn comes.
    :param pack_images: pack images into PDFs (``method="pdf"``); False sends them through the image
        lane, and only documents through the PDF API.
    """

    def __init__(
        self,
        hook: Doc2XHook,
        *,
        images: ImageUploads,
        journal: TaskJournal,
        results: ResultStore | None,
        log: Any,
        model: str | None = None,
        pdf_max_pages: int = DEFAULT_PDF_MAX_PAGES,
        aspect_tolerance: float = DEFAULT_ASPECT_TOLERANCE,
        allow_schemes: Sequence[str] = (),
        intake: Intake | None = None,
        pack_images: bool = True,
    ) -> None:
        """Nothing is read or sent until :meth:`prepare` or :meth:`advance`."""
        self.intake = intake
        self.pack_images = pack_images
        self.hook = hook
        self.settings = hook.settings
        self.images = images
        self.journal = journal
        self.results = results
        self.log = log
        self.model = model
        self.max_pages = max(1, min(pdf_max_pages, self.settings.pdf_max_pages_in_flight))
        self.aspect_tolerance = aspect_tolerance
        self.allow_schemes = tuple(allow_schemes)
        self.max_files = max(1, self.settings.pdf_max_in_flight)
        self.max_pages_in_flight = max(1, self.settings.pdf_max_pages_in_flight)
        self.staging = PdfStaging()
        self.recorded = PdfReconnection(hook, journal, results, log, images.spending)
        self.sender = PdfSender(hook, journal, self.recorded, log, model, images.spending)
        self._journal_open: ExitStack | None = None
        #: Each planned content's image as planned, by sha256: a PDF packed by this process does
        #: not read the headers again (each is of the bytes with that sha256, which packing checks).
        self._planned: dict[str, PackImage] = {}

    # -- the lane's life -------------------------------------------------------------------------

    def __enter__(self) -> PdfLane:
        """Make the private folder; open the journal's thread."""
        with ExitStack() as stack:
            stack.enter_context(self.staging)
            stack.enter_context(self.journal.open())
            self._journal_open = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Remove the temporary folder; close the journal's thread."""
        if self._journal_open is not None:
            self._journal_open.close()
            self._journal_open = None

    # -- the first half: every image's job ---------------------------------------------------------

    def prepare(self, items: Sequence[ImageSource | Document]) -> list[dict[str, Any]]:
        """One job per source, in input order, none of them sent to the PDF API yet (see :meth:`advance`).

        Each is reused from ``output_path``, reconnected to a PDF an earlier try recorded, queued in
        a planned PDF (a document: as its own PDF), or submitted through the image lane: what no
        PDF can hold, a raster converted to PNG, and every image when ``pack_images`` is off.
        """
        sources = [item.source if isinstance(item, Document) else item for item in items]
        documents = {index: item for index, item in enumerate(items) if isinstance(item, Document)}
        packed = [
            index
            for index, item in enumerate(items)
            if self.pack_images and not isinstance(item, (Document, ConvertedSource))
        ]
        image_lane = {index for index in range(len(items)) if index not in documents and index not in packed}
        contents = dict(zip(packed, self.staging.read_all([sources[index] for index in packed]), strict=True))
        digests = {index: content.sha256 for index, content in contents.items()}
        digests.update({index: document.sha256 for index, document in documents.items()})
        jobs: list[dict[str, Any] | None] = [None] * len(sources)
        by_content: dict[str, list[int]] = {}
        for index, digest in sorted(digests.items()):
            by_content.setdefault(digest, []).append(index)
        image_lane |= self.journal.run(self.recorded.reuse_and_reconnect(sources, by_content, jobs))
        known = sum(entry is not None for entry in jobs)
        firsts = [
            indices[0]
            for indices in by_content.values()
            if jobs[indices[0]] is None and indices[0] not in image_lane and indices[0] not in documents
        ]
        plans, unpackable = plan_pdfs(
            [
                PackImage(
                    self.staging.local_path(sources[index]),
                    sources[index].uri,
                    digests[index],
                    contents[index],
                )
                for index in firsts
            ],
            pdf_max_pages=self.max_pages,
            aspect_tolerance=self.aspect_tolerance,
        )
        for chunk, plan in enumerate(plans):
            for image in plan:
                assert image.sha256 is not None
                self._planned[image.sha256] = image
                for index in by_content[image.sha256]:
                    jobs[index] = queued_job(sources[index].uri, image.sha256, chunk=chunk)
        for item in unpackable:
            self.log.info("%s goes through the image lane: %s", ", ".join(item.sources), item.reason)
            image_lane.update(by_content.get(item.sha256 or "", []))
        chunk = len(plans)
        for index, document in documents.items():
            if jobs[index] is not None or by_content[document.sha256][0] != index:
                continue
            for same in by_content[document.sha256]:
                jobs[same] = queued_document(
                    sources[same].uri,
                    document.sha256,
                    chunk=chunk,
                    pages=document.pages,
                    source_format=document.source_format,
                    converted=document.converted,
                )
            chunk += 1
        self.log.info(
            "Doc2X PDF lane: %d images planned in %d PDFs of at most %d pages; %d documents queued; "
            "%d reused or reconnected; %d through the image lane",
            sum(entry is not None and is_queued(entry) and not is_document(entry) for entry in jobs),
            len(plans),
            self.max_pages,
            chunk - len(plans),
            known,
            len(image_lane),
        )
        if image_lane:
            self._through_image_lane(sorted(image_lane), sources, jobs)
        return [entry for entry in jobs if entry is not None]

    # -- the second half: submit within the bounds, try failed PDFs again ------------------------

    def advance(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Try again the images of PDFs that failed, then submit queued PDFs while the bounds allow.

        Returns the jobs (same order): with jobs in flight, or with nothing left to submit.
        """
        jobs = [dict(entry) for entry in jobs]
        for _ in range(self.settings.max_retries + 10):  # each pass submits, or moves images on
            image_lane = self.journal.run(
                retry_failed(
                    jobs, max_retries=self.settings.max_retries, recorded=self.recorded, log=self.log
                )
            )
            if image_lane:
                self._through_image_lane(image_lane, None, jobs)
            image_lane = self.journal.run(self._submit_within_bounds(jobs))
            if image_lane:
                self._through_image_lane(image_lane, None, jobs)
            if any(is_pending(entry) for entry in jobs) or not _more_to_do(jobs):
                break
        return jobs

    async def _submit_within_bounds(self, jobs: list[dict[str, Any]]) -> list[int]:
        """Pack and submit the next queued PDFs while the PDFs and pages in flight allow; return indices for the image lane."""
        in_flight: dict[str, int] = {}
        for entry in jobs:
            if is_pdf(entry) and is_pending(entry):
                in_flight[entry["uid"]] = int(entry.get("pages") or 1)
        files, pages = len(in_flight), sum(in_flight.values())
        chunks: dict[int, list[int]] = {}
        for index, entry in enumerate(jobs):
            if is_queued(entry):
                chunks.setdefault(int(entry["chunk"]), []).append(index)
        chosen: list[list[int]] = []
        for chunk in sorted(chunks):
            indices = chunks[chunk]
            head = jobs[indices[0]]
            size = (
                int(head["pages"]) if is_document(head) else len({jobs[index]["sha256"] for index in indices})
            )
            if files + 1 > self.max_files or pages + size > self.max_pages_in_flight:
                break
            chosen.append(indices)
            files, pages = files + 1, pages + size
        if not chosen:
            return []
        # The records of the PDFs that leave side by side are written together before their PUTs.
        self.journal.pdfs.start_group = len(chosen)
        image_lane: list[int] = []
        submissions: list[asyncio.Task[None]] = []
        stop: BaseException | None = None
        try:
            for indices in chosen:
                if is_document(jobs[indices[0]]):
                    if self.intake is None:
                        raise RuntimeError("a document reached the PDF lane without the task's intake")
                    submissions.append(
                        asyncio.ensure_future(self.sender.document(jobs, indices, self.intake))
                    )
                    continue
                packed = await asyncio.to_thread(self._pack, jobs, indices)
                for item in packed.unpackable:
                    self.log.info("%s goes through the image lane: %s", ", ".join(item.sources), item.reason)
                    image_lane.extend(index for index in indices if jobs[index]["sha256"] == item.sha256)
                for pdf in packed.pdfs:
                    submissions.append(asyncio.ensure_future(self.sender.packed(jobs, indices, pdf)))
                if not packed.pdfs:
                    packed.cleanup()
            outcomes = await asyncio.gather(*submissions, return_exceptions=True)
        finally:
            for task in submissions:
                if not task.done():
                    task.cancel()
        for outcome in outcomes:
            if isinstance(outcome, (Doc2XAuthError, Doc2XQuotaError)):
                stop = stop or outcome
            elif isinstance(outcome, BaseException):
                raise outcome
        if stop is not None:
            raise stop  # the PDFs already taken are recorded: a new try reconnects to them
        return image_lane

    def _pack(self, jobs: list[dict[str, Any]], indices: list[int]) -> Any:
        """Pack one planned PDF's images, each content once (blocking: run it in a thread)."""
        images: dict[str, PackImage] = {}
        for index in indices:
            entry = jobs[index]
            if entry["sha256"] not in images:
                path = self.staging.known_path(entry["source"])
                if path is None:
                    path = self.staging.local_path(self.images_source(entry["source"]))
                planned = self._planned.get(entry["sha256"])
                content = planned.content if planned is not None and planned.path == path else None
                images[entry["sha256"]] = PackImage(path, entry["source"], entry["sha256"], content)
        return self.staging.pack(list(images.values()))

    def images_source(self, uri: str) -> ImageSource:
        """The image a job names, as the image lane reads it (the operator's schemes allowed)."""
        return ImageSource.of(uri, allow_schemes=self.allow_schemes)

    # -- the image lane ------------------------------------------------------------------------------

    def _through_image_lane(
        self, indices: list[int], sources: Sequence[ImageSource] | None, jobs: list[Any]
    ) -> None:
        """Submit these images through the image lane (paced to the key's window); their jobs become its jobs."""
        if sources is not None:
            chosen = [sources[index] for index in indices]
        else:
            chosen = [self.images_source(jobs[index]["source"]) for index in indices]
        self.log.info("Doc2X: %d images go through the image lane", len(chosen))
        for index, entry in zip(indices, self.images.submit(chosen), strict=True):
            jobs[index] = entry


def _more_to_do(jobs: list[dict[str, Any]]) -> bool:
    return any(is_queued(entry) or retry_plan(entry) is not None for entry in jobs)


async def retry_failed(
    jobs: list[dict[str, Any]], *, max_retries: int, recorded: PdfReconnection, log: Any
) -> list[int]:
    """Queue again the images of failed PDFs (or send them to the image lane); return the latter's indices.

    The retry policy of the lane, apart from its bookkeeping: a PDF failed for a reason that is not
    its own is submitted again as it was, at most ``max_retries`` times; any other failure packs
    its images into PDFs of a quarter of the pages, down to the image lane.
    """
    failed: dict[tuple[str, str], list[int]] = {}
    for index, entry in enumerate(jobs):
        if retry_plan(entry) is not None:
            # One PDF: its uid, or (its upload failed before Doc2X named it) its planned chunk.
            failed.setdefault((str(entry.get("uid") or ""), str(entry.get("chunk", ""))), []).append(index)
    next_chunk = _chunk_floor(jobs)
    image_lane: list[int] = []
    for indices in failed.values():
        head = jobs[indices[0]]
        plan = retry_plan(head)
        round_ = int(head.get("round") or 0) + 1
        pages = int(head.get("pages") or len(indices))
        if plan == RETRY_SAME:
            size = pages
            to_image_lane = round_ > max_retries
            refused = issubclass(protocol.error_class_for(head.get("code")), Doc2XRateLimitError)
            if refused and isinstance(head.get("uploaded_at"), (int, float)):
                # Taken, then refused for the key's limits, unbilled: sent again, it books them again.
                await recorded.spending.unbilled(
                    pages, what=head.get("uid") or "a PDF", sent_at=head["uploaded_at"]
                )
        else:
            size = pages // SPLIT_BY
            to_image_lane = size < IMAGE_LANE_BELOW
        count = len({jobs[index]["sha256"] for index in indices})
        where = "through the image lane" if to_image_lane else f"in PDFs of at most {size} pages"
        log.warning(
            "Doc2X PDF %s failed (code %s): its %d images are tried again %s; they may be billed again "
            "(whether Doc2X bills a failed PDF is not documented)",
            head.get("uid") or "(not uploaded)",
            head.get("code"),
            count,
            where,
        )
        if head.get("uid") and recorded.journal.keeps:
            await recorded.mark_fallback(head["uid"], "image" if to_image_lane else "pdf")
        if to_image_lane:
            image_lane.extend(indices)
            continue
        order: dict[str, int] = {}
        for index in sorted(indices, key=lambda i: (jobs[i].get("page_idx") or 0, i)):
            order.setdefault(jobs[index]["sha256"], len(order))
        for index in indices:
            entry = jobs[index]
            chunk = next_chunk + order[entry["sha256"]] // max(1, size)
            jobs[index] = queued_job(entry["source"], entry["sha256"], chunk=chunk, round_=round_)
        next_chunk += (len(order) + max(1, size) - 1) // max(1, size)
    return image_lane


def _chunk_floor(jobs: list[dict[str, Any]]) -> int:
    return 1 + max(
        (int(entry.get("chunk", -1)) for entry in jobs if entry.get("chunk") is not None), default=-1
    )
