"""
``Doc2XImageParseOperator``: images in, Markdown out, no worker held and no image paid twice.

The worker checks every image, submits them (paced to the key's limit by the hook), records each
uid in the task state store, then defers to :class:`Doc2XImageParseTrigger` and is freed. When the
trigger reports, the task resumes, fetches the results and returns one record per image in input
order. A new try of the task (crash, lost triggerer, a clear within the 24 h result lifetime)
reconnects to the recorded uids instead of uploading again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_doc2x import transport
from airflow_provider_doc2x.events import is_finished
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.manifest import Manifest
from airflow_provider_doc2x.protocol import Doc2XJobStatus
from airflow_provider_doc2x.records import batch_failure, records_from_event, store_or_record
from airflow_provider_doc2x.results import ResultStore
from airflow_provider_doc2x.sources import check_all, resolve_images
from airflow_provider_doc2x.storage import storage_path
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from airflow_provider_doc2x.uploads import STATE_KEY_PREFIX, ImageUploads

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["STATE_KEY_PREFIX", "Doc2XImageParseOperator"]
#: How the operator parses: submit and wait (deferrable or not), or Doc2X's synchronous endpoint.
Method = Literal["async", "sync"]


class Doc2XImageParseOperator(BaseOperator):
    """
    Parse document images into Markdown with Doc2X.

    :param image_path: one local path or ``ObjectStoragePath`` URI, or a list of them (templated).
    :param doc2x_conn_id: the ``doc2x`` connection (templated).
    :param output_path: a local directory or ``ObjectStoragePath`` URI (templated) to write each
        image's Markdown, figures and sidecar into (see :mod:`airflow_provider_doc2x.results`); XCom
        then holds their paths. None keeps the Markdown itself in XCom.
    :param overwrite: with ``output_path``, parse an image again even if its content already has a
        complete result there (by default that result is reused and nothing is submitted).
    :param incremental: with ``output_path``, keep a manifest there of each image's storage
        fingerprint (size plus ETag, generation or modification time; see
        :mod:`airflow_provider_doc2x.manifest`): an image unchanged since it was parsed is not read
        at all, and its record comes from the manifest. New and changed images are read as usual.
    :param method: ``"async"`` (submit, then wait without a worker when deferrable) or ``"sync"``
        (Doc2X's synchronous endpoint, one image at a time, in the worker).
    :param deferrable: wait in the triggerer instead of the worker.
    :param poll_interval: seconds between status rounds.
    :param timeout: seconds to wait for all jobs of one try before failing with the uids still processing.
    :param max_concurrent_polls: status calls in flight at once.
    :param allow_schemes: URL schemes to read images from beyond local paths and object storage,
        e.g. ``["https"]``. Refused by default: ``image_path`` may come from a run's params, and a
        fetch-anything scheme would let whoever triggers a run make the worker call any address.
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
        timeout: float = 600,
        max_concurrent_polls: int = 8,
        overwrite: bool = False,
        allow_schemes: Sequence[str] = (),
        incremental: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if method not in ("async", "sync"):
            raise ValueError(f"method must be 'async' or 'sync', got {method!r}")
        if incremental and not output_path:
            raise ValueError("incremental=True needs an output_path: the manifest is kept there")
        self.image_path = image_path
        self.doc2x_conn_id = doc2x_conn_id
        self.output_path = output_path
        self.method = method
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_concurrent_polls = max_concurrent_polls
        self.overwrite = overwrite
        self.allow_schemes = tuple(allow_schemes)
        self.incremental = incremental
        self._records: list[dict[str, Any]] = []

    @cached_property
    def hook(self) -> Doc2XHook:
        """The hook, built at run time (once ``doc2x_conn_id`` is rendered), never at parse time."""
        return Doc2XHook(doc2x_conn_id=self.doc2x_conn_id)

    @cached_property
    def results(self) -> ResultStore | None:
        """Where results go: built at run time, once ``output_path`` is rendered."""
        return ResultStore(self.output_path) if self.output_path else None

    @cached_property
    def manifest(self) -> Manifest | None:
        """The manifest under ``output_path`` when ``incremental``: built at run time, like the results."""
        if not self.incremental or self.results is None:
            return None
        return Manifest(self.results, overwrite=self.overwrite, deferrable=self.deferrable)

    def execute(self, context: Context) -> list[dict[str, Any]]:
        """Check every image, submit (or reuse) each once, then wait: deferred, or in the worker."""
        sources = resolve_images(self.image_path, allow_schemes=self.allow_schemes)
        split = self.manifest.partition(sources) if self.manifest else None  # unchanged: never opened
        to_read = split.to_read if split else sources
        check_all(to_read)
        uploads = self._uploads(context)
        if self.method == "sync":
            outcomes = uploads.parse(to_read)
            return self._finish(self._records_or_failure(split.records(outcomes) if split else outcomes))
        jobs = split.jobs(uploads.submit(to_read)) if split else uploads.submit(to_read)
        trigger = Doc2XImageParseTrigger(
            doc2x_conn_id=self.doc2x_conn_id,
            jobs=jobs,
            poll_interval=self.poll_interval,
            deadline=time.time() + self.timeout,
            max_concurrent_polls=self.max_concurrent_polls,
        )
        if self.deferrable and not all(is_finished(job) for job in jobs):
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                # Airflow's own guard, after the trigger's deadline, in case the triggerer is lost.
                timeout=timedelta(seconds=self.timeout + 60),
            )
        # The worker waits with the trigger's own loop, on the transport's loop (the hook's settings
        # were read in this thread already), and keeps the results its polls bring.
        known: dict[str, dict[str, Any]] = {}

        async def keep(job: dict[str, Any], status: Doc2XJobStatus) -> None:
            assert status.result is not None
            known[job["uid"]] = await asyncio.to_thread(
                store_or_record, self.results, job["source"], job.get("sha256"), status.result
            )

        event = transport.run_sync(trigger.wait(self.hook, on_result=keep))
        return self._finish(
            records_from_event(self.hook, event, results=self.results, overwrite=self.overwrite, known=known)
        )

    def _uploads(self, context: Context) -> ImageUploads:
        store = context.get("task_state_store")
        if store is None:
            self.log.info(
                "No task state store (Airflow < 3.3): a new try of this task submits its images again"
            )
        ti = context.get("ti")
        return ImageUploads(
            self.hook,
            store=store,
            results=self.results,
            overwrite=self.overwrite,
            # A first try finds nothing recorded: one state-store read per image is saved.
            may_hold_uids=getattr(ti, "try_number", None) != 1,
            log=self.log,
        )

    @staticmethod
    def _records_or_failure(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        failures = [item for item in outcomes if item.get("status") == "failed"]
        if failures:
            raise batch_failure(failures, len(outcomes))
        return outcomes

    def _finish(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.manifest is not None:
            self.manifest.record(records)
        self.log.info("Doc2X parsed %d images", len(records))
        self._records = records
        return records

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Resume after the trigger: fetch each finished result; fail naming every image that did not end well."""
        if self.manifest is not None:
            self.manifest.resume(event)  # results it knows are not looked up again
        return self._finish(
            records_from_event(self.hook, event, results=self.results, overwrite=self.overwrite)
        )

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Each input image and each written Markdown file as datasets (OpenLineage is optional)."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        return OperatorLineage(
            inputs=[lineage_dataset(record["source"]) for record in self._records],
            outputs=[
                lineage_dataset(record["markdown_path"])
                for record in self._records
                if "markdown_path" in record
            ],
        )


def lineage_dataset(uri: str) -> Any:
    """An OpenLineage dataset for a path or URI: namespace ``file`` or ``scheme://bucket``, name the key."""
    from airflow.providers.common.compat.openlineage.facet import Dataset

    path = storage_path(uri)
    if path.protocol in ("file", "local", ""):
        return Dataset(namespace="file", name=path.path)
    return Dataset(namespace=path.namespace, name=path.key)
