"""``Doc2XImageParseOperator``: images in, Markdown out, no worker held and no image paid twice.

The worker checks every image, submits them (paced to the key's limit by the hook), records each
uid in the task state store, then defers to :class:`Doc2XImageParseTrigger` and is freed. When the
trigger reports, the task resumes, fetches the results and returns one record per image in input
order. A new try of the task (crash, lost triggerer, a clear within the 24 h result lifetime)
reconnects to the recorded uids instead of uploading again.

``method="pdf"`` (the bulk lane, :mod:`airflow_provider_doc2x.pdf_lane.lane`) packs the images into
multi-page PDFs for Doc2X's PDF API: a few PDFs in flight at once, the task deferring until half of
them are done, then submitting the next ones (and trying again the images of a PDF that failed),
until every image is parsed or named in the error.

What ``image_path`` may name, known by content, never by name
(:mod:`airflow_provider_doc2x.documents.intake`): JPEG and PNG pages; WebP, BMP, GIF, one-page TIFF
and HEIC (converted losslessly to PNG); and documents, which go through Doc2X's PDF API whatever the
``method`` and give one record each, their pages numbered as in the source: PDFs (as they are),
multi-page TIFFs and scans over 7 MB (packed losslessly into a PDF).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.documents.intake import Document, Intake
from airflow_provider_doc2x.events import (
    EVENT_FAILED,
    EVENT_PROGRESS,
    EVENT_SUCCESS,
    STORED,
    is_pdf,
    retry_plan,
)
from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.failures import check_allowed_failures, report, split_outcomes
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.image_lane.uploads import ImageUploads
from airflow_provider_doc2x.journal import STATE_KEY_PREFIX
from airflow_provider_doc2x.pacing import daily_budget_for
from airflow_provider_doc2x.pdf.packing import DEFAULT_PDF_MAX_PAGES, MAX_PDF_PAGES
from airflow_provider_doc2x.pdf.submission import DEFAULT_PDF_WAIT
from airflow_provider_doc2x.pdf_lane.lane import PdfLane
from airflow_provider_doc2x.plan import planned
from airflow_provider_doc2x.records import (
    store_finished,
)
from airflow_provider_doc2x.spending import Spending
from airflow_provider_doc2x.storage.manifest import Manifest
from airflow_provider_doc2x.storage.objects import storage_path
from airflow_provider_doc2x.storage.results import ResultStore
from airflow_provider_doc2x.storage.sources import resolve_images
from airflow_provider_doc2x.task_waits import TaskWaits
from airflow_provider_doc2x.usage import Usage, usage_run_facets
from airflow_provider_doc2x.wait_state import WaitImages, check_task_size

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["STATE_KEY_PREFIX", "Doc2XImageParseOperator"]
#: How the operator parses: submit and wait (deferrable or not), Doc2X's synchronous endpoint, or
#: images packed into PDFs for the PDF API (the bulk lane).
Method = Literal["async", "sync", "pdf"]
#: A file name that means itself in any URI (no dot first, nothing a URI or a path reads apart).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
#: An absolute folder of such names: ``/a/b``, ``file:///a/b``, ``s3://bucket/a`` (not ``file://host``).
_PLAIN_FOLDER = re.compile(
    r"(?:file://|(?!file:)[a-z][a-z0-9+.-]*://(?:[A-Za-z0-9_.-]+@)?[A-Za-z0-9_-][A-Za-z0-9_.-]*)?"
    r"(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)+"
)
#: Seconds a try (image lanes) or each wave of PDFs (PDF lane) may wait by default.
DEFAULT_TIMEOUT = 600.0


class Doc2XImageParseOperator(BaseOperator):
    """Parse document images into Markdown with Doc2X.

    :param image_path: one local path or ``ObjectStoragePath`` URI, or a list of them (templated).
    :param doc2x_conn_id: the ``doc2x`` connection (templated).
    :param output_path: a local directory or ``ObjectStoragePath`` URI (templated) to write each
        image's Markdown, figures and sidecar into (see :mod:`airflow_provider_doc2x.storage.results`); XCom
        then holds their paths. None keeps the Markdown itself in XCom.
    :param overwrite: with ``output_path``, parse an image again even if its content already has a
        complete result there (by default that result is reused and nothing is submitted).
    :param incremental: with ``output_path``, keep a manifest there of each image's storage
        fingerprint (size plus ETag, generation or modification time; see
        :mod:`airflow_provider_doc2x.storage.manifest`): an image unchanged since it was parsed is not read
        at all, and its record comes from the manifest. New and changed images are read as usual.
    :param method: ``"async"`` (submit, then wait without a worker when deferrable), ``"sync"``
        (Doc2X's synchronous endpoint, one image at a time, in the worker), or ``"pdf"`` (the bulk
        lane: images of one aspect ratio packed losslessly into multi-page PDFs for Doc2X's PDF
        API, which is not bound by the image API's 30 images per 30 s; see
        :mod:`airflow_provider_doc2x.pdf_lane.lane`). The records are the same; the PDF lane's also
        carry the image's ``page_idx`` in its PDF (whose uid is the record's ``uid``).
    :param deferrable: wait in the triggerer instead of the worker.
    :param poll_interval: seconds between status rounds.
    :param timeout: seconds to wait for all jobs of one try before failing with the uids still
        processing (the PDF lane: for the PDFs in flight, each time it waits). Default: 600, or
        1800 for the PDF lane (Doc2X's own limit is 15 minutes of parsing per PDF).
    :param max_concurrent_polls: status calls in flight at once.
    :param max_concurrent_uploads: uploads this task keeps in flight at once, within the key's
        window (slow links need several); None takes the connection's ``max_concurrent_uploads``.
    :param allow_schemes: URL schemes to read images from beyond local paths and object storage,
        e.g. ``["https"]``. Refused by default: ``image_path`` may come from a run's params, and a
        fetch-anything scheme would let whoever triggers a run make the worker call any address.
    :param pdf_model: the PDF lane's model: None (the service's default, ``"v2"``), ``"v2"`` or
        ``"v3-2026"``. Only with ``method="pdf"``: the other methods' results (their documents'
        too) are ``"v2"``'s, as the image API's are.
    :param pdf_max_pages: the PDF lane's most pages per PDF (1-1000; also bounded by the
        connection's ``pdf_max_pages_in_flight``). A PDF that fails as a whole costs at most this
        many pages of work again.
    :param large_images: send a JPEG or PNG over Doc2X's 7 MB image limit (or a raster whose PNG
        is) through the PDF API as a one-page PDF, losslessly; False refuses it, named, before
        anything is sent.
    :param allowed_failures: images that may fail with the task still succeeding: a count, or a
        fraction of the task's images (0.01 for 1%). The default, 0, fails the task on any. The
        failed ones are named in the log, in XCom (key ``doc2x_failures``) and under
        ``output_path``'s ``_failures/`` (:mod:`~airflow_provider_doc2x.failures`); the next run
        sends them again.
    :param max_pages: the most pages one try of this task may bill (None: no cap). What a run would bill,
        after the cache and the manifest, is counted before anything is sent
        (:mod:`~airflow_provider_doc2x.plan`): over the cap, the task fails without Airflow retries
        and nothing is sent. Each upload also books its pages against it, so that PDFs tried again
        or uploads sent again stay within it too.
    :param dry_run: count what a run would send and bill, and return that plan (XCom), sending
        nothing: new, cached and manifest-known sources and their pages.
    """

    template_fields: Sequence[str] = ("image_path", "output_path", "doc2x_conn_id")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        image_path: str | Sequence[str],
        doc2x_conn_id: str = Doc2XHook.default_conn_name,
        output_path: str | None = None,
        method: Method = "async",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 2.0,
        timeout: float | None = None,
        max_concurrent_polls: int = 8,
        max_concurrent_uploads: int | None = None,
        overwrite: bool = False,
        allow_schemes: Sequence[str] = (),
        incremental: bool = False,
        pdf_model: str | None = None,
        pdf_max_pages: int = DEFAULT_PDF_MAX_PAGES,
        large_images: bool = True,
        allowed_failures: float = 0,
        max_pages: int | None = None,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        """Check the arguments (nothing is read or called at parse time)."""
        super().__init__(**kwargs)
        check_arguments(
            method=method,
            pdf_model=pdf_model,
            pdf_max_pages=pdf_max_pages,
            max_concurrent_uploads=max_concurrent_uploads,
            incremental=incremental,
            output_path=output_path,
            max_pages=max_pages,
        )
        check_allowed_failures(allowed_failures)
        self.image_path = image_path
        self.doc2x_conn_id = doc2x_conn_id
        self.output_path = output_path
        self.method = method
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout = float(
            timeout if timeout is not None else DEFAULT_PDF_WAIT if method == "pdf" else DEFAULT_TIMEOUT
        )
        self.max_concurrent_polls = max_concurrent_polls
        self.max_concurrent_uploads = max_concurrent_uploads
        self.overwrite = overwrite
        self.allow_schemes = tuple(allow_schemes)
        self.incremental = incremental
        self.pdf_model = pdf_model
        self.pdf_max_pages = pdf_max_pages
        self.large_images = large_images
        self.allowed_failures = allowed_failures
        self.max_pages = max_pages
        self.plan_only = dry_run  # BaseOperator has a dry_run() of its own
        self._outcomes: list[dict[str, Any]] = []  # lineage: every image's record or failure,
        self._taken: list[dict[str, Any]] = []  # and every image the task took on (its job)
        self._spending: Spending | None = None
        self._wait_images: WaitImages | None = None

    @cached_property
    def hook(self) -> Doc2XHook:
        """The hook, built at run time (once ``doc2x_conn_id`` is rendered), never at parse time."""
        return Doc2XHook(doc2x_conn_id=self.doc2x_conn_id)

    @cached_property
    def results(self) -> ResultStore | None:
        """Where results go: built at run time, once ``output_path`` is rendered."""
        if not self.output_path:
            return None
        return ResultStore(self.output_path, model=self.model, overwrite=self.overwrite)

    @property
    def model(self) -> str:
        """The Doc2X model that makes this task's results (a stored result of another is not reused)."""
        return (self.pdf_model if self.method == "pdf" else None) or protocol.DEFAULT_MODEL

    @property
    def lane(self) -> str:
        """The lane the task's images take (its documents take the PDF API's whatever the method)."""
        return "pdf" if self.method == "pdf" else "image"

    @cached_property
    def manifest(self) -> Manifest | None:
        """The manifest under ``output_path`` when ``incremental``: built at run time, like the results."""
        if not self.incremental or self.results is None:
            return None
        return Manifest(self.results, deferrable=self.deferrable)

    def execute(self, context: Context) -> Any:
        """Check every source, submit (or reuse) each once, then wait: deferred, or in the worker.

        Documents (PDFs, multi-page TIFFs, scans over 7 MB) take the PDF API whatever the ``method``:
        the task then runs the PDF lane's loop, its images in the image lane unless ``method="pdf"``.
        """
        self._spending = self._spending_of(None)
        self._wait_images = WaitImages.for_context(context)
        with self._spending.reporting(context=context, log=self.log, model=self.model, lane=self.lane):
            return self._submit_and_wait(context)

    def _submit_and_wait(self, context: Context) -> Any:
        sources = resolve_images(self.image_path, allow_schemes=self.allow_schemes)
        self._taken = [{"source": source.uri} for source in sources]
        check_task_size(len(sources) if self.deferrable and self.method != "sync" else 0)  # its trigger's
        split = self.manifest.partition(sources) if self.manifest else None  # unchanged: never opened
        to_read = split.to_read if split else sources
        with self._intake() as intake:
            items = intake.check_all(to_read, log=self.log)
            plan = planned(
                items, split, self.results, max_pages=self.max_pages, dry_run=self.plan_only, log=self.log
            )
            if plan is not None:
                return plan  # a dry run: nothing sent, nothing recorded
            uploads = self._uploads(context)
            if self.method == "sync":
                outcomes = self._parse_in_worker(uploads, intake, items)
                return self._finish(context, split.records(outcomes) if split else outcomes)
            if self.method == "pdf" or any(isinstance(item, Document) for item in items):
                with self._pdf_lane(uploads, intake) as lane:
                    jobs = lane.prepare(items)
                    return self._finish(
                        context,
                        self._waits().pdf_records(lane, lane.advance(split.jobs(jobs) if split else jobs)),
                    )
            images = [item for item in items if not isinstance(item, Document)]
            jobs = split.jobs(uploads.submit(images)) if split else uploads.submit(images)
        known: dict[str, dict[str, Any]] = {}
        waits = self._waits()
        return self._finish(context, waits.records_of(waits.wait(jobs, known), known))

    def _parse_in_worker(self, uploads: ImageUploads, intake: Intake, items: list) -> list[dict[str, Any]]:
        """``method="sync"``: images by the synchronous endpoint, then documents by the PDF API, waited for here.

        One record (or the job of one that did not end parsed) per source, in input order.
        """
        documents = [index for index, item in enumerate(items) if isinstance(item, Document)]
        images = [index for index in range(len(items)) if index not in documents]
        outcomes = dict(zip(images, uploads.parse([items[index] for index in images]), strict=True))
        if documents:
            with self._pdf_lane(uploads, intake) as lane:
                jobs = lane.advance(lane.prepare([items[index] for index in documents]))
                outcomes.update(
                    zip(documents, self._waits().pdf_records(lane, jobs, defer=False), strict=True)
                )
        return [outcomes[index] for index in range(len(items))]

    def _intake(self) -> Intake:
        """The check of every source, within the connection's limits of a document."""
        return Intake.for_settings(
            self.hook.settings, large_images=self.large_images, allow_schemes=self.allow_schemes
        )

    def _pdf_lane(self, uploads: ImageUploads, intake: Intake) -> PdfLane:
        return PdfLane(
            self.hook,
            images=uploads,
            journal=uploads.journal,
            results=self.results,
            log=self.log,
            model=self.pdf_model if self.method == "pdf" else None,
            pdf_max_pages=self.pdf_max_pages,
            allow_schemes=self.allow_schemes,
            intake=intake,
            pack_images=self.method == "pdf",
        )

    def _waits(self) -> TaskWaits:
        """How this execution waits for its jobs: deferred (resuming in :meth:`execute_complete`), or here."""
        return TaskWaits(
            self.hook,
            results=self.results,
            log=self.log,
            defer=self.defer if self.deferrable else None,
            trigger_kwargs={
                "doc2x_conn_id": self.doc2x_conn_id,
                "poll_interval": self.poll_interval,
                "max_concurrent_polls": self.max_concurrent_polls,
            },
            timeout=self.timeout,
            spending=self._spending,
            images=self._wait_images,
        )

    def _spending_of(self, carried: Any) -> Spending:
        """This execution's share of the task's pages (its budgets) and usage, after what ``carried`` says."""
        daily, most = daily_budget_for(self.hook.settings), self.max_pages
        return Spending(max_pages=most, daily=daily, carried=carried, longest_deferral=self.timeout + 60)

    def _uploads(self, context: Context) -> ImageUploads:
        return ImageUploads.for_task(
            self.hook,
            context,
            results=self.results,
            log=self.log,
            max_concurrent=self.max_concurrent_uploads,
            spending=self._spending,
        )

    def _finish(self, context: Context, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The usage said; the records; failed images named if ``allowed_failures`` allows them, else one error naming all."""
        self._outcomes = outcomes
        if self._spending is not None:
            self._spending.report(outcomes, context=context, log=self.log, model=self.model, lane=self.lane)
        records, failures = split_outcomes(outcomes, self.allowed_failures)
        if failures:
            report(failures, len(outcomes), context=context, results=self.results, log=self.log)
        if self.manifest is not None:
            self.manifest.record(records)  # a failed image is not recorded: the next run sends it again
        self.log.info("Doc2X parsed %d images", len(records))
        return records

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Resume after the trigger: fetch each finished result; fail naming every image that did not end well.

        The PDF lane first stores the results of the PDFs that finished (with ``output_path``: a
        task that runs longer than Doc2X keeps results, 24 hours, must not find its first ones
        expired at its end), then submits what remains (queued PDFs, the images of PDFs that
        failed) and defers again while PDFs are in flight. The task's usage comes back in the event.
        """
        self._spending = self._spending_of(event.get("carried") if isinstance(event, dict) else None)
        self._wait_images = WaitImages.for_context(context)
        reporting = self._spending.reporting(context=context, log=self.log, model=self.model, lane=self.lane)
        with reporting, self._waits().forgotten_on_failure():
            return self._resume(context, event)

    def _resume(self, context: Context, event: Any) -> list[dict[str, Any]]:
        event = self._waits().resumed(event)  # checked, each job's image back from the task's XCom
        self._taken = event["jobs"]
        if self.manifest is not None:
            self.manifest.resume(event)  # results it knows are not looked up again
        if self.method == "pdf" or any(is_pdf(entry) for entry in event["jobs"]):
            jobs = event["jobs"]
            if event["status"] == EVENT_PROGRESS or (
                event["status"] in (EVENT_SUCCESS, EVENT_FAILED) and any(retry_plan(entry) for entry in jobs)
            ):
                jobs = store_finished(self.hook, jobs, results=self.results)
                with self._intake() as intake, self._pdf_lane(self._uploads(context), intake) as lane:
                    return self._finish(context, self._waits().pdf_records(lane, lane.advance(jobs)))
        return self._finish(context, self._waits().records_of(event))

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Each image taken on and each file written as datasets, and the usage; OpenLineage asks on failure too."""
        return operator_lineage(self)


def check_arguments(
    *,
    method: str,
    pdf_model: str | None,
    pdf_max_pages: int,
    max_concurrent_uploads: int | None,
    incremental: bool,
    output_path: str | None,
    max_pages: int | None = None,
) -> None:
    """Refuse, when the DAG is parsed, arguments that cannot work together (a ``ValueError`` saying why)."""
    if method not in ("async", "sync", "pdf"):
        raise ValueError(f"method must be 'async', 'sync' or 'pdf', got {method!r}")
    if pdf_model is not None and pdf_model not in protocol.PDF_MODELS:
        raise ValueError(f"pdf_model must be None or one of {sorted(protocol.PDF_MODELS)}, got {pdf_model!r}")
    if pdf_model not in (None, protocol.DEFAULT_MODEL) and method != "pdf":
        # One model makes every result a task stores: the image API's is v2.
        raise ValueError(
            f"pdf_model={pdf_model!r} parses through the PDF lane only (method='pdf'); with "
            f"method={method!r} every result, documents included, is made by "
            f"{protocol.DEFAULT_MODEL!r}: set method='pdf' to parse with {pdf_model!r}"
        )
    if not 1 <= pdf_max_pages <= MAX_PDF_PAGES:
        raise ValueError(f"pdf_max_pages must be 1 to {MAX_PDF_PAGES}, got {pdf_max_pages}")
    if max_concurrent_uploads is not None and max_concurrent_uploads < 1:
        raise ValueError(f"max_concurrent_uploads must be at least 1, got {max_concurrent_uploads}")
    if incremental and not output_path:
        raise ValueError("incremental=True needs an output_path: the manifest is kept there")
    if max_pages is not None and (
        isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 0
    ):
        raise ValueError(f"max_pages must be None or a whole number of pages (0 or more), got {max_pages!r}")


def operator_lineage(op: Doc2XImageParseOperator) -> Any:
    """The operator's :func:`task_lineage`, from what it took on, what became of it, and what it wrote.

    A task that failed before its outcomes (a later resume of the PDF lane) names the results an
    earlier process of it stored too: each is read back (its sidecar), as its record would have been.
    """
    usage = op._spending.usage if op._spending is not None else Usage()
    outcomes, written = op._outcomes, op.results.written_files if op.results is not None else []
    if not outcomes and op.results is not None:
        outcomes = [
            record
            for job in op._taken
            if job.get(STORED)
            for record in [_stored_record(op.results, job)]
            if record
        ]
    sources = [job["source"] for job in op._taken if isinstance(job.get("source"), str)]
    return task_lineage(outcomes, usage, model=op.model, lane=op.lane, sources=sources, written=written)


def _stored_record(results: ResultStore, job: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a job whose result an earlier process stored, read back; None if it cannot be."""
    try:
        return results.cached(job["sha256"], job["source"])
    except (Doc2XError, OSError, KeyError, TypeError):
        return None  # lineage names what it can; the task's own error is what the user sees


def task_lineage(
    outcomes: list[dict[str, Any]],
    usage: Usage,
    *,
    model: str,
    lane: str,
    sources: Iterable[str] = (),
    written: Iterable[str] = (),
) -> Any:
    """The task's OpenLineage: its images in; out, its results and every file it wrote; its usage and parser.

    ``sources`` are the images the task took on and ``outcomes`` their records or failures (a
    failed image was read and sent too; a task that failed before its outcomes has its sources);
    ``written`` the files this process wrote (results, their figures and raw payloads, the list of
    failures), beside those the records name (written by an earlier try or process, or found in
    the cache). A result's sidecar and the manifest's objects are the provider's bookkeeping, as
    the task state store is, not datasets. This is the task's whole lineage: the provider reads and
    writes without Airflow's hook-level collector (see
    :func:`~airflow_provider_doc2x.storage.objects.open_object`), which OpenLineage reads only for
    an operator that names no datasets.
    """
    from airflow.providers.openlineage.extractors import OperatorLineage

    named = [
        path
        for outcome in outcomes
        if outcome.get("status") is None and "markdown_path" in outcome
        for path in (outcome["markdown_path"], *outcome.get("figure_paths", ()))
        if isinstance(path, str)
    ]
    read = [*sources, *(outcome["source"] for outcome in outcomes if isinstance(outcome.get("source"), str))]
    return OperatorLineage(
        inputs=lineage_datasets(dict.fromkeys(read)),
        outputs=lineage_datasets(dict.fromkeys([*named, *written])),
        run_facets=usage_run_facets(usage, model=model, lane=lane),
    )


def lineage_datasets(uris: Iterable[str]) -> list[Any]:
    """:func:`lineage_dataset` of each URI, one ``ObjectStoragePath`` per folder rather than per file.

    Why: making one costs about 50 microseconds, and a task's lineage names thousands of files,
    many in one folder (the images of a prefix) or in a few (a result's Markdown and figures). A
    URI made only of plain names (:data:`_PLAIN_FOLDER`, nothing a path would tidy or a URI read
    apart) is its folder's dataset plus ``/name``; any other is made whole.
    """
    folders: dict[str, Any] = {}
    datasets = []
    for uri in uris:
        folder, _, name = uri.rpartition("/")
        if not (_PLAIN_NAME.fullmatch(name) and _PLAIN_FOLDER.fullmatch(folder)):
            datasets.append(lineage_dataset(uri))
            continue
        if folder not in folders:
            folders[folder] = lineage_dataset(folder)
        base = folders[folder]
        datasets.append(
            type(base)(namespace=base.namespace, name=f"{base.name}/{name}" if base.name else name)
        )
    return datasets


def lineage_dataset(uri: str) -> Any:
    """An OpenLineage dataset for a path or URI: namespace ``file`` or ``scheme://bucket``, name the key.

    Both from the path on the filesystem (what is read and written): the connection id of
    ``s3://conn@bucket/key`` is in neither, and a ``#`` or a ``?`` in a key stays in its name.
    """
    from airflow.providers.common.compat.openlineage.facet import Dataset

    path = storage_path(uri)
    if path.protocol in ("file", "local", ""):
        return Dataset(namespace="file", name=path.path)
    bucket, _, key = path.path.lstrip("/").partition("/")
    return Dataset(namespace=f"{path.protocol}://{bucket}", name=key)
