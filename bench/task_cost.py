"""
Our own time per image through a real Airflow task, split into the task's parts: on SQLite
(``airflow dags test``) and on PostgreSQL with Celery (the production-shaped deployment).

    python bench/task_cost.py                        # 1,000 images, both places
    python bench/task_cost.py --images 300 --where sqlite

One deferrable ``Doc2XImageParseOperator`` task over ``--images`` images, a generous key (1,000
images per 1 s, at the local server and in the connection: no pacing wait), ``--processing`` 2 s
at the server, ``poll_interval`` 0.25 s:

- sqlite: ``airflow dags test`` of ``bench/dags/doc2x_bench.py`` (``bench/_airflow.py``): the task
  runs through Airflow's task runner, its task state store writes go to SQLite, its trigger runs in
  line in the same process;
- postgres: ``tests.helpers.deployment.CeleryDeployment`` (PostgreSQL, Redis, one Celery worker of
  one slot, one triggerer, scheduler, dag-processor, API server), a run of
  ``bench/dags/doc2x_task_cost.py`` triggered through the REST API: the task runs on the Celery
  worker, its task state store writes go through the API server to PostgreSQL, its trigger runs in
  the triggerer, and the scheduler resumes it. Airflow 3.3 only.

Printed per place, per image in milliseconds unless said otherwise:

- checking, uploading, task state store writes (their count and time, part of the uploading) and
  fetching (the records made after the wait): what the operator logs of its own time
  (``Doc2X: checked ...``, ``... submitted in ... (task state store: ...)``, ``records of ...
  made in ...``); a release that does not log a line shows "not logged";
- waiting: from the task's deferral to its resume, as Airflow recorded them (the task instance's
  audit log on Airflow 3, the run's log lines on 2.11, ``TaskRun.held``);
- our time per image end to end: the task's first start to its last end, as Airflow recorded
  them, less the server's processing time, divided by the images (the CLI's start-up and the DAG's
  parsing are not in it);
- worker CPU per image: on SQLite the ``dags test`` process's CPU (task and trigger), less that of
  a run of one image, over the other images; on the deployment the Celery worker host's CPU (worker,
  pool, supervisor and task processes) during the run, over the images, and the API server's
  beside it (every call it served during the run, the task's state-store writes among them);
- the tail: from the last job's completion at the server (its last billed upload plus the
  processing time; the first billing's time of day is read by polling ``/local/stats``, to 20 ms) to
  the task's end, beside the poll interval and the fetching time;
- on the deployment, the scheduler's resume latency: from the triggerer's ``Trigger fired event``
  log line to the task's ``running`` again in the audit log.

``bench/batch_cost.py`` runs the same work without a task runner: its figure is the library
overhead (harness, no task runner), not what a task costs.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from _airflow import DAGS, HOW, log_times, migrated_database, operator_times, run, spans_of
from _support import SCRATCH, FirstBilling, LocalServer, make_images, report

DAG_ID = "doc2x_task_cost"


def on_sqlite(args: argparse.Namespace, server: LocalServer, images: list[str], env: dict) -> dict:
    """The task through ``airflow dags test``; a run of one image first, for the CPU's fixed part."""
    migrated_database()
    operator = {"deferrable": True, "poll_interval": args.poll_interval}
    prepare(args, server)
    one = run("task-cost-one", {**operator, "image_path": images[:1]}, env=env).must_succeed()
    prepare(args, server)
    billing = FirstBilling(server)
    task = run("task-cost", {**operator, "image_path": images}, env=env).must_succeed()
    stats = server.stats()
    spans, held_how = task.held()
    cpu = (task.cpu_seconds - one.cpu_seconds) / (len(images) - 1) if len(images) > 1 else task.cpu_seconds
    return {
        "spans": spans,
        "held_how": held_how,
        "output": task.output,
        "parsed": task.parsed(len(images)),
        "stats": stats,
        "last_billed": billing.last(stats),
        "cpu": [
            (
                "worker CPU per image",
                f"{1000 * cpu:.2f} ms (the `dags test` process, task and trigger in line, "
                f"less a run of one image: {one.cpu_seconds:.1f} s)",
            )
        ],
    }


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants so far, the ended ones its processes waited for included."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def on_postgres(
    args: argparse.Namespace, server: LocalServer, images: list[str], connection: str
) -> dict | None:
    """The task on a Celery worker of the PostgreSQL deployment, its run triggered through the REST API."""
    from tests.helpers import AIRFLOW_VERSION
    from tests.helpers.deployment import CeleryDeployment

    if AIRFLOW_VERSION < (3, 3):
        print("\n## postgres: skipped (the deployment runs Airflow 3.3's components)")
        return None
    missing = CeleryDeployment.missing()
    if missing:
        print(f"\n## postgres: skipped (cannot deploy with Celery here: {missing})")
        return None
    started = time.monotonic()
    deployment = CeleryDeployment(
        SCRATCH / "celery-deployment",
        connection,
        dags_folder=DAGS,
        workers=1,
        worker_concurrency=1,
        triggerers=1,
        env={
            "DOC2X_BENCH_POLL_INTERVAL": str(args.poll_interval),
            # Two busy cores may delay a heartbeat: no task taken for dead while it works.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "120",
        },
    )
    atexit.register(deployment.stop)
    try:
        print(f"# deployment started in {time.monotonic() - started:.0f} s", flush=True)
        prepare(args, server)
        worker, api = deployment.processes["worker-1"].pid, deployment.processes["api-server"].pid
        cpu_before = tree_cpu(worker), tree_cpu(api)
        billing = FirstBilling(server)
        run_id = deployment.trigger(DAG_ID, {"images": images})
        state = deployment.wait_for_run(run_id, timeout=3600, must_succeed=False)
        cpu_after = tree_cpu(worker), tree_cpu(api)
        stats = server.stats()
        rows = deployment.sql(
            "SELECT event, dttm FROM log WHERE dag_id = %s AND run_id = %s AND task_id = 'parse' ORDER BY id",
            DAG_ID,
            run_id,
        )
        spans = spans_of([(event, dttm.astimezone(timezone.utc)) for event, dttm in rows])
        output = deployment.task_logs(run_id, "parse").get(1, "")
        if state != "success" or not spans:
            raise SystemExit(f"postgres: the run ended {state!r}\n{output[-3000:]}\n{deployment.logs()}")
        folder = deployment.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=parse"
        trigger_log = "\n".join(
            path.read_text(errors="replace") for path in sorted(folder.glob("*.trigger.*.log"))
        )
        resume = resume_latency(spans, trigger_log)
        return {
            "spans": spans,
            "held_how": "the audit log in PostgreSQL",
            "output": output,
            "parsed": len(deployment.xcom(run_id, "parse") or []),
            "stats": stats,
            "last_billed": billing.last(stats),
            "cpu": [
                (
                    "worker CPU per image",
                    f"{1000 * (cpu_after[0] - cpu_before[0]) / len(images):.2f} ms (the Celery worker host: "
                    "worker, pool, supervisor and task processes, during the run, the `images` task and two task starts included)",
                ),
                (
                    "API server CPU per image",
                    f"{1000 * (cpu_after[1] - cpu_before[1]) / len(images):.2f} ms (every call it served "
                    "during the run: the task's state-store writes, the scheduler's, the bench's polls)",
                ),
            ],
            "resume": (
                "; ".join(resume)
                + " (the trigger's log lines `trigger ... starting` and `Trigger fired event`, the task's"
                " `deferred` and `running` in the audit log)"
                if resume
                else "not found (no `Trigger fired event` line in the trigger's log before the resume)"
            ),
        }
    finally:
        deployment.stop()


def resume_latency(spans: list[tuple[datetime, datetime]], trigger_log: str) -> list[str]:
    """
    For each resume: from the trigger's event (its ``Trigger fired event`` line) to the task's
    ``running`` again, and from the deferral to the triggerer taking the trigger up (``trigger ...
    starting``).
    """
    began = log_times(trigger_log, r"trigger .* starting")
    fired = log_times(trigger_log, r"Trigger fired event")
    found = []
    for (_, deferred), (resumed, _) in itertools.pairwise(spans):
        event = max((at for at in fired if deferred <= at <= resumed), default=None)
        if event is None:
            continue
        text = f"{(resumed - event).total_seconds():.2f} s from the trigger's event to the task running again"
        taken = min((at for at in began if at >= deferred), default=None)
        if taken is not None:
            text += f" (the triggerer took the trigger up {(taken - deferred).total_seconds():.2f} s after the deferral)"
        found.append(text)
    return found


def prepare(args: argparse.Namespace, server: LocalServer) -> None:
    """An empty server with the run's key and processing time."""
    server.reset()
    server.configure(rate_limit=args.limit, rate_window=args.window, processing_time=args.processing)


def rows_of(args: argparse.Namespace, count: int, measured: dict[str, Any]) -> list[tuple[str, object]]:
    """The printed figures of one place, from what it measured."""
    lines = operator_times(measured["output"])
    spans = measured["spans"]
    start, end = spans[0][0], spans[-1][1]
    waits = [
        (resumed - deferred).total_seconds() for (_, deferred), (resumed, _) in itertools.pairwise(spans)
    ]

    def per_image(seconds: float) -> str:
        return f"{1000 * seconds / count:.2f} ms"

    def logged(name: str, text) -> str:
        return text(lines[name]) if name in lines else "not logged by this release"

    uploaded = lines.get("uploaded")
    fetching = lines["records"]["seconds"] if "records" in lines else None
    last_billed = measured["last_billed"]
    if last_billed is not None:
        completed = last_billed + timedelta(seconds=args.processing)
        tail_seconds = (end - completed).total_seconds()
        tail = (
            f"{tail_seconds:.2f} s from the last job's completion to the task's end "
            f"(poll interval {args.poll_interval:g} s, fetching "
            + (
                f"{fetching:.2f} s; less the fetching {tail_seconds - fetching:.2f} s)"
                if fetching is not None
                else "not logged)"
            )
        )
    else:
        tail = "unknown (the server billed nothing)"
    stats = measured["stats"]
    return [
        (
            "images parsed",
            f"{measured['parsed']} of {count}, max billings of one image {stats['max_billed_per_image']}",
        ),
        ("checking per image", logged("checked", lambda line: per_image(line["seconds"]))),
        (
            "uploading per image",
            logged(
                "uploaded",
                lambda line: f"{per_image(line['seconds'])} ({line['verb']} in {line['seconds']:.2f} s)",
            ),
        ),
        (
            "  of which task state store writes",
            f"{per_image(uploaded['store_seconds'])} per image: {uploaded['writes']:.0f} writes "
            f"({uploaded['writes'] / count:.2f} per image) in {uploaded['store_seconds']:.3f} s"
            if uploaded
            else "not logged by this release",
        ),
        (
            "waiting (deferred) per image",
            f"{per_image(sum(waits))} ({sum(waits):.2f} s in {len(waits)} deferral(s), "
            f"processing {args.processing:g} s)"
            if waits
            else "never deferred",
        ),
        ("fetching (records made) per image", logged("records", lambda line: per_image(line["seconds"]))),
        ("first start to last end", f"{(end - start).total_seconds():.2f} s ({measured['held_how']})"),
        (
            "our time per image end to end",
            f"{per_image((end - start).total_seconds() - args.processing)} (less processing)",
        ),
        *measured["cpu"],
        ("tail", tail),
        *([("scheduler's resume latency", measured["resume"])] if "resume" in measured else []),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--processing", type=float, default=2.0, help="seconds a job stays processing")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="the operator's poll_interval")
    parser.add_argument(
        "--limit", type=int, default=1000, help="images per window, at the server and in pacing"
    )
    parser.add_argument("--window", type=float, default=1.0, help="seconds")
    parser.add_argument(
        "--where", default="sqlite,postgres", help="sqlite, postgres or both, comma-separated"
    )
    args = parser.parse_args()

    server = LocalServer("--processing-time", str(args.processing))
    connection = server.connection_json(rate_limit_images=args.limit, rate_limit_window=args.window)
    images = make_images(args.images)
    print(
        f"# task cost {HOW} (sqlite) and on a Celery + PostgreSQL deployment (postgres), deferrable: "
        f"{args.images} images, limit {args.limit} per {args.window:g} s, processing {args.processing:g} s, "
        f"poll_interval {args.poll_interval:g} s, {os.cpu_count()} cores; "
        f"started {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    places = {
        "sqlite": (
            "sqlite: `airflow dags test`",
            lambda: on_sqlite(args, server, images, {"AIRFLOW_CONN_DOC2X_DEFAULT": connection}),
        ),
        "postgres": (
            "postgres: Celery worker, PostgreSQL, through the REST API",
            lambda: on_postgres(args, server, images, connection),
        ),
    }
    for where in args.where.split(","):
        title, measure = places[where.strip()]
        measured = measure()
        if measured is not None:
            report(title, rows_of(args, args.images, measured))
    print(
        "\n(bench/batch_cost.py's figure is the library overhead, harness, no task runner: not a task's cost)"
    )


if __name__ == "__main__":
    main()
