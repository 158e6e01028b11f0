"""
The bulk lane against the image lane: N JPEG pages through one task, each lane in turn.

    python bench/pdf_lane.py                      # 300 and 3,000 images
    python bench/pdf_lane.py --counts 300 --limit 30 --window 30     # the image API's real rate

Each run is a real Airflow task: ``airflow dags test`` of ``bench/dags/doc2x_bench.py``, whose
``parse`` task is ``Doc2XImageParseOperator(method=...)``, deferrable (the image lane defers once;
the PDF lane defers for each wave of PDFs in flight and resumes to submit the next), through
Airflow's task runner, its task state store (Airflow 3.3) and its XCom, against the local server in
its own process. Printed per lane, beside the server's knobs (they decide the absolute numbers: the
image lane is bound by the key's rate window, the PDF lane by the server's page workers):

- images per second, end to end: from the task's first start to its end, as Airflow recorded them
  (the CLI's start-up and DAG parsing excluded);
- our own time per image: the CPU time (user + system) of the ``dags test`` process, which runs the
  task and its trigger, beyond that of a run of the same lane over 1 image, per further image
  (Airflow's start-up, the DAG's parsing and the lane's imports are in both, so they drop out);
- bytes sent to the server against the sum of the image files, counted by a relay in front of the
  server (request heads, status calls and presigned PUTs included; the image lane sends each file
  as it is, the PDF lane sends PDFs, whose overhead over the JPEG bytes they hold should stay
  under 5 %);
- peak memory: the process's peak resident set, and its growth over the 1-image run's.

The images are distinct JPEG pages of about 40-80 KB whose comment carries their Markdown (what
the local server's ``simple`` engine answers), so every page bills once and parses to a known text.
"""

from __future__ import annotations

import argparse
import io
import os
import time

from _airflow import HOW, TaskRun, migrated_database, run, start
from _support import SCRATCH, CountingRelay, LocalServer, report


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


def run_lane(name: str, method: str, images: list[str], env: dict[str, str]) -> TaskRun:
    """One real task of the lane over ``images``; it must end successfully."""
    task = run(
        name,
        {"image_path": images, "method": method, "deferrable": True, "poll_interval": 0.25, "timeout": 3600},
        env=env,
    )
    return task.must_succeed()


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
    relay = CountingRelay(server.url)
    connection = server.connection_json(rate_limit_images=args.limit, rate_limit_window=args.window)
    env = {"AIRFLOW_CONN_DOC2X_DEFAULT": connection.replace(server.url, relay.url)}
    knobs = {
        "rate_limit": args.limit,
        "rate_window": args.window,
        "processing_time": args.processing,
        "pdf_page_workers": args.page_workers,
        "pdf_page_seconds": args.page_seconds,
        "pickup_delay": args.pickup,
    }
    print(
        f"# pdf_lane {HOW}, deferrable: image lane (method='async') against the bulk lane (method='pdf'), "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    print("# server knobs: " + ", ".join(f"{name}={value:g}" for name, value in knobs.items()))
    print(
        f"#   image API: at most {args.limit / args.window:.2f} images/s by the key's window; "
        f"PDF API: at most {args.page_workers / args.page_seconds:.0f} pages/s by its page workers"
    )
    migrated_database()
    # What a task of the lane costs with one image: Airflow's own share of the figures, and the lane's
    # start-up (imports, first connection), which the per-image figures leave out.
    one = make_jpegs(1)
    baseline = {
        method: start(f"one-{method}", {"image_path": one, "method": method, "deferrable": True}, env=env)
        for method in args.lanes
    }
    for task in baseline.values():
        task.wait().must_succeed()
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
            env["DOC2X_PACING_DIR"] = str(SCRATCH / f"pacing-{method}-{count}")
            relay.reset()
            task = run_lane(f"{method}-{count}", method, images, env)
            first, last = task.span()
            wall = (last - first).total_seconds()
            records = task.xcom()
            titles_ok = all(record["markdown"].startswith("# Bench Page ") for record in records)
            stats = server.stats()
            lane = "image lane (async)" if method == "async" else "PDF lane (pdf)"
            billed = stats["billed_total"] + stats["pdf_pages_billed"]
            report(
                f"{count} images, {lane}",
                [
                    (
                        "images",
                        f"{len(records)} ({'all' if titles_ok else 'NOT all'} parsed as expected)",
                    ),
                    ("image bytes (MB)", f"{total / 1e6:.1f} ({total / count / 1e3:.0f} KB each)"),
                    ("images per second", f"{count / wall:.1f}"),
                    ("seconds in all", f"{wall:.1f}"),
                    (
                        "our CPU time per image (ms)",
                        f"{1000 * (task.cpu_seconds - baseline[method].cpu_seconds) / max(1, count - 1):.2f}",
                    ),
                    ("bytes sent to the server / image bytes", f"{relay.sent / total:.4f}"),
                    ("peak task process memory (MB)", f"{task.peak_rss / 1e6:.0f}"),
                    (
                        "memory growth over a run of 1 image (MB)",
                        f"{(task.peak_rss - baseline[method].peak_rss) / 1e6:.0f}",
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
