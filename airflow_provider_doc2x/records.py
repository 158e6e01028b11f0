"""From a finished wait to what the user gets: one record per image, or one error naming every failure.

The operator and the sensor both end here when the trigger reports (or when the worker's own wait
does): each successful job's result is fetched and either kept whole in the record (XCom) or
written to storage with only its paths in the record; any job that did not succeed is named in one
error, raised after the others were recorded. Whether that error is permanent (no Airflow retry)
is decided by the failures' exception classes alone (:func:`airflow_provider_doc2x.exceptions.is_permanent`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from airflow_provider_doc2x import protocol, transport
from airflow_provider_doc2x.events import (
    EVENT_ERROR,
    MALFORMED_RESULT,
    RESULT_EXPIRED,
    RESULT_EXPIRED_MESSAGE,
    STATUS_QUEUED,
    STORED,
    is_pdf,
    result_key,
    source_keys_of,
    validate_event,
)
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XJobNotFoundError,
    Doc2XPermanentError,
    Doc2XProtocolError,
)
from airflow_provider_doc2x.pdf.results import PAGE_MAP_MISMATCH, page_map_problem, pdf_records

if TYPE_CHECKING:
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.storage.results import ResultStore

log = logging.getLogger(__name__)

#: Results fetched at once when a task resumes.
FETCHES_IN_FLIGHT = 8
#: PDF results (each with the pages of a whole PDF, maybe its export zip) handled at once.
PDFS_IN_FLIGHT = 2
#: Status calls made for one finished job's result while its answer is malformed, before that job
#: alone fails with ``protocol_error`` (a status call is safe to repeat; a garbled answer may pass).
FETCH_ATTEMPTS = 3

_Status = TypeVar("_Status")


def result_record(
    source: str,
    result: protocol.Doc2XResult,
    sha256: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What XCom holds for one image kept whole: JSON, small enough for the metadata database (no figures).

    Each page has its number in the source (an image is page 1 of itself); ``extra`` says how the
    source travelled (``source_format``, ``converted``), as the sidecar does.
    """
    return {
        "source": source,
        "uid": result.uid,
        "sha256": sha256,
        "pages": [{"page": 1, **page.to_dict()} for page in result.pages],
        "markdown": result.markdown,
        "has_figures": result.convert_zip is not None,
        **(extra or {}),
    }


def store_or_record(
    results: ResultStore | None,
    source: str,
    digest: str | None,
    result: protocol.Doc2XResult,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the result to storage and return its paths, or return it whole for XCom."""
    if results is not None and digest:
        return results.write(source, digest, result, extra=extra)
    return result_record(source, result, digest, extra)


def result_keeper(
    hook: Doc2XHook, results: ResultStore | None, known: dict[str, dict[str, Any]]
) -> Callable[[list[dict[str, Any]], protocol.Doc2XJobStatus], Awaitable[None]]:
    """What a worker's own wait does with each result its polls bring: its records made at once, into ``known``.

    ``known`` is keyed by :func:`~airflow_provider_doc2x.events.result_key`; :func:`records_from_event`
    then fetches none of them again.
    """

    async def keep(unit: list[dict[str, Any]], status: protocol.Doc2XJobStatus) -> None:
        assert status.result is not None
        if is_pdf(unit[0]):
            for entry, record in zip(unit, await pdf_records(hook.pdf, results, status, unit), strict=True):
                if record.get("status") is None:
                    known[result_key(entry)] = record
            return
        head = unit[0]
        known[head["uid"]] = await asyncio.to_thread(
            store_or_record, results, head["source"], head.get("sha256"), status.result, source_keys_of(head)
        )

    return keep


def records_from_event(
    hook: Doc2XHook,
    event: Any,
    *,
    results: ResultStore | None = None,
    known: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The records of a trigger event, in input order; raise naming every job that did not succeed.

    ``known`` holds records already made from results the wait brought, by
    :func:`~airflow_provider_doc2x.events.result_key` (the worker's own wait): those are not
    fetched again.

    A wait that gave up (status calls failing round after round) still had jobs that finished:
    with ``results``, theirs are written before the error is raised, since each was paid for and
    lives only 24 hours with Doc2X (a new try finds them stored).
    """
    outcomes = outcomes_from_event(hook, event, results=results, known=known)
    failures = [outcome for outcome in outcomes if outcome.get("status") is not None]
    if failures:
        raise batch_failure(failures, len(outcomes))
    return outcomes


def outcomes_from_event(
    hook: Doc2XHook,
    event: Any,
    *,
    results: ResultStore | None = None,
    known: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """A trigger event's outcomes in input order: a record per parsed image, the job of each other one.

    A job (it has a ``status``) did not end parsed: failed, or not finished. The wait's own error
    (status calls failing round after round) is raised, after what finished is written, as
    :func:`records_from_event` says.
    """
    event = validate_event(event)
    register_key(hook)
    if event["status"] == EVENT_ERROR:
        code = event.get("code")
        error_class = Doc2XAuthError if code == "unauthorized" else Doc2XError
        error = error_class(f"Waiting for Doc2X failed: {event['message']}", code=code)
        if results is not None and error_class is not Doc2XAuthError:
            _keep_finished(hook, event["jobs"], results, known or {})
        raise error
    return transport.run_sync(_collect(hook, event["jobs"], results, known or {}))


def store_finished(
    hook: Doc2XHook, jobs: list[dict[str, Any]], *, results: ResultStore | None
) -> list[dict[str, Any]]:
    """Write the results of the jobs that finished well and are not written yet; return the jobs.

    Why: a task that defers again and again (the PDF lane) would otherwise fetch every result at
    its end, and a task longer than Doc2X's 24 hours would find the first results expired, to be
    paid for again. Each job written comes back marked ``stored`` (read back from storage at the
    end, not fetched again); a job whose result does not map back or stays malformed comes back
    failed with ``protocol_error`` (named at the end). Without ``results`` (XCom) nothing is done:
    the records are only made at the end.
    """
    todo = [
        index
        for index, entry in enumerate(jobs)
        if entry.get("status") == protocol.STATUS_SUCCESS and not entry.get(STORED)
    ]
    if results is None or not todo:
        return jobs
    register_key(hook)
    outcomes = transport.run_sync(_collect(hook, [jobs[index] for index in todo], results, {}))
    kept = list(jobs)
    for index, outcome in zip(todo, outcomes, strict=True):
        if outcome.get("status") is None:
            kept[index] = {**jobs[index], STORED: 1}
        elif outcome.get("status") == protocol.STATUS_FAILED:
            kept[index] = {key: value for key, value in outcome.items() if key != STORED}
    stored = sum(bool(entry.get(STORED)) for entry in kept) - sum(bool(entry.get(STORED)) for entry in jobs)
    if stored:
        log.info("Doc2X: stored the results of %d more images that finished", stored)
    return kept


def _keep_finished(
    hook: Doc2XHook,
    jobs: list[dict[str, Any]],
    results: ResultStore,
    known: dict[str, dict[str, Any]],
) -> None:
    """Write what finished well before a wait gave up; a failure here is logged, the wait's error raised."""
    done = [entry for entry in jobs if entry.get("status") == protocol.STATUS_SUCCESS]
    if not done:
        return
    try:
        transport.run_sync(_collect(hook, done, results, known))
    except Doc2XError as problem:
        log.warning("The results that finished before the wait gave up could not all be stored: %s", problem)


async def _status_of(hook: Doc2XHook, call: Any, uid: str, job: dict[str, Any]) -> protocol.Doc2XJobStatus:
    """A finished job's status for its result (see :func:`recorded_status`)."""
    try:
        return await recorded_status(
            hook, lambda: call(uid), log, f"Doc2X's answer with the result of {job['source']} (uid {uid})"
        )
    except Doc2XProtocolError as error:
        log.error(
            "Doc2X's answer with the result of %s (uid %s) was malformed %d times: %s",
            job["source"],
            uid,
            FETCH_ATTEMPTS,
            error,
        )
        raise


async def recorded_status(
    hook: Doc2XHook, call: Callable[[], Awaitable[_Status]], log: Any, what: str
) -> _Status:
    """A job's status, asked again while its answer is malformed: the one rule for every status read.

    A single garbled answer (cut off, wrong types, an HTML page) says nothing about the job, and a
    status call is safe to repeat: it is asked again, after the connection's back-off, at most
    :data:`FETCH_ATTEMPTS` times in all (as the result fetch does),
    before the job's images fail alone with ``protocol_error``. ``what`` names the job in the log.

    Raises:
        Doc2XProtocolError: the answer was malformed every time.
    """
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            return await call()
        except Doc2XProtocolError as error:
            if attempt == FETCH_ATTEMPTS:
                raise
            settings = await hook.aget_settings()
            ceiling = min(settings.retry_wait_max, settings.retry_wait * 2 ** (attempt - 1))
            pause = random.uniform(ceiling / 2, ceiling)
            log.warning(
                "%s answered its status malformed (%s); asking again in %.1fs (try %d of %d)",
                what,
                error,
                pause,
                attempt + 1,
                FETCH_ATTEMPTS,
            )
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


def _malformed(job: dict[str, Any]) -> dict[str, Any]:
    """A job whose result stayed malformed: failed alone, with ``protocol_error``."""
    return _failed(job, "protocol_error", MALFORMED_RESULT)


def _unfetched(job: dict[str, Any], error: Doc2XError) -> dict[str, Any]:
    """A finished job whose result could not be fetched: failed alone, named, the others go on.

    Why alone: one uid that Doc2X no longer knows (its result expired or was lost), or a status call
    that failed past its retries, says nothing about the other jobs, whose results are paid for. A
    job Doc2X no longer knows gets ``result_expired``, which Airflow retries: the next try submits
    the image again and pays again, the only way to a result. Any other failure keeps its code: the
    next try reconnects to the job and fetches its result again, paying nothing.
    """
    if isinstance(error, Doc2XJobNotFoundError):
        return _failed(job, RESULT_EXPIRED, RESULT_EXPIRED_MESSAGE)
    return _failed(
        job, error.code or "fetch_failed", "its result could not be fetched (a new try fetches it)"
    )


def _failed(job: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    failed = {"status": protocol.STATUS_FAILED, "code": code, "message": message}
    return {**{key: value for key, value in job.items() if key != STORED}, **failed}


async def _collect(
    hook: Doc2XHook,
    jobs: list[dict[str, Any]],
    results: ResultStore | None,
    known: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each job's record, or the job itself (with its ``status``) when it did not succeed.

    Results are fetched a few at a time and written as they arrive, so a task of a thousand images
    neither waits for them one by one nor holds them all in memory; a uid listed twice (the same
    content twice) is fetched once, and so is a PDF (the PDF lane), each of its images taking its
    page by ``page_idx``.
    """
    turns = asyncio.Semaphore(FETCHES_IN_FLIGHT)
    pdf_turns = asyncio.Semaphore(PDFS_IN_FLIGHT)
    fetched: dict[str, asyncio.Future[protocol.Doc2XJobStatus]] = {}

    async def reused(job: dict[str, Any]) -> dict[str, Any] | None:
        """The record of a result this task already has (the wait's) or stored earlier, if any."""
        source, digest = job["source"], job.get("sha256")
        key = result_key(job)
        if key in known:
            return {**known[key], "source": source}
        # A result this task stored at an earlier resume is read back even with ``overwrite``; it
        # was parsed by this task, not reused (``cached`` false).
        if results is not None and (not results.overwrite or job.get(STORED)) and digest:
            stored = await asyncio.to_thread(results.cached, digest, source)
            if stored is not None:
                return {**stored, "source": source, **({"cached": False} if job.get(STORED) else {})}
        return None

    async def image(job: dict[str, Any]) -> dict[str, Any]:
        async with turns:
            if job["uid"] not in fetched:
                fetched[job["uid"]] = asyncio.ensure_future(
                    _status_of(hook, hook.aget_job_status, job["uid"], job)
                )
            try:
                status = await asyncio.shield(fetched[job["uid"]])
            except Doc2XProtocolError:
                return _malformed(job)
            except Doc2XAuthError:
                raise
            except Doc2XError as error:
                return _unfetched(job, error)
            if status.result is None:
                return {
                    **job,
                    "status": status.status,
                    "message": "the job had no result when it was fetched",
                }
            record = await asyncio.to_thread(
                store_or_record, results, job["source"], job.get("sha256"), status.result, source_keys_of(job)
            )
            return {key: value for key, value in record.items() if key != "status"}

    async def pdf(uid: str, entries: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """The records of a PDF's images (by ``id`` of their job), from one status call."""
        async with pdf_turns:
            try:
                status = await _status_of(hook, hook.pdf.aget_pdf_status, uid, entries[0])
            except Doc2XProtocolError:
                return {id(entry): _malformed(entry) for entry in entries}
            except Doc2XAuthError:
                raise
            except Doc2XError as error:
                return {id(entry): _unfetched(entry, error) for entry in entries}
            if status.result is None:
                return {
                    id(entry): {
                        **entry,
                        "status": status.status,
                        "message": "the job had no result when it was fetched",
                    }
                    for entry in entries
                }
            if problem := page_map_problem(entries, status):
                log.error("Doc2X's result for PDF %s does not map back to its images: %s", uid, problem)
                failed = {
                    "status": protocol.STATUS_FAILED,
                    "code": "protocol_error",
                    "message": PAGE_MAP_MISMATCH,
                }
                return {id(entry): {**entry, **failed} for entry in entries}
            records = await pdf_records(hook.pdf, results, status, entries)
            return {id(entry): record for entry, record in zip(entries, records, strict=True)}

    successes = [index for index, job in enumerate(jobs) if job["status"] == protocol.STATUS_SUCCESS]
    outcomes: list[dict[str, Any] | None] = [
        None if job["status"] == protocol.STATUS_SUCCESS else job for job in jobs
    ]
    for index, record in zip(
        successes, await asyncio.gather(*(reused(jobs[i]) for i in successes)), strict=True
    ):
        outcomes[index] = record
    by_pdf: dict[str, list[int]] = {}
    images: list[int] = []
    for index in successes:
        job = jobs[index]
        if outcomes[index] is None:
            (by_pdf.setdefault(job["uid"], []) if is_pdf(job) else images).append(index)
    pdf_work = [pdf(uid, [jobs[index] for index in indices]) for uid, indices in by_pdf.items()]
    image_work = [image(jobs[index]) for index in images]
    # Every fetch and write runs to its end before an error is raised: one failure (a refused key,
    # a storage outage) must not cancel the writes of results already paid for.
    gathered = await asyncio.gather(*image_work, *pdf_work, return_exceptions=True)
    for outcome in gathered:
        if isinstance(outcome, BaseException):
            raise outcome
    image_records = cast("list[dict[str, Any]]", gathered[: len(images)])
    pdf_records_ = cast("list[dict[int, dict[str, Any]]]", gathered[len(images) :])
    for index, record in zip(images, image_records, strict=True):
        outcomes[index] = record
    for indices, records in zip(by_pdf.values(), pdf_records_, strict=True):
        for index in indices:
            outcomes[index] = records[id(jobs[index])]
    return [outcome for outcome in outcomes if outcome is not None]


def register_key(hook: Doc2XHook) -> None:
    """Load the connection, so that Airflow's secret masker knows the key before anything is logged.

    A resumed try whose jobs all failed would otherwise never read it.
    """
    try:
        hook.get_conn()
    except Doc2XError as error:
        log.warning("The Doc2X connection could not be read: %s", error)


def describe_failure(job: dict[str, Any]) -> str:
    """Why one job did not end parsed, in a line: fixed texts and codes only."""
    status = job.get("status")
    if status == STATUS_QUEUED and is_pdf(job):
        return "not submitted yet when the wait ended (a new try submits it)"
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
    lines = [f"- {job['source']} ({_where(job)}): {describe_failure(job)}" for job in failures]
    message = f"{len(failures)} of {total} images were not parsed:\n" + "\n".join(lines)
    permanent = all(
        job.get("status") == protocol.STATUS_FAILED and protocol.is_permanent_code(job.get("code"))
        for job in failures
    )
    return (Doc2XPermanentError if permanent else Doc2XError)(message)


def _where(job: dict[str, Any]) -> str:
    """A job's uid for a failure line; a PDF-lane image's PDF and page too."""
    if is_pdf(job) and job.get("uid") and job.get("page_idx") is not None:
        return f"PDF uid {job['uid']}, page {job['page_idx']}"
    return f"uid {job.get('uid') or 'none'}"
