"""
A thousand Doc2X triggers in Airflow's own triggerer process, arriving after it started.

    python bench/triggerer.py                        # 1000 triggers, 60 s processing, 2 s polls
    python bench/triggerer.py --triggers 200
    python bench/triggerer.py --freeze off           # only the run with the collector untouched

Starts a metadata database (SQLite in a private AIRFLOW_HOME), the local Doc2X server and an
``airflow triggerer`` process (Airflow 3.3: it runs the triggers in a subprocess of its own, the
trigger runner), and only then defers task instances of a bench DAG the way a worker does: for
each one, an image is uploaded, the task instance is started and deferred through Airflow's
execution API (``PATCH .../run``, then ``PATCH .../state`` with the trigger's classpath and
kwargs), which writes the trigger row the triggerer picks up (50 per loop, its default). Nothing
else runs: no scheduler, so the task instances stay "scheduled" with the event in their
``next_kwargs``, where the bench reads it.

The first Doc2X trigger arrives alone, and the others once it has polled: as in a triggerer that
has served Doc2X tasks for a while, the start-up heap is frozen out of garbage collection
(``[doc2x] freeze_triggerer_heap``) before the thousand triggers exist, not with them. Each mode
(``--freeze on,off``) gets a fresh triggerer process and DAG run.

Prints, per mode:

- triggers whose event arrived with every job successful, and trigger rows left in the database;
- resident memory per trigger: the trigger runner's peak RSS while the triggers wait, less its RSS
  after the first Doc2X trigger ran (target: under 50 KB);
- the event-loop lag seen by the bench's lag probe (``triggerer_support.LagProbeTrigger``, a
  trigger of the same loop waking every 50 ms; target: under 100 ms) while the triggers arrive
  and wait, against the probe alone before them; the worst full garbage collection of the
  runner process; and Airflow's own watchdog ("Triggerer's async thread was blocked for X
  seconds", logged above ``[triggerer] blocked_main_thread_warning_threshold``, 0.2 s: its sleep
  of 0.1 s plus 100 ms of lag);
- status requests per job at the local server (target: no more than processing / poll + 2).

Airflow 3.3 only. Airflow 2.11's triggerer runs its triggers in a thread of its own process, and
its workers write trigger rows to the database themselves (no execution API), so this bench
would need another path there.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
from _support import SCRATCH, LocalServer, make_images, report
from cryptography.fernet import Fernet

BENCH = Path(__file__).resolve().parent
DAG_ID = "doc2x_triggerer_bench"
# A home and database of the bench's own, even when started from a test session that has its own:
# the triggerer would otherwise run the session's triggers.
HOME = SCRATCH / "airflow-home"
os.environ["AIRFLOW_HOME"] = str(HOME)
DAGS = SCRATCH / "dags"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ.setdefault("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
# The bench's own process (the execution API it calls, the hook) logs warnings only; the triggerer
# logs at INFO, the level its watchdog's warning is logged at.
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
os.environ.setdefault("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
BLOCKED = re.compile(r"Triggerer's async thread was blocked for ([0-9.]+) seconds")


def airflow(*args: str, env: dict[str, str] | None = None) -> None:
    """Run an ``airflow`` command of this environment; fail with its output."""
    command = [str(Path(sys.executable).parent / "airflow"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env or os.environ.copy())
    if done.returncode:
        raise SystemExit(f"airflow {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Triggerer:
    """``airflow triggerer`` in its own process group, its output in a log file."""

    def __init__(self, name: str, capacity: int, freeze: bool) -> None:
        self.log_path = HOME / f"triggerer-{name}.log"
        self.started = time.time()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
            "AIRFLOW__DOC2X__FREEZE_TRIGGERER_HEAP": str(freeze),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "airflow"),
                    "triggerer",
                    "--capacity",
                    str(capacity),
                    "--skip-serve-logs",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.runner = wait_for(self._runner, 180, "the triggerer's trigger runner to start")

    def _runner(self) -> psutil.Process | None:
        if self.process.poll() is not None:
            raise SystemExit(f"the triggerer exited:\n{self.log()[-3000:]}")
        children = psutil.Process(self.process.pid).children()
        return children[0] if len(children) == 1 and self._heartbeating() else None

    def _heartbeating(self) -> bool:
        from airflow.jobs.job import Job
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            beat = session.scalar(
                select(Job.latest_heartbeat).where(
                    Job.job_type == "TriggererJob", Job.state == "running", Job.end_date.is_(None)
                )
            )
        return beat is not None and beat.timestamp() >= self.started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class Worker:
    """What a worker does to defer a task instance, through Airflow's execution API (in-process)."""

    def __init__(self) -> None:
        from airflow.api_fastapi.execution_api.app import InProcessExecutionAPI
        from airflow.sdk.api.client import Client

        self.client = Client(
            base_url=None, token="", dry_run=True, transport=InProcessExecutionAPI().transport
        )
        self.client.base_url = "http://in-process.invalid./"  # type: ignore[assignment]

    def defer(self, ti_id, trigger, timeout: timedelta) -> None:
        from airflow._shared.timezones import timezone
        from airflow.sdk.execution_time.comms import DeferTask
        from airflow.sdk.serde import serialize

        self.client.task_instances.start(ti_id, os.getpid(), timezone.utcnow())
        classpath, kwargs = trigger.serialize()
        self.client.task_instances.defer(
            ti_id,
            DeferTask(
                classpath=classpath,
                trigger_kwargs=serialize(kwargs),
                trigger_timeout=timeout,
                next_method="execute_complete",
                next_kwargs=serialize({}),
            ),
        )


def new_run(run_id: str) -> dict[tuple[str, int], object]:
    """A DAG run of the bench DAG, its task instances queued (as the scheduler leaves them)."""
    from airflow._shared.timezones import timezone
    from airflow.models.dagbag import DBDagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from sqlalchemy import select, update

    with create_session() as session:
        dag = DBDagBag().get_latest_version_of_dag(DAG_ID, session=session)
        now = timezone.utcnow()
        dag.create_dagrun(
            run_id=run_id,
            run_after=now,
            run_type=DagRunType.MANUAL,
            triggered_by=DagRunTriggeredByType.TEST,
            state=DagRunState.RUNNING,
            start_date=now,
            session=session,
        )
        session.flush()
        where = (TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id)
        session.execute(update(TaskInstance).where(*where).values(state=TaskInstanceState.QUEUED))
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.id).where(*where)
        )
        return {(task_id, map_index): ti_id for task_id, map_index, ti_id in rows}


def states(run_id: str, task_id: str) -> dict[str, int]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.state, func.count())
            .where(
                TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id
            )
            .group_by(TaskInstance.state)
        )
        return {str(state): count for state, count in rows}


def events(run_id: str, task_id: str) -> list[dict]:
    """The events the triggerer delivered to the task instances (stored in their ``next_kwargs``)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk.serde import deserialize
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        stored = session.scalars(
            select(TaskInstance.next_kwargs).where(
                TaskInstance.dag_id == DAG_ID,
                TaskInstance.run_id == run_id,
                TaskInstance.task_id == task_id,
                TaskInstance.state == "scheduled",
            )
        ).all()
    return [deserialize(kwargs)["event"] for kwargs in stored if kwargs]


def trigger_rows() -> int:
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.scalar(select(func.count(Trigger.id)))


class Peak(threading.Thread):
    """The highest RSS of a process (every 0.2 s), and the most trigger rows a triggerer held (every 1 s)."""

    def __init__(self, process: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.process, self.rss, self.running, self.stopped = process, 0, 0, threading.Event()
        self.start()

    def run(self) -> None:
        rounds = 0
        while not self.stopped.wait(0.2):
            self.rss = max(self.rss, self.process.memory_info().rss)
            rounds += 1
            if rounds % 5 == 0:
                self.running = max(self.running, running_triggers())


def running_triggers() -> int:
    """Trigger rows a triggerer has taken (the probe's included)."""
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.scalar(select(func.count(Trigger.id)).where(Trigger.triggerer_id.is_not(None)))


def lag_figures(samples: list[list[float]], start: float, end: float) -> tuple[float, float, int, int]:
    """Worst and 99th-percentile lateness (ms), samples over 100 ms, samples, between two wall times."""
    late = sorted(ms for at, ms in samples if start <= at <= end)
    if not late:
        return 0.0, 0.0, 0, 0
    return late[-1], late[min(len(late) - 1, int(len(late) * 0.99))], sum(ms > 100 for ms in late), len(late)


def run_mode(name: str, freeze: bool, args, server: LocalServer, image: bytes, worker: Worker) -> list:
    from triggerer_support import LagProbeTrigger

    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger

    run_id = f"freeze-{name}"
    tis = new_run(run_id)
    marker = SCRATCH / f"probe-{name}.running"
    wait = args.processing * 3 + 120  # each Doc2X trigger's budget, from its deferral: a guard
    hook = Doc2XHook()

    triggerer = Triggerer(name, capacity=max(1000, args.triggers + 1), freeze=freeze)
    try:
        lag_probe = LagProbeTrigger(marker=str(marker), deadline=time.time() + 3600)
        worker.defer(tis[("probe", -1)], lag_probe, timedelta(hours=1, minutes=1))
        wait_for(marker.exists, 120, "the lag probe to start in the triggerer")
        time.sleep(args.alone)  # the probe alone in the loop: what lag is there without Doc2X
        rss_before_any = triggerer.runner.memory_info().rss
        requests_before = server.stats()["requests"].get("status", 0)

        def defer(number: int) -> None:
            source = f"{name}-page-{number}.png"
            uid = hook.submit_image(image, source=source)
            trigger = Doc2XImageParseTrigger(
                doc2x_conn_id="doc2x_default",
                jobs=[{"uid": uid, "source": source}],
                poll_interval=args.poll_interval,
                deadline=time.time() + wait,  # the operator's: its timeout from the deferral
            )
            worker.defer(tis[("wait", number)], trigger, timedelta(seconds=wait + 60))

        # The first Doc2X trigger alone: once it has polled, the heap is frozen (or not) and the
        # trigger's modules and HTTP client are loaded; what comes after is what each trigger costs.
        first_deferred = time.time()
        defer(0)
        wait_for(
            lambda: server.stats()["requests"].get("status", 0) > requests_before,
            120,
            "the first Doc2X trigger to poll",
        )
        rss_baseline = triggerer.runner.memory_info().rss
        peak = Peak(triggerer.runner)
        arrivals_started = time.time()
        for number in range(1, args.triggers):
            defer(number)
        arrivals_ended = time.time()
        wait_for(
            lambda: not states(run_id, "wait").get("deferred"),
            wait + 120,
            "every Doc2X trigger's event",
            interval=0.5,
        )
        last_event = time.time()
        peak.stopped.set()
        peak.join()
        status_requests = server.stats()["requests"].get("status", 0) - requests_before
        marker.unlink()
        wait_for(lambda: states(run_id, "probe").get("scheduled"), 120, "the lag probe's event")
        rows_gone = time.monotonic() + 30  # the triggerer deletes a row once no task instance waits on it
        while trigger_rows() and time.monotonic() < rows_gone:
            time.sleep(0.5)
        rows_left = trigger_rows()
        probe = events(run_id, "probe")[0]
        delivered = events(run_id, "wait")
    finally:
        triggerer.stop()

    succeeded = sum(event["status"] == "success" for event in delivered)
    blocked = [float(found) for found in BLOCKED.findall(triggerer.log())]
    samples = probe["samples"]
    alone = lag_figures(samples, 0, first_deferred)
    loaded = lag_figures(samples, arrivals_started, last_event)
    # Per trigger waiting at the peak (less the probe and the first trigger, counted in the baseline).
    per_trigger = (peak.rss - rss_baseline) / max(1, peak.running - 2) / 1024
    return [
        ("triggers whose event says success", f"{succeeded}/{args.triggers}"),
        ("trigger rows left", str(rows_left)),
        ("most Doc2X triggers in the triggerer at once", str(max(0, peak.running - 1))),
        (
            "seconds: deferring / until the last event",
            f"{arrivals_ended - first_deferred:.1f} / {last_event - first_deferred:.1f}",
        ),
        (
            "trigger runner RSS: start / after the first trigger / peak (MiB)",
            f"{rss_before_any / 2**20:.0f} / {rss_baseline / 2**20:.0f} / {peak.rss / 2**20:.0f}",
        ),
        ("resident memory per trigger (KB)", f"{per_trigger:.1f}"),
        ("loop lag, probe alone: worst / p99 (ms)", f"{alone[0]:.1f} / {alone[1]:.1f} ({alone[3]} wake-ups)"),
        (
            "loop lag, triggers arriving and waiting: worst / p99 (ms)",
            f"{loaded[0]:.1f} / {loaded[1]:.1f} ({loaded[3]} wake-ups)",
        ),
        ("wake-ups more than 100 ms late", f"{loaded[2]}"),
        (
            "worst full garbage collection (ms), count",
            f"{probe['worst_full_collection_ms']:.1f}, {probe['full_collections']}",
        ),
        ("objects frozen out of collections", f"{probe['frozen_objects']}"),
        (
            "Airflow's watchdog: 'blocked' warnings, worst (s)",
            f"{len(blocked)}, {max(blocked, default=0):.2f}",
        ),
        ("status requests per job", f"{status_requests / args.triggers:.2f}"),
        ("bound: processing / poll + 2", f"{args.processing / args.poll_interval + 2:.2f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--triggers", type=int, default=1000)
    parser.add_argument(
        "--processing",
        type=float,
        default=60.0,
        help="seconds a job stays processing; long enough that the triggers deferred first still "
        "wait when the last arrive",
    )

    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument(
        "--alone", type=float, default=3.0, help="seconds the lag probe runs before the first Doc2X trigger"
    )
    parser.add_argument("--freeze", default="on,off", help="modes to run, comma-separated: on, off")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.freeze.split(",") if mode.strip()]
    if not modes or set(modes) - {"on", "off"}:
        parser.error("--freeze takes on, off or on,off")
    from tests.helpers import AIRFLOW_VERSION

    if AIRFLOW_VERSION < (3, 3):
        raise SystemExit("this bench runs Airflow 3.3's triggerer (see its docstring for 2.11)")

    server = LocalServer("--processing-time", str(args.processing), "--rate-limit", "100000")
    server.use_as_default_connection(rate_limit_images=100000, rate_limit_window=1)
    DAGS.mkdir(parents=True, exist_ok=True)
    from triggerer_support import DAG_FILE

    (DAGS / f"{DAG_ID}.py").write_text(DAG_FILE.replace("{triggers}", str(args.triggers)))
    airflow("db", "migrate")
    airflow("dags", "reserialize")
    image = Path(make_images(1)[0]).read_bytes()  # the server makes a job of every upload
    worker = Worker()
    print(
        f"# triggerer: {args.triggers} Doc2X triggers in an `airflow triggerer` process, deferred after it "
        f"started; processing {args.processing:g} s, poll every {args.poll_interval:g} s"
    )
    for mode in modes:
        report(
            f"[doc2x] freeze_triggerer_heap = {mode == 'on'}",
            run_mode(mode, mode == "on", args, server, image, worker),
        )


if __name__ == "__main__":
    main()
