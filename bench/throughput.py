"""
Throughput at the key's limit: N images through one operator, then through tasks sharing the key.

    python bench/throughput.py                 # 300 images, 30 images per 3 s, 1 s processing
    python bench/throughput.py --images 120 --tasks 4

Prints the sustained upload rate divided by the window's limit (target: at least 0.95), measured
at the server from its limit-th billed upload to its last (once the window is in use), and the
end-to-end rate (process start-up and the last jobs' processing included); the server's count of
429 answers, images dropped, and the most any one image was billed (target: 1).
"Tasks sharing a key" runs that many worker processes at once, each an operator over its share of
the images (what mapped tasks in a pool of that many slots do on one worker host); a last run
gives each process its own pacing window, to show the 429 storm that shared pacing prevents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _support import SCRATCH, LocalServer, figures, make_images, report

TASK = """
import json, sys
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator
from airflow_provider_doc2x.exceptions import Doc2XError
images = json.loads(sys.argv[1])
try:
    parsed = len(Doc2XImageParseOperator(task_id="parse", image_path=images, poll_interval=0.25).execute({}))
except Doc2XError as error:  # images that ran out of retries are named, one per line: the others parsed
    parsed = len(images) - sum(line.startswith("- ") for line in str(error).splitlines())
print(json.dumps(parsed))
"""


def run_tasks(image_groups: list[list[str]], *, shared_pacing: bool) -> tuple[float, int]:
    started = time.monotonic()
    workers = []
    for index, group in enumerate(image_groups):
        env = dict(os.environ)
        if not shared_pacing:
            env["DOC2X_PACING_DIR"] = str(SCRATCH / f"pacing-{index}")
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", TASK, json.dumps(group)], env=env, stdout=subprocess.PIPE, text=True
            )
        )
    parsed = 0
    for worker in workers:
        out, _ = worker.communicate(timeout=3600)
        if worker.returncode != 0:
            raise SystemExit(f"a task crashed (exit {worker.returncode})")
        parsed += int(out.strip().splitlines()[-1])
    return time.monotonic() - started, parsed


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
    server.use_as_default_connection(rate_limit_images=args.limit, rate_limit_window=args.window)
    images = make_images(args.images)
    print(
        f"# throughput: {args.images} images, limit {args.limit} per {args.window:g} s "
        f"(= {args.limit / args.window:.2f} images/s), processing {args.processing:g} s, {os.cpu_count()} cores"
    )

    from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

    runs = [
        ("one operator, all images", None, True),
        (f"{args.tasks} tasks sharing the key", args.tasks, True),
        (f"{args.tasks} tasks, each pacing alone (no shared window)", args.tasks, False),
    ]
    for title, tasks, shared in runs:
        server.reset()
        server.configure(rate_limit=args.limit, rate_window=args.window, processing_time=args.processing)
        time.sleep(args.window)  # let the previous run's window empty, at the server and in pacing
        if tasks is None:
            started = time.monotonic()
            records = Doc2XImageParseOperator(task_id="parse", image_path=images, poll_interval=0.25).execute(
                {}
            )
            seconds, parsed = time.monotonic() - started, len(records)
        else:
            seconds, parsed = run_tasks(
                [images[index::tasks] for index in range(tasks)], shared_pacing=shared
            )
        report(title, figures(server, len(images), seconds, parsed, args.limit, args.window))


if __name__ == "__main__":
    main()
