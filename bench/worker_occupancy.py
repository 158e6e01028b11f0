"""
Worker-seconds held per task: deferrable against not deferrable, while Doc2X takes 20 s per job.

    python bench/worker_occupancy.py                  # 3 tasks of 1 image, 20 s processing
    python bench/worker_occupancy.py --processing 5

Each task is a real Airflow task: ``airflow dags test`` of ``bench/dags/doc2x_bench.py``, one image,
through Airflow's task runner (and its task state store on Airflow 3.3). A deferrable task holds a
worker to check and submit (until it defers) and again to fetch the results when it resumes; the
wait runs in the trigger (in line under ``dags test``, as a triggerer would run it). The worker-
seconds are read from what Airflow recorded of the task instance: on Airflow 3, the ``running``,
``deferred`` and ``success`` events of the metadata database's audit log; on Airflow 2.11, whose
``dags test`` records only the end there, the run's own log lines (start of each run of the task
to its deferral or end). The trigger's wait is read from the log lines around the in-line trigger.
Target: deferrable holds a worker under 1 s per task.
"""

from __future__ import annotations

import argparse

from _airflow import HOW, migrated_database, run
from _support import SCRATCH, LocalServer, make_images, report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processing", type=float, default=20.0)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    args = parser.parse_args()
    server = LocalServer("--processing-time", str(args.processing))
    env = {
        "AIRFLOW_CONN_DOC2X_DEFAULT": server.connection_json(),
        "DOC2X_PACING_DIR": str(SCRATCH / "pacing"),
    }
    print(
        f"# worker occupancy {HOW}, deferrable and not: {args.tasks} tasks of 1 image, "
        f"processing {args.processing:g} s",
        flush=True,
    )
    migrated_database()

    for deferrable in (True, False):
        images = make_images(args.tasks, prefix=f"occupancy-{deferrable}")
        held, waited, sources = [], [], set()
        for number, image in enumerate(images):
            task = run(
                f"occupancy-{'deferrable' if deferrable else 'worker'}-{number}",
                {"image_path": image, "deferrable": deferrable, "poll_interval": args.poll_interval},
                env=env,
            ).must_succeed()
            spans, source = task.held()
            sources.add(source)
            held.append(sum((end - start).total_seconds() for start, end in spans))
            waited += task.trigger_waits()
            if deferrable and not task.trigger_waits():
                raise SystemExit(f"{task.name}: the deferrable task did not defer\n{task.tail()}")
        rows = [
            ("worker-seconds per task (mean)", f"{sum(held) / len(held):.3f}"),
            ("worker-seconds per task (max)", f"{max(held):.3f}"),
        ]
        if waited:
            rows.append(("seconds waited in the trigger (mean)", f"{sum(waited) / len(waited):.1f}"))
        rows.append(("read from", ", ".join(sorted(sources))))
        report("deferrable" if deferrable else "not deferrable", rows)


if __name__ == "__main__":
    main()
