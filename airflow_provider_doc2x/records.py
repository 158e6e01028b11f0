"""
From a finished wait to what the user gets: one record per image, or one error naming every failure.

The operator and the sensor both end here when the trigger reports (or when the worker's own wait
does): each successful job's result is fetched and either kept whole in the record (XCom) or
written to storage with only its paths in the record; any job that did not succeed is named in one
error, raised after the others were recorded. Whether that error is permanent (no Airflow retry)
is decided by the failures' exception classes alone (:func:`airflow_provider_doc2x.exceptions.is_permanent`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import EVENT_ERROR, validate_event
from airflow_provider_doc2x.exceptions import Doc2XAuthError, Doc2XError, Doc2XPermanentError

if TYPE_CHECKING:
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.results import ResultStore

log = logging.getLogger(__name__)


def result_record(source: str, result: protocol.Doc2XResult, sha256: str | None = None) -> dict[str, Any]:
    """What XCom holds for one image kept whole: JSON, small enough for the metadata database (no figures)."""
    return {
        "source": source,
        "uid": result.uid,
        "sha256": sha256,
        "pages": [page.to_dict() for page in result.pages],
        "markdown": result.markdown,
        "has_figures": result.convert_zip is not None,
    }


def store_or_record(
    results: ResultStore | None, source: str, digest: str | None, result: protocol.Doc2XResult
) -> dict[str, Any]:
    """Write the result to storage and return its paths, or return it whole for XCom."""
    if results is not None and digest:
        return results.write(source, digest, result)
    return result_record(source, result, digest)


def records_from_event(
    hook: Doc2XHook,
    event: Any,
    *,
    results: ResultStore | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """The records of a trigger event, in input order; raise naming every job that did not succeed."""
    event = validate_event(event)
    register_key(hook)
    if event["status"] == EVENT_ERROR:
        code = event.get("code")
        error_class = Doc2XAuthError if code == "unauthorized" else Doc2XError
        raise error_class(f"Waiting for Doc2X failed: {event['message']}", code=code)
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for job in event["jobs"]:
        if job["status"] != protocol.STATUS_SUCCESS:
            failures.append(job)
            continue
        if results is not None and not overwrite and job.get("sha256"):
            stored = results.cached(job["sha256"], job["source"])
            if stored is not None:
                records.append({**stored, "source": job["source"]})
                continue
        status = hook.get_job_status(job["uid"])
        if status.result is None:
            failures.append(
                {**job, "status": status.status, "message": "the job had no result when it was fetched"}
            )
            continue
        records.append(store_or_record(results, job["source"], job.get("sha256"), status.result))
    if failures:
        raise batch_failure(failures, len(event["jobs"]))
    return records


def register_key(hook: Doc2XHook) -> None:
    """
    Load the connection, so that Airflow's secret masker knows the key before anything is logged.

    A resumed try whose jobs all failed would otherwise never read it.
    """
    try:
        hook.get_conn()
    except Doc2XError as error:
        log.warning("The Doc2X connection could not be read: %s", error)


def describe_failure(job: dict[str, Any]) -> str:
    """Why one job did not end parsed, in a line: fixed texts and codes only."""
    status = job.get("status")
    if status == protocol.STATUS_PROCESSING:
        return "still processing at the deadline (a new try reconnects to it)"
    if status not in protocol.TERMINAL_STATUSES:
        return (
            f"still {protocol.quote(status)} at the deadline (a status this provider does not know; "
            "a new try reconnects to it)"
        )
    reason = job.get("message") or "failed"
    return f"{reason} (code {job['code']})" if job.get("code") else reason


def batch_failure(failures: list[dict[str, Any]], total: int) -> Doc2XError:
    """One error naming every image that did not end parsed, and why; permanent if no retry can help."""
    lines = [
        f"- {job['source']} (uid {job.get('uid') or 'none'}): {describe_failure(job)}" for job in failures
    ]
    message = f"{len(failures)} of {total} images were not parsed:\n" + "\n".join(lines)
    permanent = all(
        job.get("status") == protocol.STATUS_FAILED and protocol.is_permanent_code(job.get("code"))
        for job in failures
    )
    return (Doc2XPermanentError if permanent else Doc2XError)(message)
