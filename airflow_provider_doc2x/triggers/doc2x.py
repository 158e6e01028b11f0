"""
The trigger that waits for Doc2X jobs in the triggerer, so that no worker is held while Doc2X works.

One trigger polls every uid of a task, a few at a time, until each is finished or the absolute
deadline passes. Its kwargs are JSON (conn id, jobs, interval, deadline; never the key), so a
triggerer that restarts rebuilds it and resumes the same uids. Its one event carries uids and
statuses only; the task fetches the results itself when it resumes.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from airflow.providers.common.compat.sdk import conf
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import (
    EVENT_ERROR,
    EVENT_FAILED,
    EVENT_SUCCESS,
    EVENT_TIMEOUT,
    failed_job,
    is_finished,
    make_event,
)
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XProtocolError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook

#: What the worker's own wait does with each result a status call brings: (job, its status).
ResultCallback = Callable[[dict[str, Any], protocol.Doc2XJobStatus], Awaitable[None]]


class Doc2XImageParseTrigger(BaseTrigger):
    """
    Poll Doc2X until every job is done, then fire one event with each job's status.

    :param doc2x_conn_id: the ``doc2x`` connection; fetched the async way, inside the triggerer.
    :param jobs: one dict per image: ``uid`` and ``source`` (the image's name, for messages).
    :param poll_interval: seconds between two rounds of status calls.
    :param deadline: absolute Unix time after which the event reports a timeout, so that a
        restarted triggerer keeps the original budget instead of starting a new one.
    :param max_concurrent_polls: status calls in flight at once for this trigger.
    :param max_consecutive_errors: rounds in a row with transient failures tolerated before giving up.
    """

    def __init__(
        self,
        *,
        doc2x_conn_id: str,
        jobs: list[dict[str, Any]],
        poll_interval: float,
        deadline: float,
        max_concurrent_polls: int = 8,
        max_consecutive_errors: int = 5,
    ) -> None:
        super().__init__()
        self.doc2x_conn_id = doc2x_conn_id
        self.jobs = [dict(job) for job in jobs]
        self.poll_interval = float(poll_interval)
        self.deadline = float(deadline)
        self.max_concurrent_polls = max_concurrent_polls
        self.max_consecutive_errors = max_consecutive_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The classpath and JSON kwargs a triggerer rebuilds this trigger from (no key, no results)."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "doc2x_conn_id": self.doc2x_conn_id,
                "jobs": self.jobs,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "max_concurrent_polls": self.max_concurrent_polls,
                "max_consecutive_errors": self.max_consecutive_errors,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Wait in the triggerer's event loop, then fire the one event."""
        if frozen := freeze_startup_heap():
            self.log.info(
                "Froze the %d objects of this process's start-up heap out of garbage collection, so "
                "that full collections stay short for every trigger ([doc2x] freeze_triggerer_heap)",
                frozen,
            )
        hook = Doc2XHook(doc2x_conn_id=self.doc2x_conn_id)
        try:
            yield TriggerEvent(await self.wait(hook))
        finally:
            await hook.aclose()

    async def wait(self, hook: Doc2XHook, *, on_result: ResultCallback | None = None) -> dict[str, Any]:
        """
        Poll until every job is finished; return the event's payload.

        Jobs that arrive finished (a failed upload, a job an earlier try already finished) are not
        polled. The first round comes one interval after the start. The deadline holds even while a
        request drips: a round still running at the deadline is cancelled. The worker runs this
        same loop when the operator does not defer, and passes ``on_result`` to keep each result
        the polls bring (so it need not fetch it again); the triggerer never does (events carry no
        results).

        A round asks about the pending jobs in the order they were submitted (Doc2X finishes them
        in about that order) and ends early once ``max_concurrent_polls`` of its answers say "not
        finished": the jobs after those are most likely not finished either. Jobs found unfinished
        go to the back of the line, so a slow job never keeps the others from being asked. A batch
        of a thousand jobs costs about one status call per job, not one per job per round.
        """
        jobs = [dict(entry) for entry in self.jobs]
        pending = [entry for entry in jobs if not is_finished(entry)]
        failed_rounds = 0
        reported = 0  # "0/N done" is not news: log from the first finished job on
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
                answers = await asyncio.wait_for(self._round(hook, pending), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                return self._timeout(jobs)
            transient: list[Doc2XError] = []
            for entry, answer in answers:
                if isinstance(answer, (Doc2XTransientError, Doc2XProtocolError)):
                    # A status call is safe to repeat: a garbled answer (a proxy's page) is retried
                    # next round, like a 5xx, within max_consecutive_errors.
                    transient.append(answer)
                elif isinstance(answer, Doc2XAuthError):
                    # The key itself is refused: no other job can do better.
                    self.log.error("Doc2X refused the API key: %s", answer)
                    return make_event(EVENT_ERROR, jobs, answer.summary, code=answer.failure_code)
                elif isinstance(answer, Doc2XError):
                    self._fail(entry, answer)
                elif answer.status == protocol.STATUS_FAILED:
                    self._fail(entry, answer.failure())
                else:
                    entry.update(status=answer.status)
                    if on_result is not None and answer.result is not None:
                        await on_result(entry, answer)
            polled = {id(entry) for entry, _ in answers}
            pending = [entry for entry in pending if id(entry) not in polled] + [
                entry for entry, _ in answers if not is_finished(entry)
            ]
            failed_rounds = failed_rounds + 1 if transient else 0
            done = len(jobs) - len(pending)
            if done != reported:
                self.log.info("Doc2X: %d/%d done", done, len(jobs))
                reported = done
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
        self, hook: Doc2XHook, pending: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any], protocol.Doc2XJobStatus | Doc2XError]]:
        """One round of status calls, front of the line first, until enough say "not finished"."""
        answers: list[tuple[dict[str, Any], protocol.Doc2XJobStatus | Doc2XError]] = []
        unfinished = 0
        line = iter(pending)

        async def caller() -> None:
            nonlocal unfinished
            for entry in line:  # one line shared by the callers: each job is asked once
                if unfinished >= self.max_concurrent_polls:
                    return
                try:
                    answer: protocol.Doc2XJobStatus | Doc2XError = await hook.aget_job_status(entry["uid"])
                except Doc2XError as error:  # anything else is a bug: let it surface
                    answer = error
                answers.append((entry, answer))
                if not (isinstance(answer, protocol.Doc2XJobStatus) and answer.is_terminal):
                    unfinished += 1

        await asyncio.gather(*(caller() for _ in range(self.max_concurrent_polls)))
        return answers

    def _fail(self, entry: dict[str, Any], error: Doc2XError) -> None:
        """Mark a job failed with its code and fixed summary; the server's own words go to the log only."""
        self.log.warning("Doc2X job %s of %s failed: %s", entry.get("uid"), entry.get("source"), error)
        entry.update(failed_job(entry["source"], entry.get("sha256"), error, uid=entry.get("uid")))

    @staticmethod
    def _timeout(jobs: list[dict[str, Any]]) -> dict[str, Any]:
        waiting = sum(not is_finished(entry) for entry in jobs)
        return make_event(
            EVENT_TIMEOUT, jobs, f"{waiting} of {len(jobs)} Doc2X jobs were not finished at the deadline"
        )


_startup_heap_frozen = False


def freeze_startup_heap() -> int:
    """
    Take the triggerer's start-up heap out of CPython's garbage collections, once per process.

    Why: a thousand waiting triggers keep coroutines, tasks and requests alive across each round
    of polls, so CPython promotes them to its oldest generation and runs a full collection every
    few rounds. A full collection walks every tracked object, and Airflow's modules alone are some
    150,000 of them: about 100 ms during which no trigger of the process runs. ``gc.freeze()``
    moves the objects alive now (modules, classes, functions: nearly all live as long as the
    process) where collections no longer look, as Airflow's DAG processor does after start-up.
    Young garbage is collected first (a cheap, young-generation collection); what is frozen and
    later becomes cyclic garbage stays in memory, a one-time cost. ``[doc2x]
    freeze_triggerer_heap = False`` leaves the collector alone. Only a trigger's ``run`` calls
    this, so a worker's process is never frozen (``dag.test()``, which runs triggers in its own
    process, is). Returns how many objects it froze (0 when it did nothing).
    """
    global _startup_heap_frozen
    if _startup_heap_frozen:
        return 0
    _startup_heap_frozen = True
    if not conf.getboolean("doc2x", "freeze_triggerer_heap", fallback=True):
        return 0
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()
