"""
Mapped Doc2X tasks sharing one key in a real Airflow deployment, with and without a pool.

    python bench/mapped_pool.py             # 240 images in 8 mapped tasks, 30 images per 10 s
    python bench/mapped_pool.py --images 120 --tasks 4

Starts Airflow 3.3's API server, scheduler (LocalExecutor, 4 worker slots), dag-processor and
triggerer on loopback beside the local server, and runs the mapped DAG of ``bench/dags`` three ways:

- one host, default pool: the worker slots of a host share its pacing window;
- 4 hosts, default pool: 4 tasks upload at once and each host paces alone, as separate machines
  do (each task's map index picks its host's pacing window);
- 4 hosts, a ``doc2x`` pool of 1 slot: one task of the key uploads at a time, on whichever host;
  a deferred task lets go of its slot, so the next task uploads while Doc2X works on the last.

Prints, for each, the sustained upload rate divided by the key's limit (at the server, from its
limit-th billed upload to its last, once the window is in use), 429 answers, images that did not
come back parsed, and the most any one image was billed.
"""

from __future__ import annotations

import argparse
import atexit
import time
from pathlib import Path

from _support import SCRATCH, LocalServer, figures, make_images, report

from tests.helpers import AIRFLOW_VERSION
from tests.helpers.deployment import Deployment


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--tasks", type=int, default=8, help="mapped tasks (the images split evenly)")
    parser.add_argument("--slots", type=int, default=4, help="LocalExecutor worker slots")
    parser.add_argument(
        "--limit", type=int, default=30, help="images per window, at the server and in pacing"
    )
    parser.add_argument("--window", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--processing",
        type=float,
        default=10.0,
        help="seconds a job stays processing (seconds, as at Doc2X; jobs done within a second or two "
        "of the deferral can meet Airflow 3.3.2's deferral race: see docs/production.md)",
    )
    parser.add_argument("--pool-slots", type=int, default=1, help="slots of the 'doc2x' pool")
    parser.add_argument(
        "--runs",
        default="one-host,hosts,hosts-in-pool",
        help="which of the runs, comma-separated (one-host, hosts, hosts-in-pool)",
    )
    args = parser.parse_args()
    if AIRFLOW_VERSION < (3, 3):
        raise SystemExit("this bench deploys Airflow 3.3's components and REST API")

    server = LocalServer("--processing-time", str(args.processing))
    connection = server.connection_json(rate_limit_images=args.limit, rate_limit_window=args.window)
    images = make_images(args.images)
    chunks = [images[index :: args.tasks] for index in range(args.tasks)]
    print(
        f"# mapped tasks in a deployment: {args.images} images in {args.tasks} mapped tasks, "
        f"{args.slots} worker slots, limit {args.limit} per {args.window:g} s "
        f"(= {args.limit / args.window:.2f} images/s), processing {args.processing:g} s"
    )
    deployment = Deployment(
        SCRATCH / "deployment",
        connection,
        dags_folder=Path(__file__).parent / "dags",
        parallelism=args.slots,
    )
    atexit.register(deployment.stop)
    deployment.set_pool("doc2x", args.pool_slots)

    every_run = {
        "one-host": ("one host, default pool", "doc2x_mapped", 1),
        "hosts": (f"{args.slots} hosts, default pool", "doc2x_mapped", args.slots),
        "hosts-in-pool": (
            f"{args.slots} hosts, pool 'doc2x' of {args.pool_slots} slot(s)",
            "doc2x_mapped_in_pool",
            args.slots,
        ),
    }
    runs = [every_run[name] for name in args.runs.split(",")]
    for number, (title, dag_id, hosts) in enumerate(runs):
        conf = {"hosts": hosts, "pacing_dir": str(SCRATCH / f"pacing-{number}")}
        run_and_report(deployment, server, args, chunks, title, dag_id, conf)


def run_and_report(
    deployment, server, args, chunks: list[list[str]], title: str, dag_id: str, conf: dict
) -> None:
    """One run of a mapped DAG of ``bench/dags`` over ``chunks``, from an empty window; print its figures."""
    server.reset()
    server.configure(rate_limit=args.limit, rate_window=args.window, processing_time=args.processing)
    time.sleep(args.window)  # let the previous run's window empty at the server
    started = time.monotonic()
    run_id = deployment.trigger(dag_id, {"chunks": chunks, **conf})
    state = deployment.wait_for_run(run_id, timeout=3600, must_succeed=False)
    seconds = time.monotonic() - started
    tasks = len(chunks)
    parsed = sum(len(deployment.xcom(run_id, "parse", map_index) or []) for map_index in range(tasks))
    retried = sum(
        deployment.task_instance(run_id, "parse", map_index).get("try_number", 1) > 1
        for map_index in range(tasks)
    )
    rows = figures(server, args.images, seconds, parsed, args.limit, args.window)
    billed_twice = sum(count > 1 for count in server.stats()["billed"].values())
    report(
        f"{title} (run {state})",
        [*rows, ("images billed twice", billed_twice), ("mapped tasks that needed a second try", retried)],
    )


if __name__ == "__main__":
    main()
