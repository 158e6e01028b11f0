"""
What the tests and the benches share: the repository's paths, the suite's API key, waiting with a
deadline, running Airflow's CLI and ``airflow dags test``, one try of a deferrable task, and a task
state store. Test modules import from here, never from each other or from ``conftest``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: The key the suite's local server accepts.
API_KEY = "sk-test-0123"
#: The Airflow line under test, as (major, minor).
AIRFLOW_VERSION = tuple(int(part) for part in version("apache-airflow").split(".")[:2])
#: Airflow 3.3 brought the task state store (what a new try reconnects through).
HAS_TASK_STATE_STORE = AIRFLOW_VERSION >= (3, 3)
#: A local server's processing time no job ends in during a test; lowered to 0 once the test has
#: seen what happens while Doc2X works (readiness follows the current processing time).
STILL_PROCESSING = 3600.0


def wait_until(condition, *, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll ``condition`` until it returns something truthy, and return that; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def async_wait_until(
    condition, *, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"
):
    """:func:`wait_until` for a coroutine: the event loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StateStore:
    """The task state store's interface (get/set), kept across the tries of one test."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}

    def get(self, key, default=None):
        return self.values.get(key, default)

    def set(self, key, value, **_):
        json.dumps(value)  # what the real store accepts
        self.values[key] = value

    def pdfs(self) -> dict[str, dict]:
        """Each PDF's newest record, oldest first, as a new try reads them."""
        from airflow_provider_doc2x.journal import recorded_pdfs

        return recorded_pdfs(self.get)


class TaskInstance:
    """What the operator asks of Airflow's task instance outside a task: its names, ``xcom_push`` and ``xcom_pull``.

    A value pushed is kept as XCom's JSON serialization gives it back (a tuple comes back a list).
    """

    def __init__(self, *, run_id="scheduled__2026-12-01", map_index=-1, try_number=1, task_id="parse"):
        self.dag_id, self.task_id, self.run_id = "nightly", task_id, run_id
        self.map_index, self.try_number = map_index, try_number
        self.xcom: dict[str, object] = {}

    def xcom_push(self, key, value) -> None:
        self.xcom[key] = json.loads(json.dumps(value))

    def xcom_pull(self, task_ids=None, key="return_value", *, map_indexes=None, **_):
        """This task instance's own XCom (what a task reads of itself when it resumes)."""
        assert task_ids in (None, self.task_id) and map_indexes in (None, self.map_index)
        return json.loads(json.dumps(self.xcom.get(key)))


async def first_event(trigger) -> dict:
    """Run a trigger to its first event, as the triggerer does, and return the event's payload."""
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def event_jobs(event: dict, ti: TaskInstance | None = None) -> list[dict]:
    """An event's jobs, one per image: as they are (earlier releases), or unpacked with the images ``ti`` keeps."""
    from airflow_provider_doc2x.wait_state import WAIT_XCOM_KEY, is_packed, unpack

    if not is_packed(event["jobs"]):
        return event["jobs"]
    return unpack(event["jobs"], ti.xcom[WAIT_XCOM_KEY]["images"] if ti is not None else None)


def parse_operator(images, **kwargs):
    """A ``Doc2XImageParseOperator`` over these images, polling fast (the suite's jobs take 0.2 s)."""
    from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

    kwargs.setdefault("poll_interval", 0.05)
    return Doc2XImageParseOperator(task_id="parse", image_path=[str(image) for image in images], **kwargs)


def run_deferred(op, context: dict[str, Any]):
    """One try of a deferrable task: execute, run its trigger to its event, resume."""
    import pytest
    from airflow.providers.common.compat.sdk import TaskDeferred

    context.setdefault("ti", TaskInstance(try_number=None))  # where a deferred task keeps its images
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    event = asyncio.run(first_event(deferred.value.trigger))
    return getattr(op, deferred.value.method_name)(context, event, **(deferred.value.kwargs or {}))


class DeferredRun:
    """A deferrable task run half by half, keeping what Airflow's database would: kwargs, events, XCom."""

    def __init__(self, op, ti: TaskInstance, context: dict | None = None):
        self.op, self.ti = op, ti
        self.context = {"ti": ti, **(context or {})}
        self.kwargs: list[dict] = []
        self.events: list[dict] = []
        self.xcoms: list[object] = []

    def to_the_end(self):
        from airflow.providers.common.compat.sdk import TaskDeferred

        from airflow_provider_doc2x.wait_state import WAIT_XCOM_KEY

        call = lambda: self.op.execute(self.context)  # noqa: E731
        while True:
            try:
                return call()
            except TaskDeferred as deferred:
                self.kwargs.append(json.loads(json.dumps(deferred.trigger.serialize()[1])))
                self.xcoms.append(self.ti.xcom.get(WAIT_XCOM_KEY))
                event = json.loads(json.dumps(asyncio.run(first_event(deferred.trigger))))
                self.events.append(event)
                method = getattr(self.op, deferred.method_name)
                call = lambda method=method, event=event: method(self.context, event)  # noqa: E731


def use_connection(monkeypatch, doc2x, **extra) -> None:
    """Point the default ``doc2x`` connection at the local server, with these extras."""
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(**extra))


def run_to_the_end(op, context: dict[str, Any]) -> tuple[Any, int]:
    """Every half of a deferrable task, as the triggerer and the scheduler run them; returns (result, deferrals).

    Each trigger's kwargs are checked for the API key on the way (they are stored in Airflow's database).
    """
    import json

    from airflow.providers.common.compat.sdk import TaskDeferred

    deferrals = 0
    context.setdefault("ti", TaskInstance(try_number=None))  # where a deferred task keeps its images

    def call():
        return op.execute(context)

    while True:
        try:
            return call(), deferrals
        except TaskDeferred as deferred:
            deferrals += 1
            # What Airflow's database keeps: the trigger's kwargs, and the kwargs the task resumes with.
            kwargs = json.dumps([deferred.trigger.serialize()[1], deferred.kwargs or {}])
            event = asyncio.run(first_event(deferred.trigger))
            method = getattr(op, deferred.method_name)

            def call(method=method, event=event, resumed_with=deferred.kwargs or {}):
                return method(context, event, **resumed_with)

        assert API_KEY not in kwargs


def airflow_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``airflow ARGS`` of the venv under test with extra environment; return what it did."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def register_assets(env: dict[str, str]) -> None:
    """On Airflow 3.0, the DAGs and their assets in the database first, as the dag-processor does.

    Airflow 3.0's ``dags test`` does not register a DAG's assets, and a task with an outlet then
    fails as "inactive assets"; later lines register them.
    """
    if (3, 0) <= AIRFLOW_VERSION < (3, 1):
        registered = airflow_cli("dags", "reserialize", env=env)
        assert registered.returncode == 0, (registered.stdout + registered.stderr)[-3000:]


def dags_test(dag_id: str, conf: dict, doc2x, *, dags_folder: Path | None = None) -> str:
    """``airflow dags test DAG -c CONF`` against the local server; the run must succeed. Returns its output."""
    env = {"AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json()}
    if dags_folder is not None:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder)
    register_assets(env)
    result = airflow_cli("dags", "test", dag_id, "-c", json.dumps(conf), env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


class FakeClock:
    """A clock the test moves by hand (pacing's exact rules, with no waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upload_times(limiter, clock: FakeClock, count: int, duration: float = 0.0) -> list[float]:
    """When each of ``count`` back-to-back uploads of ``duration`` seconds may start, on a fake clock."""
    starts = []
    while len(starts) < count:
        delay, slot = limiter.reserve()
        if slot is None:
            clock.now += delay
            continue
        starts.append(clock.now - 1000)
        clock.now += duration
        limiter.release(slot)
    return starts


def pacing_logs(caplog, level: int = logging.WARNING) -> list[str]:
    """What pacing logged at ``level``."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("airflow_provider_doc2x.pacing") and record.levelno == level
    ]


def image_uploads(store, log, *, may_hold=True, max_concurrent=None):
    """The image lane of a task whose journal is ``store`` (a task state store, or None), on ``doc2x_default``."""
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.image_lane.uploads import ImageUploads
    from airflow_provider_doc2x.journal import TaskJournal

    return ImageUploads(
        Doc2XHook(),
        journal=TaskJournal(store, may_hold=may_hold),
        results=None,
        log=log,
        max_concurrent=max_concurrent,
    )
