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
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XJobFailedError,
    Doc2XJobNotFoundError,
    Doc2XPermanentError,
    Doc2XQuotaError,
    Doc2XSubmitUncertainError,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.results import ResultStore
from airflow_provider_doc2x.sources import ImageSource, check_all, resolve_images, sha256_of
from airflow_provider_doc2x.triggers.doc2x import EVENT_ERROR, Doc2XImageParseTrigger, validate_event

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

#: Key prefix of the uids recorded in the task state store (one key per image content).
STATE_KEY_PREFIX = "doc2x/"
#: Codes that no new try of the task can fix.
PERMANENT_CODES = frozenset(
    {
        "unauthorized",
        "parse_file_too_large",
        "parse_file_invalid",
        "parse_file_not_image",
        "parse_quota_limit",
    }
)


def result_record(source: str, result: protocol.Doc2XResult, sha256: str | None = None) -> dict[str, Any]:
    """What XCom holds for one image: JSON, small enough for the metadata database (no figures)."""
    return {
        "source": source,
        "uid": result.uid,
        "sha256": sha256,
        "pages": [page.to_dict() for page in result.pages],
        "markdown": result.markdown,
        "has_figures": result.convert_zip is not None,
    }


class Doc2XImageParseOperator(BaseOperator):
    """
    Parse document images into Markdown with Doc2X.

    :param image_path: one local path or ``ObjectStoragePath`` URI, or a list of them (templated).
    :param doc2x_conn_id: the ``doc2x`` connection.
    :param output_path: a local directory or ``ObjectStoragePath`` URI (templated) to write each
        image's Markdown, figures and sidecar into (see :mod:`airflow_provider_doc2x.results`); XCom
        then holds their paths. None keeps the Markdown itself in XCom.
    :param overwrite: with ``output_path``, parse an image again even if its content already has a
        complete result there (by default that result is reused and nothing is submitted).
    :param method: ``"async"`` (submit, then wait without a worker when deferrable) or ``"sync"``
        (Doc2X's synchronous endpoint, one image at a time, in the worker).
    :param deferrable: wait in the triggerer instead of the worker.
    :param poll_interval: seconds between status rounds.
    :param timeout: seconds to wait for all jobs of one try before failing with the uids still processing.
    :param max_concurrent_polls: status calls in flight at once.
    """

    template_fields: Sequence[str] = ("image_path", "output_path")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        image_path: str | Sequence[str],
        doc2x_conn_id: str = Doc2XHook.default_conn_name,
        output_path: str | None = None,
        method: str = "async",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 2.0,
        timeout: float = 600,
        max_concurrent_polls: int = 8,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if method not in ("async", "sync"):
            raise ValueError(f"method must be 'async' or 'sync', got {method!r}")
        self.image_path = image_path
        self.doc2x_conn_id = doc2x_conn_id
        self.output_path = output_path
        self.method = method
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_concurrent_polls = max_concurrent_polls
        self.overwrite = overwrite
        self._records: list[dict[str, Any]] = []

    @cached_property
    def hook(self) -> Doc2XHook:
        return Doc2XHook(doc2x_conn_id=self.doc2x_conn_id)

    @cached_property
    def results(self) -> ResultStore | None:
        """Where results go: built at run time, once ``output_path`` is rendered."""
        return ResultStore(self.output_path) if self.output_path else None

    def execute(self, context: Context) -> list[dict[str, Any]]:
        sources = resolve_images(self.image_path)
        check_all(sources)
        if self.method == "sync":
            return self._parse_synchronously(sources)
        jobs = self._submit_all(sources, context)
        trigger = Doc2XImageParseTrigger(
            doc2x_conn_id=self.doc2x_conn_id,
            jobs=jobs,
            poll_interval=self.poll_interval,
            deadline=time.time() + self.timeout,
            max_concurrent_polls=self.max_concurrent_polls,
        )
        if self.deferrable and any(job["status"] not in protocol.TERMINAL_STATUSES for job in jobs):
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                # Airflow's own guard, after the trigger's deadline, in case the triggerer is lost.
                timeout=timedelta(seconds=self.timeout + 60),
            )
        event = asyncio.run(self._wait_in_worker(trigger))
        return self.execute_complete(context, event)

    async def _wait_in_worker(self, trigger: Doc2XImageParseTrigger) -> dict[str, Any]:
        hook = Doc2XHook(doc2x_conn_id=self.doc2x_conn_id)
        try:
            return await trigger.wait(hook)
        finally:
            await hook.aclose()

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Resume after the trigger: fetch each finished result; fail naming every image that did not end well."""
        records = records_from_event(self.hook, event, results=self.results, overwrite=self.overwrite)
        self.log.info("Doc2X parsed %d images", len(records))
        self._records = records
        return records

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

    # -- submission ------------------------------------------------------------------------------

    def _submit_all(self, sources: list[ImageSource], context: Context) -> list[dict[str, Any]]:
        """Submit each image once: reconnect to a uid an earlier try recorded, reuse it for duplicates."""
        store = context.get("task_state_store")
        if store is None:
            self.log.info(
                "No task state store (Airflow < 3.3): a new try of this task submits its images again"
            )
        jobs: list[dict[str, Any]] = []
        by_content: dict[str, dict[str, Any]] = {}
        for number, source in enumerate(sources, start=1):
            data = source.read()
            digest = sha256_of(data)
            if digest in by_content:
                jobs.append({**by_content[digest], "source": source.uri})
                continue
            job = (
                self._cached(source, digest)
                or self._reconnect(store, source, digest)
                or self._submit(store, source, data, digest)
            )
            by_content[digest] = job
            jobs.append(job)
            if number % 10 == 0 or number == len(sources):
                self.log.info("Doc2X: %d/%d submitted", number, len(sources))
        return jobs

    def _stored(self, source: ImageSource, digest: str) -> dict[str, Any] | None:
        """The record of a complete earlier result of this content under ``output_path``, if reusable."""
        if self.results is None or self.overwrite:
            return None
        record = self.results.cached(digest)
        if record is None:
            return None
        self.log.info(
            "Cache hit: %s is already parsed in %s; not submitted", source.uri, record["markdown_path"]
        )
        return {**record, "source": source.uri}

    def _cached(self, source: ImageSource, digest: str) -> dict[str, Any] | None:
        record = self._stored(source, digest)
        if record is None:
            return None
        return {
            "uid": record["uid"],
            "source": source.uri,
            "sha256": digest,
            "status": protocol.STATUS_SUCCESS,
        }

    def _reconnect(self, store: Any, source: ImageSource, digest: str) -> dict[str, Any] | None:
        recorded = store.get(STATE_KEY_PREFIX + digest) if store is not None else None
        if not isinstance(recorded, dict):
            return None
        uid = recorded.get("uid")
        if not uid:
            if recorded.get("uncertain"):
                self.log.warning(
                    "An earlier try's upload of %s lost its answer and may have been billed; submitting again",
                    source.uri,
                )
            return None
        try:
            status = self.hook.get_job_status(uid)
        except (Doc2XJobFailedError, Doc2XJobNotFoundError) as error:
            # Failed or expired: a new upload is the only way to a result. Any other error (Doc2X
            # unreachable, say) propagates: resubmitting on a guess could pay for the image twice.
            self.log.warning(
                "Recorded Doc2X job %s for %s cannot be reused (%s); submitting again", uid, source.uri, error
            )
            return None
        self.log.info(
            "Reconnected %s to Doc2X job %s (%s), recorded by an earlier try", source.uri, uid, status.status
        )
        return {"uid": uid, "source": source.uri, "sha256": digest, "status": status.status}

    def _submit(self, store: Any, source: ImageSource, data: bytes, digest: str) -> dict[str, Any]:
        key = STATE_KEY_PREFIX + digest
        try:
            uid = self.hook.submit_image(data, source=source.uri)
        except (Doc2XAuthError, Doc2XQuotaError):
            raise  # no other image can do better: stop before uploading more
        except Doc2XSubmitUncertainError as error:
            if store is not None:
                store.set(key, {"uncertain": True, "source": source.uri, "at": time.time()})
            return _failed_job(source, digest, error)
        except Doc2XError as error:
            return _failed_job(source, digest, error)
        if store is not None:
            store.set(key, {"uid": uid, "source": source.uri, "at": time.time()})
        return {"uid": uid, "source": source.uri, "sha256": digest, "status": protocol.STATUS_PROCESSING}

    def _parse_synchronously(self, sources: list[ImageSource]) -> list[dict[str, Any]]:
        records, failures = [], []
        for source in sources:
            data = source.read()
            digest = sha256_of(data)
            stored = self._stored(source, digest)
            if stored is not None:
                records.append(stored)
                continue
            try:
                result = self.hook.parse_image(data, source=source.uri)
            except (Doc2XAuthError, Doc2XQuotaError):
                raise
            except Doc2XError as error:
                failures.append(_failed_job(source, digest, error))
                continue
            records.append(store_or_record(self.results, source.uri, digest, result))
        if failures:
            raise _batch_failure(failures, len(sources))
        self._records = records
        return records


def store_or_record(
    results: ResultStore | None, source: str, digest: str | None, result: protocol.Doc2XResult
) -> dict[str, Any]:
    """Write the result to storage and return its paths, or return it whole for XCom."""
    if results is not None and digest:
        return results.write(source, digest, result)
    return result_record(source, result, digest)


def lineage_dataset(uri: str) -> Any:
    """An OpenLineage dataset for a path or URI: namespace ``file`` or ``scheme://bucket``, name the key."""
    from airflow.providers.common.compat.openlineage.facet import Dataset

    path = ImageSource.of(uri).path
    if path.protocol in ("file", "local", ""):
        return Dataset(namespace="file", name=path.path)
    return Dataset(namespace=path.namespace, name=path.key)


def records_from_event(
    hook: Doc2XHook,
    event: dict[str, Any] | None,
    *,
    results: ResultStore | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """The records of a trigger event, in input order; raise naming every job that did not succeed."""
    event = validate_event(event)
    if event["status"] == EVENT_ERROR:
        error_class = Doc2XAuthError if event.get("code") == "unauthorized" else Doc2XError
        raise error_class(f"Waiting for Doc2X failed: {event['message']}", code=event.get("code"))
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for job in event["jobs"]:
        if job["status"] != protocol.STATUS_SUCCESS:
            failures.append(job)
            continue
        if results is not None and not overwrite and (stored := results.cached(job["sha256"])):
            records.append({**stored, "source": job["source"]})
            continue
        status = hook.get_job_status(job["uid"])
        if status.result is None:
            failures.append(
                {**job, "message": f"the job answered {status.status} when its result was fetched"}
            )
            continue
        records.append(store_or_record(results, job["source"], job.get("sha256"), status.result))
    if failures:
        raise _batch_failure(failures, len(event["jobs"]))
    return records


def _failed_job(source: ImageSource, digest: str, error: Doc2XError) -> dict[str, Any]:
    return {
        "uid": error.uid,
        "source": source.uri,
        "sha256": digest,
        "status": protocol.STATUS_FAILED,
        "code": error.code,
        "message": str(error),
    }


def _batch_failure(failures: list[dict[str, Any]], total: int) -> Doc2XError:
    """One error naming every image that did not end parsed, and why; permanent if no retry can help."""
    lines = []
    for job in failures:
        if job["status"] == protocol.STATUS_PROCESSING:
            reason = "still processing at the deadline (a new try reconnects to it)"
        else:
            reason = job.get("message") or job.get("code") or job["status"]
        lines.append(f"- {job['source']} (uid {job.get('uid') or 'none'}): {reason}")
    message = f"{len(failures)} of {total} images were not parsed:\n" + "\n".join(lines)
    permanent = all(job.get("code") in PERMANENT_CODES for job in failures)
    error_class = Doc2XPermanentError if permanent else Doc2XError
    return error_class(message)
