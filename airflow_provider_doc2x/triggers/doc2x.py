"""The trigger that waits for Doc2X jobs in the triggerer, so that no worker is held while Doc2X works.

A thin adapter: its kwargs say what to wait for, and its ``run`` hands them to the one wait loop,
:class:`airflow_provider_doc2x.waiting.JobWaiter`, which a worker runs too.

One trigger polls every uid of a task, a few at a time, until each is finished or the absolute
deadline passes. Its kwargs are JSON (conn id, jobs, interval, deadline; never the key), so a
triggerer that restarts rebuilds it and resumes the same uids. Its one event carries uids and
statuses only; the task fetches the results itself when it resumes.

The PDF lane's jobs are one per image too: the trigger asks Doc2X's PDF status once per PDF and
updates each of its images, and hands the task back (a ``progress`` event) when PDFs remain to be
submitted (see :mod:`airflow_provider_doc2x.pdf_lane.lane`).

A task's jobs come *packed* (:mod:`airflow_provider_doc2x.wait_state`): grouped by what they
share, the images named by their place in the task's list, their sources and sha256 kept in the
task's XCom. The event goes back packed the same way, without the image lane's uids (the task
keeps them too), so that neither grows with the images of a PDF, and an event with none of a task's
images. The one-job-per-image list of earlier releases is still taken, and answered in kind.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator
from typing import Any

from airflow.exceptions import AirflowProviderDeprecationWarning
from airflow.providers.common.compat.sdk import conf
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import Job
from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.wait_state import is_packed, pack, unpack
from airflow_provider_doc2x.waiting import JobWaiter


class Doc2XImageParseTrigger(BaseTrigger):
    """Poll Doc2X until every job is done, then fire one event with each job's status.

    :param doc2x_conn_id: the ``doc2x`` connection; fetched the async way, inside the triggerer.

    The other kwargs are the wait's, as :class:`~airflow_provider_doc2x.waiting.JobWaiter` takes
    them: ``jobs`` (packed, or one per image; typed on the way in, :class:`~airflow_provider_doc2x.events.Job`),
    ``poll_interval``, ``deadline`` (absolute, so that a restarted triggerer keeps the original
    budget instead of starting a new one), ``max_concurrent_polls`` and ``max_consecutive_errors``.

    :param carried: what the task carries across the deferral (its usage so far: a few numbers),
        handed back in the event as ``carried``. In the event, not in the resumed task's kwargs:
        ``airflow dags test`` resumes a task with the event alone.
    """

    def __init__(
        self,
        *,
        doc2x_conn_id: str,
        jobs: list[dict[str, Any]] | dict[str, Any],
        poll_interval: float,
        deadline: float,
        max_concurrent_polls: int = 8,
        max_consecutive_errors: int = 5,
        carried: dict[str, Any] | None = None,
    ) -> None:
        """Keep the JSON kwargs: each job checked and in its compact form."""
        super().__init__()
        self.doc2x_conn_id = doc2x_conn_id
        # Typed at the boundary: a job that is not one is refused here, in the task that defers.
        # Packed jobs stay packed across the boundary: ``token`` names the task's images.
        self.token: str | None = None
        if isinstance(jobs, dict) and is_packed(jobs):
            self.jobs = unpack(jobs)
            self.token = jobs["images"]
        elif isinstance(jobs, list):
            self.jobs = [Job.from_json(job).to_json() for job in jobs]
        else:
            raise Doc2XError(f"The Doc2X trigger was handed jobs that are not a list: {protocol.quote(jobs)}")
        self.poll_interval = float(poll_interval)
        self.deadline = float(deadline)
        self.max_concurrent_polls = max_concurrent_polls
        self.max_consecutive_errors = max_consecutive_errors
        self.carried = carried if isinstance(carried, dict) else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The classpath and JSON kwargs a triggerer rebuilds this trigger from (no key, no results)."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "doc2x_conn_id": self.doc2x_conn_id,
                "jobs": self._out(self.jobs, uids=True),
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "max_concurrent_polls": self.max_concurrent_polls,
                "max_consecutive_errors": self.max_consecutive_errors,
                **({"carried": self.carried} if self.carried else {}),
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
            event = await self.waiter(hook).wait()
            event = {**event, "jobs": self._out(event["jobs"], uids=False)}
            yield TriggerEvent({**event, "carried": self.carried} if self.carried else event)
        finally:
            await hook.aclose()

    def _out(self, jobs: list[dict[str, Any]], *, uids: bool) -> list[dict[str, Any]] | dict[str, Any]:
        """Jobs as they leave: packed again when they came packed (an event without the image lane's uids)."""
        return pack(jobs, self.token, uids=uids) if self.token is not None else jobs

    async def wait(self, hook: Doc2XHook, *, on_result: Any = None) -> dict[str, Any]:
        """The wait of earlier releases' trigger: :meth:`waiter` ``(hook).wait()`` now, with a warning."""
        warnings.warn(
            "Doc2XImageParseTrigger.wait(hook) is Doc2XImageParseTrigger.waiter(hook).wait() now",
            AirflowProviderDeprecationWarning,
            stacklevel=2,
        )
        return await self.waiter(hook).wait(on_result=on_result)

    def waiter(self, hook: Doc2XHook) -> JobWaiter:
        """The wait this trigger stands for, on ``hook``'s connection, logging to the trigger's log."""
        return JobWaiter(
            hook,
            self.jobs,
            poll_interval=self.poll_interval,
            deadline=self.deadline,
            max_concurrent_polls=self.max_concurrent_polls,
            max_consecutive_errors=self.max_consecutive_errors,
            log=self.log,
        )


_startup_heap_frozen = False


def freeze_startup_heap() -> int:
    """Take the triggerer's start-up heap out of CPython's garbage collections, once per process.

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
