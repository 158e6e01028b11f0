"""How an operator's execution waits for its jobs: deferred to the triggerer, or in the worker.

Both run the one wait loop (:class:`~airflow_provider_doc2x.waiting.JobWaiter`) with the same
deadline; the PDF lane waits again and again (a few PDFs in flight at a time), each wait ending in
the next PDFs' submission, until nothing is pending. Kept apart from the operator so that the
operator holds its arguments and its steps, and this holds the mechanics of a wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_doc2x import protocol, transport
from airflow_provider_doc2x.events import (
    EVENT_FAILED,
    EVENT_PROGRESS,
    EVENT_SUCCESS,
    is_finished,
    is_pending,
    make_event,
    validate_event,
)
from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.records import outcomes_from_event, result_keeper
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from airflow_provider_doc2x.wait_state import WaitImages, is_packed
from airflow_provider_doc2x.waiting import JobWaiter

if TYPE_CHECKING:
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.pdf_lane.lane import PdfLane
    from airflow_provider_doc2x.spending import Spending
    from airflow_provider_doc2x.storage.results import ResultStore

Jobs = list[dict[str, Any]]


class TaskWaits:
    """The waits of one execution of a task.

    :param hook: the task's hook (its settings read in the worker's thread already).
    :param results: where results go, or None (XCom).
    :param log: the task's logger.
    :param defer: the operator's ``defer`` when it is deferrable, else None (it waits here).
    :param trigger_kwargs: the trigger's ``doc2x_conn_id``, ``poll_interval`` and ``max_concurrent_polls``.
    :param timeout: seconds a wait may take.
    :param spending: the task's usage (what it carries across a deferral; the time it waits here).
    :param images: where a deferred task keeps its images (its XCom), or None outside a task: the
        jobs then go to the trigger one per image.
    """

    def __init__(
        self,
        hook: Doc2XHook,
        *,
        results: ResultStore | None,
        log: Any,
        defer: Callable[..., Any] | None,
        trigger_kwargs: dict[str, Any],
        timeout: float,
        spending: Spending | None,
        images: WaitImages | None = None,
    ) -> None:
        """Keep the parts; nothing waits until asked."""
        self.hook = hook
        self.results = results
        self.log = log
        self.defer = defer
        self.trigger_kwargs = trigger_kwargs
        self.timeout = timeout
        self.spending = spending
        self.images = images

    def wait(self, jobs: Jobs, known: dict[str, dict[str, Any]], *, defer: bool = True) -> dict[str, Any]:
        """Wait for the jobs: deferred to the triggerer (this returns only in the worker), or here.

        In the worker the wait runs on the transport's loop, and ``known`` keeps the results its
        polls bring, so that they are not fetched again.
        """
        deadline = time.time() + self.timeout
        if defer and self.defer is not None and not all(is_finished(job) for job in jobs):
            self.defer(
                trigger=Doc2XImageParseTrigger(
                    jobs=self.images.pack(jobs) if self.images is not None else jobs,
                    deadline=deadline,
                    carried=self.spending.carried() if self.spending is not None else None,
                    **self.trigger_kwargs,
                ),
                method_name="execute_complete",
                # Airflow's own guard, after the trigger's deadline, in case the triggerer is lost.
                timeout=timedelta(seconds=self.timeout + 60),
            )
        began = time.monotonic()
        waiter = JobWaiter(
            self.hook,
            jobs,
            poll_interval=self.trigger_kwargs["poll_interval"],
            deadline=deadline,
            max_concurrent_polls=self.trigger_kwargs["max_concurrent_polls"],
            log=self.log,
        )
        try:
            return transport.run_sync(waiter.wait(on_result=result_keeper(self.hook, self.results, known)))
        finally:
            if self.spending is not None:
                self.spending.waited(time.monotonic() - began)

    def resumed(self, event: Any) -> dict[str, Any]:
        """A resumed task's event, checked, with its jobs one per image again, their images read from XCom.

        Packed jobs are checked as they are unpacked; jobs of an event of earlier releases, one by one.

        Raises:
            Doc2XError: the event is malformed, or packed and the task has no task instance to read
                its images from.
        """
        packed = isinstance(event, dict) and is_packed(event.get("jobs"))
        if self.images is not None:
            return validate_event(self.images.unpacked(event), jobs_checked=packed)
        if packed:
            raise Doc2XError(
                "The Doc2X trigger's event names the task's images by their place, and this execution "
                "has no task instance to read them from (the context has no 'ti')"
            )
        return validate_event(event)

    def forget(self) -> None:
        """The task no longer waits: what it kept for its waits is emptied."""
        if self.images is not None:
            self.images.forget()

    @contextmanager
    def forgotten_on_failure(self) -> Iterator[None]:
        """A resume's block: when it fails (not when it defers again), the task no longer waits."""
        try:
            yield
        except TaskDeferred:
            raise
        except BaseException:
            self.forget()
            raise

    def pdf_records(self, lane: PdfLane, jobs: Jobs, *, defer: bool = True) -> Jobs:
        """Wait for the PDFs in flight and submit the next ones until none is left; then the records.

        Deferred (the task resumes after each wait), or in the worker.
        """
        known: dict[str, dict[str, Any]] = {}
        while any(is_pending(entry) for entry in jobs):
            event = validate_event(self.wait(jobs, known, defer=defer))
            if event["status"] != EVENT_PROGRESS:
                break
            jobs = lane.advance(event["jobs"])
        else:
            failed = any(entry["status"] != protocol.STATUS_SUCCESS for entry in jobs)
            event = make_event(EVENT_FAILED if failed else EVENT_SUCCESS, jobs, "nothing left to wait for")
        return self.records_of(event, known)

    def records_of(self, event: Any, known: dict[str, dict[str, Any]] | None = None) -> Jobs:
        """A wait's outcomes (results fetched and stored; the jobs of the others), and how long that took."""
        began = time.monotonic()
        try:
            outcomes = outcomes_from_event(self.hook, event, results=self.results, known=known)
        finally:
            self.forget()  # the waits are over, well or not: the images are in the outcomes or the error
        self.log.info("Doc2X: records of %d images made in %.3f s", len(outcomes), time.monotonic() - began)
        return outcomes
