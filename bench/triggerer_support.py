"""What ``bench/triggerer.py`` runs inside Airflow's triggerer: a lag probe trigger and the bench's DAG.

The probe is delivered to the triggerer like any deferred task's trigger (a trigger row bound to a
task instance); the triggerer imports this module by its classpath, so the bench puts ``bench/`` on
the triggerer's ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

#: The bench's DAG: ``probe`` carries the lag probe, ``wait`` one Doc2X trigger per mapped instance.
#: The bench writes it with the number of triggers in place of ``{triggers}``; nothing schedules it
#: (no scheduler runs), the bench moves its task instances itself, through Airflow's execution API.
DAG_FILE = '''"""Task instances for bench/triggerer.py to defer (never scheduled: no scheduler runs)."""

from __future__ import annotations

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

with DAG("doc2x_triggerer_bench", schedule=None, catchup=False):
    EmptyOperator(task_id="probe")
    PythonOperator.partial(task_id="wait", python_callable=print).expand(
        op_args=[[number] for number in range({triggers})]
    )
'''


class LagProbeTrigger(BaseTrigger):
    """Wake every ``interval`` seconds in the triggerer's event loop and record how late each wake-up was.

    It runs while ``marker`` (a file it creates when it starts) exists, then fires one event with
    its samples: ``[wall time, lateness in ms]`` per wake-up, the worst full garbage collection
    (generation 2) it saw in the process, how many it saw, and ``gc.get_freeze_count()``. Lateness
    is what every trigger of the loop waits on top of its own timers: the loop was busy with
    something else (other triggers, a collection, Airflow's own work).

    :param marker: the file whose existence keeps the probe running (the bench deletes it).
    :param interval: seconds between two wake-ups.
    :param deadline: absolute Unix time at which the probe fires even if the marker is still there.
    """

    def __init__(self, *, marker: str, interval: float = 0.05, deadline: float) -> None:
        """Keep the JSON kwargs."""
        super().__init__()
        self.marker = marker
        self.interval = float(interval)
        self.deadline = float(deadline)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The classpath and kwargs the triggerer rebuilds the probe from."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"marker": self.marker, "interval": self.interval, "deadline": self.deadline},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Sample the loop's lateness until the marker is gone, then fire the samples."""
        samples: list[list[float]] = []
        collections = {"worst": 0.0, "count": 0, "started": 0.0}

        def time_collections(phase: str, info: dict[str, Any]) -> None:
            if info["generation"] != 2:
                return
            if phase == "start":
                collections["started"] = time.perf_counter()
            else:
                collections["count"] += 1
                collections["worst"] = max(collections["worst"], time.perf_counter() - collections["started"])

        # The marker's open and stat block the loop for microseconds (it is looked at once a
        # second), far below what the probe measures.
        with open(self.marker, "a"):  # noqa: ASYNC230
            pass
        gc.callbacks.append(time_collections)
        try:
            while time.time() < self.deadline:
                if len(samples) % max(1, round(1 / self.interval)) == 0 and not os.path.exists(self.marker):  # noqa: ASYNC240
                    break
                started = time.monotonic()
                await asyncio.sleep(self.interval)
                late = time.monotonic() - started - self.interval
                samples.append([round(time.time(), 3), round(late * 1000, 2)])
        finally:
            gc.callbacks.remove(time_collections)
        yield TriggerEvent(
            {
                "samples": samples,
                "worst_full_collection_ms": round(collections["worst"] * 1000, 2),
                "full_collections": collections["count"],
                "frozen_objects": gc.get_freeze_count(),
            }
        )
