"""
The bulk lane against the image lane: N JPEG pages through one operator, each lane in turn.

    python bench/pdf_lane.py                      # 300 and 3,000 images
    python bench/pdf_lane.py --counts 300 --limit 30 --window 30     # the image API's real rate

Each run is one worker process running ``Doc2XImageParseOperator(method=...)`` in the worker (not
deferred: the worker's own wait), against the local server in its own process. Printed per lane,
beside the server's knobs (they decide the absolute numbers: the image lane is bound by the key's
rate window, the PDF lane by the server's page workers):

- images per second, end to end (the worker's start-up excluded);
- our own time per image: the worker process's CPU time (user + system) over the run, per image;
- bytes uploaded against the sum of the image files (the image lane sends each file as it is; the
  PDF lane sends PDFs, whose overhead over the JPEG bytes they hold should stay under 5 %);
- peak worker memory: the worker's peak resident set, and its growth over the run.

The images are distinct JPEG pages of about 40-80 KB whose comment carries their Markdown (what
the local server's ``simple`` engine answers), so every page bills once and parses to a known text.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

from _support import SCRATCH, LocalServer, report

WORKER = r"""
import json, os, resource, sys, time
from airflow_provider_doc2x import transport
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

method = sys.argv[1]
with open(sys.argv[2]) as listing:
    images = json.load(listing)
sent = {"bytes": 0}
put_file, call = transport.put_file, transport.call

async def counted_put(settings, url, path, **kwargs):
    sent["bytes"] += os.path.getsize(path)
    return await put_file(settings, url, path, **kwargs)

async def counted_call(settings, request, read, **kwargs):
    if request.bills and request.content is not None:
        sent["bytes"] += len(request.content)
    return await call(settings, request, read, **kwargs)

transport.put_file, transport.call = counted_put, counted_call

def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

operator = Doc2XImageParseOperator(task_id="parse", image_path=images, method=method, poll_interval=0.25, timeout=3600)
before = maxrss()
cpu, wall = time.process_time(), time.monotonic()
records = operator.execute({})
wall, cpu = time.monotonic() - wall, time.process_time() - cpu
titles_ok = all(record["markdown"].startswith("# Bench Page ") for record in records)
print(json.dumps({"records": len(records), "wall": wall, "cpu": cpu, "bytes": sent["bytes"],
                  "rss_before": before, "rss_peak": maxrss(), "titles_ok": titles_ok}))
"""


def make_jpegs(count: int) -> list[str]:
    """``count`` distinct JPEG pages: one scan-like picture, each file with its own comment (its Markdown)."""
    from PIL import Image, ImageDraw, ImageFilter

    folder = SCRATCH / f"jpegs-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.effect_noise((800, 1000), 24).convert("RGB").filter(ImageFilter.GaussianBlur(1.2))
    draw = ImageDraw.Draw(picture)
    for line in range(24):
        draw.rectangle((80, 80 + 36 * line, 720 - (line * 37) % 200, 96 + 36 * line), fill=(30, 30, 30))
    base = io.BytesIO()
    picture.save(base, format="JPEG", quality=80)
    body = base.getvalue()[2:]  # after SOI: a comment segment goes in front of the rest
    paths = []
    for number in range(count):
        text = f"# Bench Page {number}\n\nA page of the bulk lane's bench, number {number}.".encode()
        comment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
        path = folder / f"page-{number:05d}.jpg"
        path.write_bytes(b"\xff\xd8" + comment + body)
        paths.append(str(path))
    return paths


def run_lane(method: str, images: list[str]) -> dict:
    listing = SCRATCH / "images.json"
    listing.write_text(json.dumps(images))
    result = subprocess.run(
        [sys.executable, "-c", WORKER, method, str(listing)],
        capture_output=True,
        text=True,
        timeout=7200,
        env=dict(os.environ),
    )
    if result.returncode != 0:
        raise SystemExit(f"the {method} lane failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[300, 3000], help="images per run")
    parser.add_argument(
        "--limit", type=int, default=30, help="image API: images per window (server and pacing)"
    )
    parser.add_argument("--window", type=float, default=3.0, help="image API: seconds of the window")
    parser.add_argument(
        "--processing", type=float, default=1.0, help="image API: seconds a job stays processing"
    )
    parser.add_argument("--page-workers", type=int, default=8, help="PDF API: pages parsed at once")
    parser.add_argument("--page-seconds", type=float, default=0.05, help="PDF API: seconds per page at least")
    parser.add_argument(
        "--pickup", type=float, default=1.0, help="PDF API: seconds before a PDF is picked up"
    )
    parser.add_argument("--lanes", nargs="+", default=["async", "pdf"], choices=["async", "pdf"])
    args = parser.parse_args()

    server = LocalServer("--processing-time", str(args.processing))
    server.use_as_default_connection(rate_limit_images=args.limit, rate_limit_window=args.window)
    knobs = {
        "rate_limit": args.limit,
        "rate_window": args.window,
        "processing_time": args.processing,
        "pdf_page_workers": args.page_workers,
        "pdf_page_seconds": args.page_seconds,
        "pickup_delay": args.pickup,
    }
    print(
        f"# pdf_lane: image lane (method='async') against the bulk lane (method='pdf'), {os.cpu_count()} cores"
    )
    print("# server knobs: " + ", ".join(f"{name}={value:g}" for name, value in knobs.items()))
    print(
        f"#   image API: at most {args.limit / args.window:.2f} images/s by the key's window; "
        f"PDF API: at most {args.page_workers / args.page_seconds:.0f} pages/s by its page workers"
    )
    for count in args.counts:
        images = make_jpegs(count)
        total = sum(os.path.getsize(path) for path in images)
        for method in args.lanes:
            server.reset()
            server.configure(
                rate_limit=args.limit,
                rate_window=args.window,
                processing_time=args.processing,
                pdf_page_workers=args.page_workers,
                pdf_page_seconds=args.page_seconds,
                pickup_delay=args.pickup,
            )
            time.sleep(
                args.window if method == "async" else 0
            )  # an empty window, at the server and in pacing
            figures = run_lane(method, images)
            stats = server.stats()
            lane = "image lane (async)" if method == "async" else "PDF lane (pdf)"
            billed = stats["billed_total"] + stats["pdf_pages_billed"]
            report(
                f"{count} images, {lane}",
                [
                    (
                        "images",
                        f"{figures['records']} ({'all' if figures['titles_ok'] else 'NOT all'} parsed as expected)",
                    ),
                    ("image bytes (MB)", f"{total / 1e6:.1f} ({total / count / 1e3:.0f} KB each)"),
                    ("images per second", f"{count / figures['wall']:.1f}"),
                    ("seconds in all", f"{figures['wall']:.1f}"),
                    ("our CPU time per image (ms)", f"{1000 * figures['cpu'] / count:.2f}"),
                    ("bytes uploaded / image bytes", f"{figures['bytes'] / total:.4f}"),
                    ("peak worker memory (MB)", f"{figures['rss_peak'] / 1e6:.0f}"),
                    (
                        "worker memory growth (MB)",
                        f"{(figures['rss_peak'] - figures['rss_before']) / 1e6:.0f}",
                    ),
                    (
                        "PDFs (max in progress)",
                        f"{stats['pdf_tasks']} ({stats['max_pdf_tasks_in_progress']})",
                    ),
                    (
                        "pages billed (max per page)",
                        f"{billed} ({max(stats['max_billed_per_image'], stats['max_pdf_billed_per_page'])})",
                    ),
                    ("429 answers", stats["rate_limited"]),
                ],
            )


if __name__ == "__main__":
    main()
