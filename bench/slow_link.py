"""
At the key's limit on a slow link: uploads side by side, against one upload after another.

    python bench/slow_link.py                       # limit 30 per 3 s, uploads 1x, 3x and 10x the slot interval
    python bench/slow_link.py --images 60 --multiples 1,10

The local server receives each upload's body over ``upload_seconds`` (a slow link: Doc2X warns
that uploads from outside mainland China are slow), and counts an upload in the key's window when
its body has arrived. For each upload time (a multiple of the window's slot interval,
window / limit) it runs, in one process each, on the same images:

- this provider's operator in a real Airflow task (``airflow dags test`` of
  ``bench/dags/doc2x_bench.py``, through Airflow's task runner), ``method="async"`` and deferrable
  (submit, defer, the trigger waits in line, resume), default ``max_concurrent_uploads``;
- the same with ``method="sync"`` (each request also waits for the parse; nothing to defer);
- a naive loop: one ``requests.post`` after another, sleeping ``Retry-After`` on a 429;
- the vendor SDK's way: 5 requests in flight (threads), sleeping ``Retry-After`` on a 429.

The naive contenders are plain scripts, not Airflow tasks: they stand for code without this provider.
Printed: the sustained upload rate at the server (from its limit-th billed upload to its last, once
the window is in use) divided by the limit, beside what dating every slot from its answer would
allow (the rule of earlier releases, and of a key that learned that its server counts late): an
upload in flight holds its slot, so ``limit / (window + upload time)`` (``+ processing`` for the
synchronous endpoint, whose answer comes after the parse). The key's default rule dates a slot
from when its body was sent (``bench/window_rule.py`` measures both). Then the server's 429 count
and the most any image was billed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _airflow import HOW, migrated_database
from _airflow import run as run_task
from _support import SCRATCH, LocalServer, make_images, report, sustained_rate

NAIVE = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import requests

url, key, images, in_flight = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])

def upload(path):
    body = open(path, "rb").read()
    session = requests.Session()
    while True:
        answer = session.post(url + "/api/v2/async/parse/img/layout", data=body,
                              headers={"Authorization": "Bearer " + key}, timeout=120)
        if answer.status_code == 429:
            time.sleep(float(answer.headers.get("retry-after", "1")))
            continue
        answer.raise_for_status()
        return answer.json()["data"]["uid"]

with ThreadPoolExecutor(in_flight) as pool:
    print(len(list(pool.map(upload, images))))
"""


def run(name: str, command: list[str] | str, env: dict[str, str], images: list[str]) -> tuple[int, float]:
    """
    Run one contender in its own process; return how many images it got through, and in how many
    seconds: a task's from its start to its end as Airflow recorded them, a script's its process's.
    """
    if isinstance(command, str):  # this provider: a method of the operator, in a real task
        task = run_task(
            name,
            {
                "image_path": images,
                "method": command,
                "deferrable": command == "async",
                "poll_interval": 0.25,
            },
            env={name: env[name] for name in ("AIRFLOW_CONN_DOC2X_DEFAULT", "DOC2X_PACING_DIR")},
        )
        first, last = task.span()
        return task.parsed(len(images)), (last - first).total_seconds()
    started = time.monotonic()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if finished.returncode != 0:
        raise SystemExit(f"{command[2][:40]!r} failed:\n{finished.stderr[-3000:]}")
    return int(finished.stdout.strip().splitlines()[-1]), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=120, help="images per run")
    parser.add_argument(
        "--limit", type=int, default=30, help="images per window, at the server and in pacing"
    )
    parser.add_argument("--window", type=float, default=3.0, help="seconds")
    parser.add_argument("--processing", type=float, default=0.5, help="seconds a job takes at the server")
    parser.add_argument(
        "--multiples", default="1,3,10", help="upload times, in slot intervals (window / limit)"
    )
    parser.add_argument(
        "--contenders", default="async,sync,naive,naive-5", help="which of async, sync, naive, naive-5 to run"
    )
    args = parser.parse_args()

    server = LocalServer("--processing-time", str(args.processing))
    connection = server.connection_json(rate_limit_images=args.limit, rate_limit_window=args.window)
    env = {**os.environ, "AIRFLOW_CONN_DOC2X_DEFAULT": connection}
    images = make_images(args.images)
    interval = args.window / args.limit
    print(
        f"# slow link, this provider {HOW} (method=async deferrable; method=sync): {args.images} images "
        f"per run, limit {args.limit} per {args.window:g} s (slot interval {interval:g} s), "
        f"processing {args.processing:g} s, {os.cpu_count()} cores",
        flush=True,
    )
    contenders: dict[str, tuple[str, list[str] | str]] = {
        "async": ("this provider, method=async, deferrable", "async"),
        "sync": ("this provider, method=sync", "sync"),
        "naive": (
            "naive loop, one upload after another",
            [sys.executable, "-c", NAIVE, server.url, server.api_key, json.dumps(images), "1"],
        ),
        "naive-5": (
            "5 uploads in flight (the vendor SDK's way)",
            [sys.executable, "-c", NAIVE, server.url, server.api_key, json.dumps(images), "5"],
        ),
    }
    if {"async", "sync"} & set(args.contenders.split(",")):
        migrated_database()
    for multiple in [float(value) for value in args.multiples.split(",")]:
        upload = multiple * interval
        for name in args.contenders.split(","):
            title, command = contenders[name]
            server.reset()
            server.configure(
                rate_limit=args.limit,
                rate_window=args.window,
                processing_time=args.processing,
                upload_seconds=upload,
            )
            time.sleep(args.window)  # let the previous run's window empty, at the server and in pacing
            env["DOC2X_PACING_DIR"] = str(SCRATCH / f"pacing-{name}-{multiple:g}")
            parsed, seconds = run(f"slow-link-{name}-{multiple:g}", command, env, images)
            stats = server.stats()
            limit_rate = args.limit / args.window
            sustained = sustained_rate(stats, args.limit)
            answered_late = args.processing if name == "sync" else 0.0
            rule = args.limit / (args.window + upload + answered_late)
            report(
                f"uploads of {upload:g} s ({multiple:g}x the slot interval): {title}",
                [
                    ("sustained uploads/s / limit", f"{sustained / limit_rate:.3f}"),
                    ("dating slots from answers would allow / limit", f"{rule / limit_rate:.3f}"),
                    ("most uploads in flight at once", stats["max_uploads_in_flight"]),
                    ("429 answers", stats["rate_limited"]),
                    ("images through", f"{parsed} of {args.images} in {seconds:.1f} s"),
                    ("max billings of one image", stats["max_billed_per_image"]),
                ],
            )


if __name__ == "__main__":
    main()
