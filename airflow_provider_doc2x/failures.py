"""Partial success: a batch whose failed images stay within ``allowed_failures`` succeeds, naming each.

A task of ten thousand images with one ``parse_error`` fails after the others finished, and the
downstream load or index step does not run for the 9,999 good ones. With ``allowed_failures`` (a
count, or a fraction of the task's images) the task succeeds when no more images than that
*failed*, and says which:

- the task's log names each failure (source, uid, code, trace id);
- XCom holds the list under :data:`FAILURES_XCOM_KEY`, so that a downstream task can branch on it
  (the records the task returns keep their shape: only the parsed images);
- with ``output_path``, ``_failures/`` holds one JSON-lines file per try (an object store cannot
  append), one object per failed image.

A failed image is not recorded as parsed: the manifest does not skip it and the cache holds nothing
for it, so the next run sends it again. Only final failures count (:func:`may_be_allowed`): Doc2X
failed the job or refused the file. A job still processing or not submitted when the wait ended, a
wait that gave up, an upload whose answer was lost, a result not fetched or answered malformed
fail the task as before: a new try reconnects to those jobs instead of paying for them again,
which a run that succeeded would never do.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import Doc2XInputError, Doc2XJobFailedError
from airflow_provider_doc2x.records import batch_failure
from airflow_provider_doc2x.storage.objects import open_object, storage_call

if TYPE_CHECKING:
    from airflow_provider_doc2x.storage.results import ResultStore

#: The XCom key of the list of failed images (each: source, uid, code, message, trace_id).
FAILURES_XCOM_KEY = "doc2x_failures"
#: The folder under ``output_path`` of the failures' files.
FAILURES_FOLDER = "_failures"


def check_allowed_failures(value: Any) -> None:
    """Refuse, when the DAG is parsed, a value that is neither a count (0 or more) nor a fraction (0 to 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"allowed_failures is a count (0, 1, 2, ...) or a fraction (0.01 for 1%), not {value!r}"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"allowed_failures is a count of 0 or more, not {value}")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise ValueError(
            f"allowed_failures as a fraction is from 0.0 to less than 1.0 (0.01 for 1%), not {value}; "
            "give a whole number for a count"
        )


def allowed_count(allowed_failures: float, total: int) -> int:
    """How many failed images a batch of ``total`` may have: the count, or the fraction rounded down."""
    if isinstance(allowed_failures, float):
        return math.floor(allowed_failures * total + 1e-9)
    return int(allowed_failures)


def split_outcomes(
    outcomes: list[dict[str, Any]], allowed_failures: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records, and the failed images when they are allowed; else one error naming every image not parsed.

    Raises:
        Doc2XError: more images failed than allowed, or an image did not end (still processing,
            not submitted): the same error as without ``allowed_failures``.
    """
    failures = [outcome for outcome in outcomes if outcome.get("status") is not None]
    if not failures:
        return outcomes, []
    final = all(
        outcome["status"] == protocol.STATUS_FAILED and may_be_allowed(outcome.get("code"))
        for outcome in failures
    )
    if not final or len(failures) > allowed_count(allowed_failures, len(outcomes)):
        raise batch_failure(failures, len(outcomes))
    records = [outcome for outcome in outcomes if outcome.get("status") is None]
    return records, [failure_entry(outcome) for outcome in failures]


#: Codes of failures that leave something paid or possibly paid behind, though their class says
#: "failed" or "bad input": an export or a download of a parse that succeeded (billed), a
#: presigned url that already took a PDF (it may have landed).
_PAID_BEHIND = frozenset({"export_failed", "download_refused", "presigned_url_used"})
#: This provider's own codes of a source refused before anything of it was sent.
_NOTHING_SENT = frozenset({"source_changed"})


def may_be_allowed(code: str | None) -> bool:
    """Whether a failure with this code is final and cost nothing more than its own try.

    Allowed: Doc2X failed the job (``parse_error``, ``parse_timeout``, ...) or refused the file, or
    the provider refused the source before sending it. Never allowed, whatever the allowance: a
    lost answer to an upload (``upload_answer_lost``: Doc2X may have billed it), a result not
    fetched (``fetch_failed``, ``result_expired``: paid, a new try fetches or reconnects), an answer
    that stayed malformed (``protocol_error``), a transient, quota or key failure: a task that
    succeeded would never be tried again, and the next run would pay again for what a retry of this
    one recovers.
    """
    if code in _NOTHING_SENT:
        return True
    if code is None or code in _PAID_BEHIND:
        return False
    error_class = protocol.error_class_for(code)
    return issubclass(error_class, (Doc2XJobFailedError, Doc2XInputError))


def failure_entry(job: dict[str, Any]) -> dict[str, Any]:
    """What is said of one failed image: where it came from, the uid, the code and the trace id (when known)."""
    return {
        "source": job["source"],
        "uid": job.get("uid"),
        "code": job.get("code"),
        "message": job.get("message"),
        "trace_id": job.get("trace_id"),
    }


def report(
    failures: list[dict[str, Any]], total: int, *, context: Any, results: ResultStore | None, log: Any
) -> None:
    """Name the allowed failures: in the log, in XCom, and in ``_failures/`` under the ``results``' root.

    The file written is added to the store's ``written_files`` (the task's lineage names it).
    """
    log.warning(
        "Doc2X: %d of %d images failed, within allowed_failures; the task succeeds without them "
        "(XCom key %r), and the next run sends them again:\n%s",
        len(failures),
        total,
        FAILURES_XCOM_KEY,
        "\n".join(
            f"- {failure['source']} (uid {failure['uid'] or 'none'}): code {failure['code']}, "
            f"trace id {failure['trace_id'] or 'none'}"
            for failure in failures
        ),
    )
    ti = context.get("ti") if hasattr(context, "get") else None
    if ti is not None:
        ti.xcom_push(key=FAILURES_XCOM_KEY, value=failures)
    if results is not None:
        path = results.root / FAILURES_FOLDER / _file_name(ti)
        lines = "".join(json.dumps(failure, sort_keys=True) + "\n" for failure in failures)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open_object(path, "wb") as handle:
                handle.write(lines.encode())

        storage_call(write, what="writing the list of failed images to", uri=str(path))
        log.info("Doc2X: the failed images are listed in %s", path)
        results.written_files.append(str(path))


def _file_name(ti: Any) -> str:
    """One file per try of one task instance: ``<dag>/<task>/<run>/<map index>-try-<n>.jsonl``."""
    if ti is None:
        return "task/try-1.jsonl"
    dag, task, run = (_segment(getattr(ti, name, name)) for name in ("dag_id", "task_id", "run_id"))
    return f"{dag}/{task}/{run}/{getattr(ti, 'map_index', -1)}-try-{getattr(ti, 'try_number', 1)}.jsonl"


def _segment(value: Any) -> str:
    """A name as one path segment of its own: ``/`` and other odd characters percent-encoded, never ``.`` or ``..``."""
    segment = quote(str(value), safe="-_.+:@=,")
    return segment.replace(".", "%2E") if segment in (".", "..", "") else segment
