"""
The library overhead per image in a big batch (harness, no task runner), with a generous key (no
pacing wait), on loopback.

    python bench/batch_cost.py                      # 1,000 then 10,000 images, 2 s processing
    python bench/batch_cost.py --images 1000

Each batch runs in a fresh worker process that calls the library directly (check, upload side by
side, wait with the trigger's loop, fetch, records): no Airflow task runner, so no task state store,
no deferral and no resume. The figure is the library's own overhead, not what a task costs:
``bench/task_cost.py`` measures that through real tasks. Printed per batch:

- library overhead per image (harness, no task runner): from the first upload to the last record,
  less the server's processing time (what a batch pays on top of Doc2X's own work); and the
  worker's CPU seconds per image;
- peak worker memory (the process's maximum resident set), and per image above the first batch's;
- what a deferred task would put in Airflow's database per image: the trigger's kwargs (the trigger
  table), its event (the resumed task's kwargs) and the XCom of the records (kept in XCom, no
  ``output_path``); and that a trigger of this size rebuilds from its kwargs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _support import SCRATCH, LocalServer, make_images, report

BATCH = r"""
import importlib, json, resource, sys, time
from airflow_provider_doc2x import transport
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.records import records_from_event
from airflow_provider_doc2x.journal import TaskJournal
from airflow_provider_doc2x.storage.sources import check_all, resolve_images
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from airflow_provider_doc2x.image_lane.uploads import ImageUploads
import logging

images = json.loads(open(sys.argv[1]).read())
log = logging.getLogger("batch")
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
started, cpu_started = time.monotonic(), cpu()
hook = Doc2XHook()
sources = resolve_images(images)
check_all(sources)
first_upload = time.monotonic()
jobs = ImageUploads(hook, journal=TaskJournal(None, may_hold=False), results=None, log=log).submit(sources)
trigger = Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=jobs, poll_interval=0.25, deadline=time.time() + 3600)
event = transport.run_sync(trigger.waiter(hook).wait())
records = records_from_event(hook, event)
last_record = time.monotonic()
classpath, kwargs = trigger.serialize()
module, name = classpath.rsplit(".", 1)
rebuilt = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
print(json.dumps({
    "parsed": len(records),
    "seconds_first_upload_to_last_record": last_record - first_upload,
    "cpu_seconds": cpu() - cpu_started,
    "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "kwargs_bytes": len(json.dumps(kwargs)),
    "event_bytes": len(json.dumps(event)),
    "xcom_bytes": len(json.dumps(records)),
    "rebuilt": rebuilt.serialize() == (classpath, kwargs),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default="1000,10000", help="batch sizes, comma-separated")
    parser.add_argument("--processing", type=float, default=2.0, help="seconds a job takes at the server")
    args = parser.parse_args()

    server = LocalServer("--processing-time", str(args.processing))
    env = {
        **os.environ,
        "AIRFLOW_CONN_DOC2X_DEFAULT": server.connection_json(
            rate_limit_images=1_000_000, rate_limit_window=1
        ),
    }
    print(
        f"# library overhead (harness, no task runner; bench/task_cost.py runs real tasks): generous key, "
        f"processing {args.processing:g} s, {os.cpu_count()} cores"
    )
    baseline = None
    for count in [int(value) for value in args.images.split(",")]:
        server.reset()
        server.configure(rate_limit=1_000_000, rate_window=1, processing_time=args.processing)
        images = make_images(count, prefix=f"batch{count}")
        listing = SCRATCH / f"batch-{count}.json"
        listing.write_text(json.dumps(images))
        finished = subprocess.run(
            [sys.executable, "-c", BATCH, str(listing)], env=env, capture_output=True, text=True, timeout=7200
        )
        if finished.returncode != 0:
            raise SystemExit(finished.stderr[-3000:])
        figures = json.loads(finished.stdout.strip().splitlines()[-1])
        ours = figures["seconds_first_upload_to_last_record"] - args.processing
        rss = figures["max_rss_kib"] * 1024
        growth = (
            f"{(rss - baseline[1]) / (count - baseline[0]) / 1024:.1f} KiB" if baseline else "(first batch)"
        )
        baseline = baseline or (count, rss)
        stats = server.stats()
        report(
            f"{count} images",
            [
                (
                    "parsed",
                    f"{figures['parsed']} of {count}, max billings of one image {stats['max_billed_per_image']}",
                ),
                ("first upload to last record", f"{figures['seconds_first_upload_to_last_record']:.1f} s"),
                (
                    "library overhead per image (harness, no task runner; less processing)",
                    f"{1000 * ours / count:.2f} ms",
                ),
                ("worker CPU per image", f"{1000 * figures['cpu_seconds'] / count:.2f} ms"),
                ("status calls per image", f"{stats['requests'].get('status', 0) / count:.2f}"),
                ("peak worker memory", f"{rss / 2**20:.0f} MiB"),
                ("peak memory per extra image", growth),
                (
                    "trigger kwargs per image",
                    f"{figures['kwargs_bytes'] / count:.0f} B ({figures['kwargs_bytes'] / 2**10:.0f} KiB in all)",
                ),
                ("event per image", f"{figures['event_bytes'] / count:.0f} B"),
                ("XCom per image", f"{figures['xcom_bytes'] / count:.0f} B"),
                ("trigger rebuilt from its kwargs", figures["rebuilt"]),
            ],
        )


if __name__ == "__main__":
    main()
