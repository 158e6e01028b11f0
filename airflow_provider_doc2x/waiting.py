"""The one wait loop: poll Doc2X until each job of a task is finished, in the triggerer or in a worker.

The trigger's ``run`` and the operator's wait in the worker (``deferrable=False``, the synchronous
PDF lane's rounds) both run a :class:`JobWaiter`, so the rounds of status calls, the failure rules
and the event they end with are one piece of code. The waiter works on the jobs of
:mod:`airflow_provider_doc2x.events` and returns an event's payload: uids and statuses only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from airflow_provider_doc2x import protocol, transport
from airflow_provider_doc2x.events import (
    EVENT_ERROR,
    EVENT_FAILED,
    EVENT_PROGRESS,
    EVENT_SUCCESS,
    EVENT_TIMEOUT,
    MALFORMED,
    failed_job,
    is_finished,
    is_pdf,
    is_pending,
    is_queued,
    make_event,
    malformed_answers,
    retry_plan,
)
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XJobNotFoundError,
    Doc2XProtocolError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.pdf.results import PAGE_MAP_MISMATCH, page_map_problem
from airflow_provider_doc2x.progress import Progress

#: Status calls in flight at once for all the triggers of an event loop (as many as the transport's
#: requests in flight per loop).
POLLS_IN_FLIGHT_PER_LOOP = transport.MAX_IN_FLIGHT_PER_LOOP
_poll_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def poll_turns() -> asyncio.Semaphore:
    """The running loop's turns for status calls, shared by its triggers.

    A trigger waits for its turn here, before its call is built: a thousand triggers that poll at
    once then wait as a few small frames each, not as a whole request in the making (retry state,
    closures, coroutines), which is what CPython's full garbage collections would walk, stopping
    every trigger of the loop while they do.
    """
    loop = asyncio.get_running_loop()
    turns = _poll_turns.get(loop)
    if turns is None:
        turns = _poll_turns[loop] = asyncio.Semaphore(POLLS_IN_FLIGHT_PER_LOOP)
    return turns


#: What a worker's wait does with each result a status call brings: (the jobs it answers, its
#: status): the jobs of one uid (one image, the same image listed twice, or the images of one PDF).
ResultCallback = Callable[[list[dict[str, Any]], protocol.Doc2XJobStatus], Awaitable[None]]


class JobWaiter:
    """Poll Doc2X for a task's jobs until each is finished or the absolute deadline passes.

    :param hook: the hook whose connection the status calls use (its settings read the async way).
    :param jobs: one dict per image (see :mod:`airflow_provider_doc2x.events`); the waiter works
        on copies.
    :param poll_interval: seconds between two rounds of status calls.
    :param deadline: absolute Unix time after which the wait ends with a timeout event.
    :param max_concurrent_polls: status calls in flight at once for this wait.
    :param max_consecutive_errors: rounds in a row with transient failures tolerated before giving
        up; also the malformed answers in a row tolerated for one uid before its jobs fail alone.
    :param log: where the wait's lines go: the trigger's logger in the triggerer, the task's in a
        worker, so that they land in the task's log either way.
    """

    def __init__(
        self,
        hook: Doc2XHook,
        jobs: list[dict[str, Any]],
        *,
        poll_interval: float,
        deadline: float,
        max_concurrent_polls: int = 8,
        max_consecutive_errors: int = 5,
        log: Any = None,
    ) -> None:
        """Keep what the wait needs; nothing is asked before :meth:`wait`."""
        self.hook = hook
        self.jobs = [dict(job) for job in jobs]
        self.poll_interval = float(poll_interval)
        self.deadline = float(deadline)
        self.max_concurrent_polls = max_concurrent_polls
        self.max_consecutive_errors = max_consecutive_errors
        self.log = log if log is not None else logging.getLogger(__name__)

    async def wait(self, *, on_result: ResultCallback | None = None) -> dict[str, Any]:
        """Poll until every job is finished; return the event's payload.

        Jobs that arrive finished (a failed upload, a job an earlier try already finished) are not
        polled, nor are PDF-lane images still queued. The first round comes one interval after the
        start. The deadline holds even while a request drips: a round still running at the
        deadline is cancelled. The worker runs this same loop when the operator does not defer,
        and passes ``on_result`` to keep each result the polls bring (so it need not fetch it
        again); the triggerer never does (events carry no results).

        Jobs that share a uid are asked about once: the same image listed twice, and every image of
        one PDF (the PDF lane polls Doc2X's PDF status, then updates each image of the PDF; a
        result whose page count is not the PDF's fails them all as a protocol error). A round asks
        in the order the jobs were submitted (Doc2X finishes them in about that order) and ends
        early once ``max_concurrent_polls`` of its answers say "not finished": the jobs after
        those are most likely not finished either. Jobs found unfinished go to the back of the
        line, so a slow job never keeps the others from being asked. A batch of a thousand jobs
        costs about one status call per job (per PDF in the PDF lane), not one per job per round.

        PDF lane: while images remain queued (the PDFs and pages in flight are bounded) or may be
        tried again (their PDF failed), the wait ends with a ``progress`` event once half of the
        PDFs it started with are finished, so that the task submits the next ones. After a PDF
        refused for the service's limits, that event waits a back-off first, here (no worker held).

        Failures are told apart by whose they are. A status call that fails without an answer (a
        5xx, a reset, a timeout) is the service's: rounds in a row with such failures end the wait
        for every job past ``max_consecutive_errors``. A malformed answer (a
        :class:`Doc2XProtocolError`) answers one uid's call, so it is that uid's: past
        ``max_consecutive_errors`` malformed answers in a row for one uid, its jobs fail alone with
        ``protocol_error`` and the others go on, so that the results they paid for are kept.
        """
        jobs = [dict(entry) for entry in self.jobs]
        pending = _units(entry for entry in jobs if is_pending(entry))
        pdfs_at_start = sum(1 for unit in pending if is_pdf(unit[0]))
        pdfs_done = 0
        limited_round = 0  # 1 + the highest round of a PDF refused for the limits in this wait
        failed_rounds = 0
        # Malformed answers in a row, by id of the unit they answer (counted on from an earlier wait).
        malformed: dict[int, int] = {id(unit): int(unit[0].get(MALFORMED) or 0) for unit in pending}
        # "Doc2X: 420/3000 done; about 12 min left at the observed pace", every few seconds at most.
        progress = Progress(self.log, len(jobs), "done", done=_ended(jobs))
        if pending:
            # The first round waits one interval: the task has just learnt these statuses (it
            # submitted or checked the jobs), so asking at once would be a wasted request. It also
            # keeps the event clear of the deferral: Airflow 3.3's scheduler can fail a task whose
            # trigger fires before it has seen the deferring worker exit (apache/airflow#67287,
            # #72716).
            await asyncio.sleep(max(0.0, min(self.poll_interval, self.deadline - time.time())))

        while True:
            remaining = self.deadline - time.time()
            try:
                answers = await transport.within(max(remaining, 0.001), self._round(pending))
            except asyncio.TimeoutError:
                return self._timeout(jobs)
            transient: list[Doc2XError] = []
            for unit, answer in answers:
                head = unit[0]
                if isinstance(answer, Doc2XProtocolError):
                    # The answer to this uid's call, garbled: asked again next round, then its jobs
                    # fail alone (a status call is safe to repeat; the other jobs are not held up).
                    count = malformed[id(unit)] = malformed.get(id(unit), 0) + 1
                    for entry in unit:
                        entry[MALFORMED] = count
                    if count > self.max_consecutive_errors:
                        self._fail(unit, answer, message=malformed_answers(count))
                    else:
                        self.log.warning(
                            "Doc2X answered the status of %s malformed (%d in a row): %s",
                            _what(unit),
                            count,
                            answer,
                        )
                    continue
                if not isinstance(answer, Doc2XTransientError) and malformed.pop(id(unit), 0):
                    for entry in unit:  # answered well: the count starts again (no answer is no news)
                        entry.pop(MALFORMED, None)
                if isinstance(answer, Doc2XRateLimitError) and is_pdf(head) and answer.http_status != 429:
                    # A limit code in a PDF's status answer is the service refusing the task.
                    self._fail(unit, answer)
                    limited_round = max(limited_round, 1 + int(head.get("round") or 0))
                elif isinstance(answer, Doc2XTransientError):
                    # No answer (a 5xx, a reset): the service's failure, not this job's. Asked again
                    # next round, within max_consecutive_errors rounds in a row for the whole wait.
                    transient.append(answer)
                elif isinstance(answer, Doc2XAuthError):
                    # The key itself is refused: no other job can do better.
                    self.log.error("Doc2X refused the API key: %s", answer)
                    return make_event(EVENT_ERROR, jobs, answer.summary, code=answer.failure_code)
                elif isinstance(answer, Doc2XError):
                    self._fail(unit, _lost_upload(head, answer))
                elif answer.status == protocol.STATUS_FAILED:
                    failure = answer.failure()
                    self._fail(unit, failure)
                    if isinstance(failure, Doc2XRateLimitError):
                        limited_round = max(limited_round, 1 + int(head.get("round") or 0))
                elif (
                    is_pdf(head) and answer.result is not None and (problem := page_map_problem(unit, answer))
                ):
                    self.log.error(
                        "Doc2X's result for PDF %s does not map back to its images (%s): %s",
                        head["uid"],
                        problem,
                        _names(unit),
                    )
                    self._fail(unit, Doc2XProtocolError(problem, uid=head["uid"]), message=PAGE_MAP_MISMATCH)
                else:
                    status = answer.status
                    known = status != protocol.STATUS_AWAITING_PICKUP  # Doc2X knows the uid: it landed
                    for entry in unit:
                        # The provider's own "awaiting pickup" stays in the worker: a job is processing.
                        entry["status"] = status if known else protocol.STATUS_PROCESSING
                        if known:
                            entry.pop("uncertain", None)
                    if on_result is not None and answer.result is not None:
                        await on_result(unit, answer)
            polled = {id(unit) for unit, _ in answers}
            finished = [unit for unit, _ in answers if is_finished(unit[0])]
            pdfs_done += sum(1 for unit in finished if is_pdf(unit[0]))
            pending = [unit for unit in pending if id(unit) not in polled] + [
                unit for unit, _ in answers if not is_finished(unit[0])
            ]
            failed_rounds = failed_rounds + 1 if transient else 0
            done = sum(is_finished(entry) for entry in jobs)
            progress.update(_ended(jobs))
            more = _more_to_submit(jobs)
            if more and (not pending or (pdfs_at_start and 2 * pdfs_done >= pdfs_at_start)):
                if limited_round:
                    await self._back_off(limited_round)
                return make_event(EVENT_PROGRESS, jobs, f"{done}/{len(jobs)} done; more PDFs to submit")
            if not pending:
                failed = any(entry["status"] != protocol.STATUS_SUCCESS for entry in jobs)
                return make_event(EVENT_FAILED if failed else EVENT_SUCCESS, jobs, f"{done}/{len(jobs)} done")
            if failed_rounds > self.max_consecutive_errors:
                last = transient[-1]
                self.log.error("Doc2X status calls failed %d rounds in a row; last: %s", failed_rounds, last)
                status = f", HTTP {last.http_status}" if last.http_status else ""
                return make_event(
                    EVENT_ERROR,
                    jobs,
                    f"Doc2X status calls failed {failed_rounds} rounds in a row; the last failure was "
                    f"{last.summary} (code {last.failure_code}{status})",
                    code=last.failure_code,
                )
            remaining = self.deadline - time.time()
            if remaining <= 0:
                return self._timeout(jobs)
            await asyncio.sleep(min(self.poll_interval, remaining))

    async def _round(
        self, pending: list[list[dict[str, Any]]]
    ) -> list[tuple[list[dict[str, Any]], protocol.Doc2XJobStatus | Doc2XError]]:
        """One round of status calls, one per uid, front of the line first, until enough say "not finished"."""
        answers: list[tuple[list[dict[str, Any]], protocol.Doc2XJobStatus | Doc2XError]] = []
        unfinished = 0
        line = iter(pending)

        async def caller() -> None:
            nonlocal unfinished
            for unit in line:  # one line shared by the callers: each uid is asked once
                if unfinished >= self.max_concurrent_polls:
                    return
                head = unit[0]
                async with poll_turns():
                    try:
                        answer: protocol.Doc2XJobStatus | Doc2XError
                        if is_pdf(head):
                            answer = await self.hook.pdf.aget_pdf_status(
                                head["uid"], uploaded_at=head.get("uploaded_at")
                            )
                        else:
                            answer = await self.hook.aget_job_status(head["uid"])
                    except Doc2XError as error:  # anything else is a bug: let it surface
                        answer = error
                answers.append((unit, answer))
                if not (isinstance(answer, protocol.Doc2XJobStatus) and answer.is_terminal):
                    unfinished += 1

        # No more callers than jobs: a thousand one-job triggers must not make eight coroutines each
        # per round (their frames are what the garbage collector walks while they wait their turn).
        callers = min(self.max_concurrent_polls, len(pending))
        await (caller() if callers == 1 else asyncio.gather(*(caller() for _ in range(callers))))
        return answers

    async def _back_off(self, attempt: int) -> None:
        """Wait before the task submits again after a refusal for the limits (never past the deadline)."""
        settings = await self.hook.aget_settings()
        ceiling = min(settings.retry_wait_max, settings.retry_wait * 2 ** (attempt - 1))
        pause = min(random.uniform(ceiling / 2, ceiling), max(0.0, self.deadline - time.time()))
        self.log.info("Doc2X refused a PDF for its limits; waiting %.1fs before more are submitted", pause)
        await asyncio.sleep(pause)

    def _fail(self, unit: list[dict[str, Any]], error: Doc2XError, *, message: str | None = None) -> None:
        """Mark jobs failed with their code and a fixed text; the server's own words go to the log only."""
        self.log.warning("Doc2X %s failed: %s", _what(unit), error)
        for entry in unit:
            entry.update(failed_job(entry["source"], entry.get("sha256"), error, uid=entry.get("uid")))
            entry.pop("uncertain", None)
            entry.pop(MALFORMED, None)
            if message is not None:
                entry["message"] = message

    @staticmethod
    def _timeout(jobs: list[dict[str, Any]]) -> dict[str, Any]:
        waiting = sum(not is_finished(entry) for entry in jobs)
        return make_event(
            EVENT_TIMEOUT, jobs, f"{waiting} of {len(jobs)} Doc2X jobs were not finished at the deadline"
        )


def _units(entries: Any) -> list[list[dict[str, Any]]]:
    """Jobs grouped by what one status call answers (lane and uid), in the order of their first job."""
    units: dict[tuple[bool, Any], list[dict[str, Any]]] = {}
    for entry in entries:
        units.setdefault((is_pdf(entry), entry.get("uid")), []).append(entry)
    return list(units.values())


def _ended(jobs: list[dict[str, Any]]) -> int:
    """Jobs that are over for this task: finished, and not a PDF-lane image to be tried again.

    What a progress line counts: an image of a failed PDF that is sent again is not done yet, so the
    count never goes back when it is.
    """
    return sum(is_finished(entry) and retry_plan(entry) is None for entry in jobs)


def _more_to_submit(jobs: list[dict[str, Any]]) -> bool:
    """Whether the task has PDF-lane images to submit: queued, or to try again."""
    return any(is_queued(entry) or retry_plan(entry) is not None for entry in jobs)


def _lost_upload(head: dict[str, Any], error: Doc2XError) -> Doc2XError:
    """A PDF whose PUT lost its answer and that Doc2X does not know after the pickup delay: it did not land."""
    if is_pdf(head) and head.get("uncertain") and isinstance(error, Doc2XJobNotFoundError):
        return Doc2XSubmitUncertainError(
            f"The upload of PDF {head['uid']} lost its answer, and Doc2X does not know the uid after the "
            "pickup delay; a new try of the task submits its images again",
            uid=head["uid"],
        )
    return error


def _what(unit: list[dict[str, Any]]) -> str:
    """A unit for a log line: its PDF and images, or its job and image."""
    head = unit[0]
    if is_pdf(head):
        return f"PDF {head.get('uid')} ({_names(unit)})"
    return f"job {head.get('uid')} of {head.get('source')}"


def _names(unit: list[dict[str, Any]], most: int = 10) -> str:
    """The images of a unit, for a log line: the first few sources."""
    sources = [entry["source"] for entry in unit]
    more = f", and {len(sources) - most} more" if len(sources) > most else ""
    return ", ".join(sources[:most]) + more
