"""
Worker-seconds held per image: deferrable against not deferrable, while Doc2X takes 20 s per job.

    python bench/worker_occupancy.py                  # 3 tasks of 1 image, 20 s processing
    python bench/worker_occupancy.py --processing 5

A deferrable task holds a worker only to check and submit (``execute`` until it defers) and to
fetch the results (``execute_complete``); the wait runs in the trigger, timed apart here as it would
run in the triggerer. Target: deferrable holds a worker under 1 s per task.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _support import LocalServer, make_images, report


async def run_trigger(trigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise RuntimeError("the trigger fired no event")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processing", type=float, default=20.0)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    args = parser.parse_args()
    server = LocalServer("--processing-time", str(args.processing))
    server.use_as_default_connection()
    print(f"# worker occupancy: {args.tasks} tasks of 1 image, processing {args.processing:g} s")

    from airflow.providers.common.compat.sdk import TaskDeferred

    from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

    for deferrable in (True, False):
        images = make_images(args.tasks, prefix=f"occupancy-{deferrable}")
        held, waited = [], []
        for image in images:
            operator = Doc2XImageParseOperator(
                task_id="parse", image_path=image, deferrable=deferrable, poll_interval=args.poll_interval
            )
            started = time.monotonic()
            if not deferrable:
                operator.execute({})
                held.append(time.monotonic() - started)
                continue
            try:
                operator.execute({})
                raise RuntimeError("the deferrable task did not defer")
            except TaskDeferred as deferred:
                submitted = time.monotonic()
                event = asyncio.run(run_trigger(deferred.trigger))
                resumed = time.monotonic()
                operator.execute_complete({}, event)
                held.append((submitted - started) + (time.monotonic() - resumed))
                waited.append(resumed - submitted)
        rows = [
            ("worker-seconds per task (mean)", f"{sum(held) / len(held):.3f}"),
            ("worker-seconds per task (max)", f"{max(held):.3f}"),
        ]
        if waited:
            rows.append(("seconds waited in the trigger (mean)", f"{sum(waited) / len(waited):.1f}"))
        report("deferrable" if deferrable else "not deferrable", rows)


if __name__ == "__main__":
    main()
