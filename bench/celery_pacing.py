"""
Mapped Doc2X tasks sharing one key on several worker hosts of a Celery deployment: pacing in Redis,
each host pacing alone, and each host pacing alone in a pool of one slot.

    python bench/celery_pacing.py             # 240 images in 8 mapped tasks, 3 hosts, 30 images per 10 s
    python bench/celery_pacing.py --images 120 --runs redis,hosts

Starts the production-shaped deployment of ``tests/helpers/deployment.py`` on loopback:
PostgreSQL, Redis (Celery's broker, and the pacing store), CeleryExecutor with ``--workers``
Celery workers that each stand for a host (own hostname, own ``DOC2X_PACING_DIR``), two
triggerers, scheduler, dag-processor and API server; beside it the local Doc2X server. Then it runs
the mapped DAGs of ``bench/dags`` three ways:

- redis: the connection's ``pacing_conn_id`` names the deployment's Redis, so every host paces the
  key's uploads in one window;
- hosts: no ``pacing_conn_id``: each Celery worker paces with its own host's folder only;
- hosts-in-pool: the same, in a ``doc2x`` pool of one slot (one task of the key uploads at a time).

Prints, for each, the sustained upload rate divided by the key's limit (at the server, from its
limit-th billed upload to its last, once the window is in use), 429 answers, images that did not
come back parsed, images billed twice, and the mapped tasks that needed a second try.
"""

from __future__ import annotations

import argparse
import atexit
from pathlib import Path

from _support import SCRATCH, LocalServer, make_images
from mapped_pool import run_and_report

from tests.helpers import AIRFLOW_VERSION
from tests.helpers.deployment import CeleryDeployment


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--tasks", type=int, default=8, help="mapped tasks (the images split evenly)")
    parser.add_argument("--workers", type=int, default=3, help="Celery workers, each a host of its own")
    parser.add_argument("--concurrency", type=int, default=2, help="task slots of each Celery worker")
    parser.add_argument(
        "--limit", type=int, default=30, help="images per window, at the server and in pacing"
    )
    parser.add_argument("--window", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--processing", type=float, default=10.0, help="seconds a job stays processing (as at Doc2X)"
    )
    parser.add_argument("--pool-slots", type=int, default=1, help="slots of the 'doc2x' pool")
    parser.add_argument(
        "--runs",
        default="redis,hosts,hosts-in-pool",
        help="which of the runs, comma-separated (redis, hosts, hosts-in-pool)",
    )
    args = parser.parse_args()
    if AIRFLOW_VERSION < (3, 3):
        raise SystemExit("this bench deploys Airflow 3.3's components and REST API")
    missing = CeleryDeployment.missing()
    if missing:
        raise SystemExit(f"cannot deploy with Celery here: {missing}")

    server = LocalServer("--processing-time", str(args.processing))
    limits = {"rate_limit_images": args.limit, "rate_limit_window": args.window}
    images = make_images(args.images)
    chunks = [images[index :: args.tasks] for index in range(args.tasks)]
    print(
        f"# mapped tasks on Celery hosts: {args.images} images in {args.tasks} mapped tasks, "
        f"{args.workers} worker hosts x {args.concurrency} slots, limit {args.limit} per {args.window:g} s "
        f"(= {args.limit / args.window:.2f} images/s), processing {args.processing:g} s"
    )
    deployment = CeleryDeployment(
        SCRATCH / "celery-deployment",
        server.connection_json(**limits),
        dags_folder=Path(__file__).parent / "dags",
        workers=args.workers,
        worker_concurrency=args.concurrency,
        env={
            # The same key, paced in the deployment's Redis (the redis connection it provides).
            "AIRFLOW_CONN_DOC2X_SHARED_PACING": server.connection_json(
                **limits, pacing_conn_id=CeleryDeployment.pacing_conn_id
            ),
            # Two busy cores may delay a heartbeat: no task taken for dead while it works.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "120",
        },
    )
    atexit.register(deployment.stop)
    deployment.set_pool("doc2x", args.pool_slots)

    hosts = f"{args.workers} hosts"
    every_run = {
        "redis": (f"{hosts}, pacing in Redis (pacing_conn_id), default pool", "doc2x_mapped_shared_pacing"),
        "hosts": (f"{hosts}, each pacing alone, default pool", "doc2x_mapped"),
        "hosts-in-pool": (
            f"{hosts}, each pacing alone, pool 'doc2x' of {args.pool_slots} slot(s)",
            "doc2x_mapped_in_pool",
        ),
    }
    for name in args.runs.split(","):
        title, dag_id = every_run[name]
        run_and_report(deployment, server, args, chunks, title, dag_id, {"hosts": 0})


if __name__ == "__main__":
    main()
