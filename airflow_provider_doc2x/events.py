"""What the trigger and the task tell each other: the jobs of a task, and the trigger's one event.

Both travel through Airflow's database (trigger kwargs, the event, the resumed task's kwargs), so
they carry ids, statuses, codes and short fixed texts only: never results, never the server's own
words. Across a deferral they travel packed, the images' sources and sha256 kept in the task's XCom
(:mod:`airflow_provider_doc2x.wait_state`). A job is a dict::

    {"uid": "0194...", "source": "/scans/a.png", "sha256": "ab12...", "status": "processing"}

``status`` is Doc2X's (``processing``, ``success``, ``failed``, or a status this provider does not
know yet, which counts as not finished); a failed job also has a ``code`` (Doc2X's, or this
provider's own, see :func:`airflow_provider_doc2x.protocol.error_class_for`) and a fixed
``message``. Keys without a value are left out: a task of ten thousand images carries ten
thousand jobs through the database, twice.

The PDF lane (``method="pdf"``) keeps one job per image too, with a few more keys::

    {"uid": "<the PDF's uid>", "source": ..., "sha256": ..., "status": "processing",
     "lane": "pdf", "page_idx": 3, "pages": 200, "uploaded_at": 1764000000.0}

``page_idx`` is the image's page in the PDF, ``pages`` the PDF's page count (a result with another
count is a protocol error), ``uploaded_at`` the wall-clock time of the PUT's 200 (the service's
pickup delay is counted from it). An image not submitted yet (the PDFs and pages in flight are
bounded) is ``not-submitted``, with the number of the planned PDF it belongs to (``chunk``); an
image tried again after its PDF failed carries its ``round``; a PDF whose PUT lost its answer is
polled by its uid with ``uncertain`` set. A PDF-lane job without ``page_idx`` stands for a whole
PDF (the sensor's).

A source that is not a JPEG or PNG sent as it is carries its ``source_format`` (``"pdf"``,
``"tiff"``, ``"webp"``, ...) and, when it was converted, into what (``converted``: ``"png"`` for
the image API, ``"pdf"`` for the PDF API). A *document* is a PDF-lane job with a
``source_format`` and no ``page_idx``: one source sent as one PDF (a PDF as it is, a multi-page
TIFF, a scan over the image API's 7 MB), whose ``pages`` are all its own::

    {"uid": "<the PDF's uid>", "source": "/scans/contract.pdf", "sha256": ..., "status": "processing",
     "lane": "pdf", "pages": 20, "uploaded_at": 1764000000.0, "source_format": "pdf"}

A job whose status answers came malformed carries how many in a row (``malformed``). A finished
job whose result the task already wrote under ``output_path`` (the PDF lane stores what
finished at each resume, so that no result outlives Doc2X's 24 hours unstored) carries
``stored``: it is read back from storage at the end, not fetched again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XBudgetError,
    Doc2XBudgetUnavailableError,
    Doc2XError,
    Doc2XJobNotFoundError,
    Doc2XProtocolError,
    Doc2XQuotaError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)

#: Event statuses: all done well; all done, some failed; out of time; the wait itself gave up.
EVENT_SUCCESS = "success"
EVENT_FAILED = "failed"
EVENT_TIMEOUT = "timeout"
EVENT_ERROR = "error"
#: The PDF lane's: some PDFs finished and images remain to submit or to try again; the task goes on.
EVENT_PROGRESS = "progress"
EVENT_STATUSES = frozenset({EVENT_SUCCESS, EVENT_FAILED, EVENT_TIMEOUT, EVENT_ERROR, EVENT_PROGRESS})

#: The lane marker of a PDF-lane job (image-lane jobs carry none).
LANE_PDF = "pdf"
#: A PDF-lane image waiting for its PDF to be submitted (not finished, not polled). Not shaped like
#: a Doc2X status (those are letters, digits and underscores), so no answer can ever be taken for it.
STATUS_QUEUED = "not-submitted"
#: Keys a job may carry beyond its ids, status and failure (the PDF lane's), each left out when unset.
_PDF_KEYS = ("lane", "page_idx", "pages", "uploaded_at", "chunk", "round", "uncertain")
#: What a source was, and what it was converted into, when it is not a JPEG or PNG sent as it is.
_SOURCE_KEYS = ("source_format", "converted")
#: The formats a job may name (the readers' names), and what a source may be converted into.
SOURCE_FORMATS = frozenset({"jpeg", "png", "pdf", "tiff", "webp", "bmp", "gif", "heif"})
CONVERTED_INTO = frozenset({"png", "pdf"})
#: A finished job's mark that its result is written under ``output_path`` already.
STORED = "stored"
#: An unfinished job's count of malformed status answers in a row, carried from one wait to the next
#: (the PDF lane waits again and again) so that the bound holds for the task, not for each wait.
MALFORMED = "malformed"
#: The fixed text of a job whose result was malformed when the task fetched it.
#: The code of a job that finished but that Doc2X no longer knew when its result was fetched.
RESULT_EXPIRED = "result_expired"
RESULT_EXPIRED_MESSAGE = (
    "Doc2X no longer knew the job when its result was fetched (expired or lost); a new try submits "
    "the image again, and pays for it again"
)
MALFORMED_RESULT = (
    "Doc2X's answer with its result was malformed each time the task fetched it, so no result is "
    "taken (a protocol error; the task log has the answer)"
)
#: What is done with a PDF-lane image whose PDF failed: submitted again as it was packed (the
#: failure was not the PDF's: a limit, a lost task, a transient failure), or in smaller PDFs.
RETRY_SAME = "same"
RETRY_SPLIT = "split"


def job(
    uid: str | None, source: str, sha256: str | None, status: str = protocol.STATUS_PROCESSING
) -> dict[str, Any]:
    """A job as the task hands it to the trigger."""
    return {"uid": uid, "source": source, "sha256": sha256, "status": status}


def pdf_job(
    uid: str,
    source: str,
    sha256: str | None,
    *,
    page_idx: int,
    pages: int,
    uploaded_at: float,
    status: str = protocol.STATUS_PROCESSING,
    round_: int = 0,
) -> dict[str, Any]:
    """A PDF-lane job: the image's page ``page_idx`` in the PDF ``uid`` of ``pages`` pages."""
    entry = {
        **job(uid, source, sha256, status),
        "lane": LANE_PDF,
        "page_idx": page_idx,
        "pages": pages,
        "uploaded_at": round(uploaded_at, 1),
    }
    if round_:
        entry["round"] = round_
    return entry


def queued_job(source: str, sha256: str, *, chunk: int, round_: int = 0) -> dict[str, Any]:
    """A PDF-lane image not submitted yet, in the planned PDF ``chunk``."""
    entry = {**job(None, source, sha256, STATUS_QUEUED), "lane": LANE_PDF, "chunk": chunk}
    if round_:
        entry["round"] = round_
    return entry


def queued_document(
    source: str,
    sha256: str,
    *,
    chunk: int,
    pages: int,
    source_format: str,
    converted: str | None,
    round_: int = 0,
) -> dict[str, Any]:
    """A document not submitted yet: one source of ``pages`` pages, sent as one PDF when its turn comes."""
    entry = {**queued_job(source, sha256, chunk=chunk, round_=round_), "pages": pages}
    return {**entry, **source_keys(source_format, converted)}


def source_keys(source_format: str | None, converted: str | None) -> dict[str, Any]:
    """A job's (and a record's) keys saying what its source was and what it became, each left out when unset."""
    keys: dict[str, Any] = {}
    if source_format:
        keys["source_format"] = source_format
    if converted:
        keys["converted"] = converted
    return keys


def source_keys_of(entry: dict[str, Any]) -> dict[str, Any]:
    """What a job says of how its source travelled, for its record and sidecar."""
    return source_keys(entry.get("source_format"), entry.get("converted"))


def document_job(
    uid: str,
    source: str,
    sha256: str,
    *,
    pages: int,
    uploaded_at: float,
    source_format: str,
    converted: str | None,
    status: str = protocol.STATUS_PROCESSING,
) -> dict[str, Any]:
    """A document submitted as the PDF ``uid`` of ``pages`` pages (all its own: no ``page_idx``)."""
    entry = {
        **job(uid, source, sha256, status),
        "lane": LANE_PDF,
        "pages": pages,
        "uploaded_at": round(uploaded_at, 1),
    }
    return {**entry, **source_keys(source_format, converted)}


def is_document(entry: dict[str, Any]) -> bool:
    """Whether a job stands for a whole document (a PDF-lane job of a source sent as one PDF)."""
    return is_pdf(entry) and entry.get("page_idx") is None and entry.get("source_format") is not None


def is_pdf(entry: dict[str, Any]) -> bool:
    """Whether a job is the PDF lane's."""
    return entry.get("lane") == LANE_PDF


def is_queued(entry: dict[str, Any]) -> bool:
    """Whether a job waits to be submitted (a PDF-lane image whose PDF is not submitted yet)."""
    return entry.get("status") == STATUS_QUEUED and is_pdf(entry)


def is_pending(entry: dict[str, Any]) -> bool:
    """Whether a job is submitted and not finished: what the trigger polls."""
    return not is_finished(entry) and not is_queued(entry)


def result_key(entry: dict[str, Any]) -> str:
    """What identifies a job's result: its uid, and for a PDF-lane image its page too."""
    if is_pdf(entry) and entry.get("page_idx") is not None:
        return f"{entry['uid']}#{entry['page_idx']}"
    return str(entry.get("uid"))


def retry_plan(entry: dict[str, Any]) -> str | None:
    """For a PDF-lane image whose PDF failed: how it is tried again, or None when it is not.

    Decided by the failure's class, as permanence is everywhere: a refused key or an empty quota
    stops everything; a lost upload answer is never resent within the try (as in the image lane);
    a protocol error (a result that does not map back to the pages) is reported. A limit, a
    transient failure or a task the service lost is tried again as it was packed; any other
    failure of the PDF (``parse_error``, ``parse_timeout``, a file the service refused) in
    smaller PDFs. A document (the user's own file, never cut) is not tried again within the task,
    as an image of the image lane is not: it is named, and a new try of the task submits it again.
    """
    if not is_pdf(entry) or entry.get("status") != protocol.STATUS_FAILED or entry.get("page_idx") is None:
        return None
    error_class = protocol.error_class_for(entry.get("code"))
    if issubclass(
        error_class,
        (
            Doc2XAuthError,
            Doc2XQuotaError,
            Doc2XSubmitUncertainError,
            Doc2XProtocolError,
            Doc2XBudgetError,
            Doc2XBudgetUnavailableError,
        ),
    ):
        return None
    if issubclass(error_class, (Doc2XTransientError, Doc2XJobNotFoundError)):
        return RETRY_SAME
    return RETRY_SPLIT


def failed_job(source: str, sha256: str | None, error: Doc2XError, uid: str | None = None) -> dict[str, Any]:
    """A job that ended in ``error``: its code, the error class's fixed summary (never its message), its trace id."""
    return {
        **job(uid or error.uid, source, sha256, protocol.STATUS_FAILED),
        "code": error.failure_code,
        "message": error.summary,
        **({"trace_id": error.trace_id} if _trace_id_valid(error.trace_id) and error.trace_id else {}),
    }


def malformed_answers(count: int) -> str:
    """The fixed text of a job whose status answers stayed malformed ``count`` times in a row."""
    return (
        f"Doc2X answered its status malformed {count} times in a row, so no result is taken "
        "(a protocol error; the task log has the answers)"
    )


def is_finished(entry: dict[str, Any]) -> bool:
    """Whether a job needs no more polling."""
    return entry.get("status") in protocol.TERMINAL_STATUSES


def make_event(
    status: str, jobs: list[dict[str, Any]], message: str, code: str | None = None
) -> dict[str, Any]:
    """The event's payload: a fixed message, and each job's ids and status."""
    return {
        "status": status,
        "message": message,
        "code": code,
        "jobs": [compact(entry) for entry in jobs],
    }


def compact(entry: dict[str, Any]) -> dict[str, Any]:
    """A working dict's job in its compact form, unchecked: ``Job.of(entry).to_json()``, without the object.

    Run for every job at every deferral and event (thousands a task): the same dict, built directly.
    """
    carried: dict[str, Any] = {
        "uid": entry.get("uid"),
        "source": entry.get("source"),
        "sha256": entry.get("sha256"),
        "status": entry.get("status") or protocol.STATUS_PROCESSING,
    }
    for key in _CARRIED:
        if key not in carried and (value := entry.get(key)) is not None:
            carried[key] = value
    return carried


@dataclasses.dataclass(frozen=True)
class Job:
    """One image's job as it crosses the trigger boundary (trigger kwargs, events), typed.

    Inside the task and the wait a job is a working dict (keys are added and dropped as it goes);
    where it crosses Airflow's database it is this: :meth:`from_json` refuses a job that is not one,
    naming it, and :meth:`to_json` writes today's compact form (ids and status always, every other
    key only when set, nothing the wait added), so that a task of ten thousand images stays small
    and a task of this release reads a trigger row of the last one.
    """

    source: str
    status: str = protocol.STATUS_PROCESSING
    uid: str | None = None
    sha256: str | None = None
    code: str | None = None
    message: str | None = None
    trace_id: str | None = None
    lane: str | None = None
    page_idx: int | None = None
    pages: int | None = None
    uploaded_at: float | None = None
    chunk: int | None = None
    round: int | None = None
    uncertain: bool | None = None
    source_format: str | None = None
    converted: str | None = None
    stored: int | None = None
    malformed: int | None = None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Job:
        """A working dict's job as it is, unchecked: what the wait and the task made themselves."""
        fields = {key: entry.get(key) for key in _CARRIED if entry.get(key) is not None}
        return cls(
            source=cast(str, entry.get("source")),
            status=entry.get("status") or protocol.STATUS_PROCESSING,
            **fields,
        )

    @classmethod
    def from_json(cls, entry: Any) -> Job:
        """A job read from the database, checked: its types, and a PDF-lane job's own keys.

        Raises:
            Doc2XError: the job is not one (named, quoted safely); resuming on a guess could lose
                or repeat pages.
        """
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("status", protocol.STATUS_PROCESSING), str)
            or not isinstance(entry.get("source"), str)
            or not _pdf_keys_valid(entry)
            or entry.get(STORED) not in (None, 1)
            or not _count_valid(entry.get(MALFORMED))
            or entry.get("source_format") not in (None, *SOURCE_FORMATS)
            or entry.get("converted") not in (None, *CONVERTED_INTO)
            or not _trace_id_valid(entry.get("trace_id"))
            or not _trace_id_valid(entry.get("code"))
            or not (entry.get("message") is None or isinstance(entry.get("message"), str))
        ):
            raise Doc2XError(f"The Doc2X trigger was handed a malformed job: {protocol.quote(entry)}")
        return cls.of(entry)

    def to_json(self) -> dict[str, Any]:
        """The compact form: ``uid``, ``source``, ``sha256`` and ``status``, then each other key that is set."""
        carried: dict[str, Any] = {
            "uid": self.uid,
            "source": self.source,
            "sha256": self.sha256,
            "status": self.status,
        }
        for key in _CARRIED:
            value = getattr(self, key)
            if value is not None and key not in carried:
                carried[key] = value
        return carried


#: What a job carries across the boundary beyond its source and status, in the order it is written.
_CARRIED = ("uid", "sha256", "code", "message", "trace_id", *_PDF_KEYS, *_SOURCE_KEYS, STORED, MALFORMED)
#: Longest trace id a job carries (Doc2X's are a few dozen characters).
MAX_TRACE_ID = 128


def _trace_id_valid(value: Any) -> bool:
    """None, or a short printable string (a trace id or a code: quoted, looked up, never run)."""
    return value is None or (isinstance(value, str) and len(value) <= MAX_TRACE_ID and value.isprintable())


def validate_event(event: Any, *, jobs_checked: bool = False) -> dict[str, Any]:
    """Refuse a missing or malformed event loudly: resuming on a guess could lose or repeat pages.

    ``jobs_checked``: the jobs were checked one by one already, as they were unpacked
    (:func:`~airflow_provider_doc2x.wait_state.unpack`); only the event around them is.
    """
    if not isinstance(event, dict):
        raise Doc2XError(
            f"The Doc2X trigger resumed the task without an event (got a {type(event).__name__})"
        )
    if event.get("status") not in EVENT_STATUSES or not isinstance(event.get("jobs"), list):
        raise Doc2XError(
            f"The Doc2X trigger sent an event this provider does not know (status {protocol.quote(event.get('status'))})"
        )
    for entry in () if jobs_checked else event["jobs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
            raise Doc2XError(f"The Doc2X trigger sent a malformed job in its event: {protocol.quote(entry)}")
        try:
            Job.from_json(entry)
        except Doc2XError:
            raise Doc2XError(
                f"The Doc2X trigger sent a malformed job in its event: {protocol.quote(entry)}"
            ) from None
    return event


def _count_valid(value: Any) -> bool:
    """An optional count: absent, or a whole number of at least 0."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _pdf_keys_valid(entry: dict[str, Any]) -> bool:
    """A PDF-lane job's own keys have their types (whole numbers, a time); a job of another lane has none."""
    lane = entry.get("lane")
    if lane is None:
        return True
    if lane != LANE_PDF:
        return False
    for key in ("page_idx", "pages", "chunk", "round"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return False
    uploaded_at = entry.get("uploaded_at")
    if uploaded_at is not None and (
        isinstance(uploaded_at, bool) or not isinstance(uploaded_at, (int, float))
    ):
        return False
    if is_queued(entry):
        return entry.get("chunk") is not None and isinstance(entry.get("sha256"), str)
    return entry.get("status") == protocol.STATUS_FAILED or isinstance(entry.get("uid"), str)
