"""
What the trigger and the task tell each other: the jobs of a task, and the trigger's one event.

Both travel through Airflow's database (trigger kwargs, the event, the resumed task's kwargs), so
they carry ids, statuses, codes and short fixed texts only: never results, never the server's own
words. A job is a dict::

    {"uid": "0194...", "source": "/scans/a.png", "sha256": "ab12...", "status": "processing"}

``status`` is Doc2X's (``processing``, ``success``, ``failed``, or a status this provider does not
know yet, which counts as not finished); a failed job also has a ``code`` (Doc2X's, or this
provider's own, see :func:`airflow_provider_doc2x.protocol.error_class_for`) and a fixed
``message``. Keys without a value are left out: a task of ten thousand images carries ten
thousand jobs through the database, twice.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import Doc2XError

#: Event statuses: all done well; all done, some failed; out of time; the wait itself gave up.
EVENT_SUCCESS = "success"
EVENT_FAILED = "failed"
EVENT_TIMEOUT = "timeout"
EVENT_ERROR = "error"
EVENT_STATUSES = frozenset({EVENT_SUCCESS, EVENT_FAILED, EVENT_TIMEOUT, EVENT_ERROR})


def job(
    uid: str | None, source: str, sha256: str | None, status: str = protocol.STATUS_PROCESSING
) -> dict[str, Any]:
    """A job as the task hands it to the trigger."""
    return {"uid": uid, "source": source, "sha256": sha256, "status": status}


def failed_job(source: str, sha256: str | None, error: Doc2XError, uid: str | None = None) -> dict[str, Any]:
    """A job that ended in ``error``: its code and the error class's fixed summary, never its message."""
    return {
        **job(uid or error.uid, source, sha256, protocol.STATUS_FAILED),
        "code": error.failure_code,
        "message": error.summary,
    }


def is_finished(entry: dict[str, Any]) -> bool:
    """Whether a job needs no more polling."""
    return entry.get("status") in protocol.TERMINAL_STATUSES


def make_event(
    status: str, jobs: list[dict[str, Any]], message: str, code: str | None = None
) -> dict[str, Any]:
    """The event's payload: a fixed message, and each job's ids and status."""
    return {"status": status, "message": message, "code": code, "jobs": [_carried(entry) for entry in jobs]}


def _carried(entry: dict[str, Any]) -> dict[str, Any]:
    """A job as an event carries it: its ids, status and failure, and nothing the trigger added."""
    carried = {key: entry.get(key) for key in ("uid", "source", "sha256")}
    carried["status"] = entry.get("status") or protocol.STATUS_PROCESSING
    for key in ("code", "message"):
        if entry.get(key) is not None:
            carried[key] = entry[key]
    return carried


def validate_event(event: Any) -> dict[str, Any]:
    """Refuse a missing or malformed event loudly: resuming on a guess could lose or repeat pages."""
    if not isinstance(event, dict):
        raise Doc2XError(
            f"The Doc2X trigger resumed the task without an event (got a {type(event).__name__})"
        )
    if event.get("status") not in EVENT_STATUSES or not isinstance(event.get("jobs"), list):
        raise Doc2XError(
            f"The Doc2X trigger sent an event this provider does not know (status {protocol.quote(event.get('status'))})"
        )
    for entry in event["jobs"]:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("status"), str)
            or not isinstance(entry.get("source"), str)
        ):
            raise Doc2XError(f"The Doc2X trigger sent a malformed job in its event: {protocol.quote(entry)}")
    return event
