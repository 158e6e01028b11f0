"""
Throughput at the key's limit: N images through one task, then through tasks sharing the key.

    python bench/throughput.py                 # 300 images, 30 images per 3 s, 1 s processing
    python bench/throughput.py --images 120 --tasks 4

Every run is real Airflow tasks: ``airflow dags test`` of ``bench/dags/doc2x_bench.py``, whose
``parse`` task is deferrable (it submits, defers, its trigger waits in line, it resumes and fetches),
through Airflow's task runner and its task state store (Airflow 3.3).

Prints the sustained upload rate divided by the window's limit (target: at least 0.95), measured
at the server from its limit-th billed upload to its last (once the window is in use), and the
end-to-end rate: from the first task's start to the last task's end, as Airflow recorded them (the
task instances' ``running`` and ``success`` events in the metadata database's audit log on
Airflow 3, the run's log lines on 2.11; the CLI's start-up and DAG parsing are not in it, the
deferral round trip and the last jobs' processing are). Then the server's count of 429 answers,
images not parsed (the task's XCom, or its error naming them), and the most any one image was
billed (target: 1).

For the one task, also end to end from the first upload to the last record: from the server's
first billed upload (its time of day read by polling ``/local/stats``, to 20 ms) to the task's
``Doc2X: records of N images made`` log line (its end, for a release that does not log it),
against the ideal, the last window's start plus the processing time,
``(ceil(images / limit) - 1) * window + processing``, as a ratio (target: at least 0.95 for 300
images at 30 per 3 s and 1 s processing).

"Tasks sharing a key" runs that many ``airflow dags test`` processes at once, each over its share
of the images, sharing the host's pacing folder (``DOC2X_PACING_DIR``): what mapped tasks in a pool
of that many slots do on one worker host. Separate processes rather than mapped tasks of one
LocalExecutor deployment, because the figure is the pacing between task processes of one host,
which needs no scheduler (``bench/mapped_pool.py`` runs mapped tasks in a deployment), and because
``dags test`` runs on both Airflow lines; each process has its own Airflow home and SQLite
database, since SQLite takes one writer at a time. A last run gives each process its own pacing
folder, to show the 429 storm that shared pacing prevents.
"""

from __future__ import annotations

import argparse
import math
import os
import time

from _airflow import HOW, TaskRun, migrated_database, operator_times, start
from _support import SCRATCH, FirstBilling, LocalServer, figures, make_images, report


def run_tasks(
    name: str, image_groups: list[list[str]], env: dict[str, str], *, shared_pacing: bool
) -> tuple[float, int, list[TaskRun]]:
    """One ``airflow dags test`` per group, all at once; the tasks' span, the images parsed, the runs."""
    tasks: list[TaskRun] = []
    for index, group in enumerate(image_groups):
        pacing = SCRATCH / (f"pacing-{name}" if shared_pacing else f"pacing-{name}-{index}")
        tasks.append(
            start(
                f"{name}-{index}",
                {"image_path": group, "deferrable": True, "poll_interval": 0.25},
                env={**env, "DOC2X_PACING_DIR": str(pacing)},
            )
        )
    parsed = 0
    for task, group in zip(tasks, image_groups, strict=True):
        task.wait()
        parsed += task.parsed(len(group))
    spans = [task.span() for task in tasks]
    seconds = (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()
    return seconds, parsed, tasks


def first_upload_to_last_record(
    billing: FirstBilling, task: TaskRun, args: argparse.Namespace
) -> list[tuple[str, object]]:
    """
    The one task's end to end against the ideal: from the server's first billed upload to the
    task's ``records of N images made`` line (its end, for a release that does not log it), beside
    the last window's start plus the processing time.
    """
    ideal = (math.ceil(args.images / args.limit) - 1) * args.window + args.processing
    billing.stop()
    if billing.at is None:
        return [("first upload to last record", "unknown (the server billed nothing)")]
    records = operator_times(task.output).get("records")
    last, what = (records["at"], "records made") if records else (task.span()[1], "the task's end")
    seconds = (last - billing.at).total_seconds()
    return [
        (
            "first upload to last record",
            f"{seconds:.2f} s (the server's first billing to {what}; the first billing read to 20 ms)",
        ),
        (
            "ideal (last window's start + processing)",
            f"{ideal:.2f} s = ({math.ceil(args.images / args.limit)} windows - 1) x {args.window:g} s "
            f"+ {args.processing:g} s",
        ),
        ("end to end / ideal (target >= 0.95)", f"{ideal / seconds:.3f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument(
        "--limit", type=int, default=30, help="images per window, at the server and in pacing"
    )
    parser.add_argument("--window", type=float, default=3.0, help="seconds")
    parser.add_argument("--processing", type=float, default=1.0, help="seconds a job stays processing")
    parser.add_argument("--tasks", type=int, default=4, help="tasks sharing the key")
    args = parser.parse_args()

    server = LocalServer("--processing-time", str(args.processing))
    env = {
        "AIRFLOW_CONN_DOC2X_DEFAULT": server.connection_json(
            rate_limit_images=args.limit, rate_limit_window=args.window
        )
    }
    images = make_images(args.images)
    print(
        f"# throughput {HOW}, deferrable: {args.images} images, limit {args.limit} per {args.window:g} s "
        f"(= {args.limit / args.window:.2f} images/s), processing {args.processing:g} s, {os.cpu_count()} cores",
        flush=True,
    )
    migrated_database()

    runs = [
        ("one task, all images", "one", 1, True),
        (f"{args.tasks} tasks sharing the key", "shared", args.tasks, True),
        (f"{args.tasks} tasks, each pacing alone (no shared window)", "alone", args.tasks, False),
    ]
    for title, name, tasks, shared in runs:
        server.reset()
        server.configure(rate_limit=args.limit, rate_window=args.window, processing_time=args.processing)
        time.sleep(args.window)  # let the previous run's window empty at the server
        billing = FirstBilling(server) if tasks == 1 else None
        seconds, parsed, runs = run_tasks(
            name, [images[index::tasks] for index in range(tasks)], env, shared_pacing=shared
        )
        rows = figures(server, len(images), seconds, parsed, args.limit, args.window)
        if billing is not None:
            rows += first_upload_to_last_record(billing, runs[0], args)
        report(title, rows)


if __name__ == "__main__":
    main()
