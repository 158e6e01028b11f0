"""
Incremental ingestion: what a daily run over a prefix that only grows costs, with the manifest.

    python bench/incremental.py                 # 2,000 existing results, 100 new images, 10 changed
    python bench/incremental.py --existing 10000   # the scale of a large prefix (long: S3 is moto here)
    python bench/incremental.py --existing 500 --new 20 --changed 5 --image-kb 8
    python bench/incremental.py --deferrable    # the parse task defers, and resumes to fetch

A prefix (``s3://bench/scans/``) on moto's S3 server holds ``--existing`` images whose results are
already under ``output_path`` (``s3://bench/lake/``, written as an earlier run without the manifest
left them: no manifest, no fingerprints in the sidecars), plus ``--new`` images never parsed. Each
run is a real Airflow run: ``airflow dags test`` of ``bench/dags/doc2x_bench.py``, whose ``list``
task lists the prefix (:func:`airflow_provider_doc2x.storage.listing.list_images`) and whose ``parse`` task
runs the operator over the listing (its XCom) with ``incremental=True``, against the local Doc2X
server:

1. the first run: no manifest yet, so every image is read once (today's cost) and the new ones billed;
2. a re-run with nothing new;
3. a re-run after ``--new`` more images arrived;
4. a re-run after ``--changed`` images were rewritten in place (same names, new content).

Storage is counted where it is spent, at S3: every request of the tasks goes through a logging
proxy in front of moto (``tests.helpers.s3.FaultProxy``), which a counting ``memory://`` in the
bench's process could not do for the task's process. A request is an S3 operation: ``LIST`` (one
page of a listing), ``GET``, ``HEAD``, ``PUT``, ``DELETE``, ``POST``. Bytes read are the bytes the
GETs asked for (their ``Range``, or the whole object), by object. Printed per run: wall time (the
``list`` task's start to the ``parse`` task's end, as Airflow recorded them), bytes read (images,
manifest, other), the target (re-runs: bytes read within 1.1x of the new and changed images' bytes
plus the manifest's), storage requests by operation, and images billed at the server (target:
exactly the new and changed images).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import struct
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")  # the bench's own process; tasks log INFO

from _airflow import HOW, migrated_database, run
from _support import SCRATCH, LocalServer, report

BUCKET = "bench"
PREFIX = f"s3://{BUCKET}/scans"
LAKE = f"s3://{BUCKET}/lake"


def page(number: int, version: int, size: int, rng: random.Random) -> bytes:
    """A PNG page the local server answers with its own text, padded to ``size`` bytes (a private chunk)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("doc2x", f"# Scan {number}\n\nVersion {version} of scan number {number}.")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (number % 256, number // 256 % 256, version % 256)).save(
        buffer, format="PNG", pnginfo=info
    )
    data = buffer.getvalue()
    padding = size - len(data) - 12
    if padding <= 0:
        return data
    payload = rng.randbytes(padding)
    chunk = struct.pack(">I", padding) + b"prVt" + payload + struct.pack(">I", zlib.crc32(b"prVt" + payload))
    return data[:-12] + chunk + data[-12:]  # before IEND


def classify(request: Any) -> str:
    """An S3 request as the operation it is: ``LIST`` for a GET on the bucket, else its method."""
    if request.method == "GET" and request.path.rstrip("/") == f"/{BUCKET}":
        return "LIST"
    return request.method


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from tests.helpers.s3 import UNSET, FaultProxy, MotoServer, s3_environment

        self.args = args
        self.rng = random.Random(7)
        self.size = args.image_kb * 1024
        self.server = LocalServer(
            "--processing-time", str(args.processing), "--rate-limit", "1000000", "--rate-window", "1"
        )
        self.moto = MotoServer()
        self.proxy = FaultProxy(self.moto.port)
        config = SCRATCH / "aws-config"
        config.mkdir(exist_ok=True)
        for name in UNSET:
            os.environ.pop(name, None)
        # The bench's own process writes the images and the earlier results to moto directly (not
        # counted); the tasks reach S3 through the proxy, which logs every request.
        os.environ.update(s3_environment(self.moto.url, config))
        self.env = {
            **s3_environment(self.proxy.url, config),
            "AIRFLOW_CONN_DOC2X_DEFAULT": self.server.connection_json(
                rate_limit_images=1_000_000, rate_limit_window=1
            ),
            "DOC2X_PACING_DIR": str(SCRATCH / "pacing"),
        }
        self.client = self.s3_client()
        self.client.create_bucket(Bucket=BUCKET)
        self.rows: list[tuple[str, ...]] = []
        self.runs = 0

    def s3_client(self) -> Any:
        from tests.helpers.s3 import s3_client

        return s3_client(self.moto.url, max_pool_connections=16)

    def stop(self) -> None:
        self.proxy.stop()
        self.moto.stop()

    def put(self, number: int, version: int = 0) -> tuple[str, bytes]:
        data = page(number, version, self.size, self.rng)
        self.client.put_object(Bucket=BUCKET, Key=f"scans/scan-{number:06d}.png", Body=data)
        return f"{PREFIX}/scan-{number:06d}.png", data

    def seed(self) -> None:
        """Earlier results of the existing images, as a run without the manifest wrote them."""
        import hashlib

        from airflow_provider_doc2x import protocol
        from airflow_provider_doc2x.storage.results import ResultStore

        results = ResultStore(LAKE)
        pages = [page(number, 0, self.size, self.rng) for number in range(self.args.existing)]

        def one(number: int) -> None:
            data = pages[number]
            self.client.put_object(Bucket=BUCKET, Key=f"scans/scan-{number:06d}.png", Body=data)
            text = f"# Scan {number}\n\nVersion 0 of scan number {number}."
            result = protocol.Doc2XResult(
                uid=f"seed-{number}", pages=(protocol.Doc2XPage(0, 32, 32, text),), convert_zip=None
            )
            results.write(f"{PREFIX}/scan-{number:06d}.png", hashlib.sha256(data).hexdigest(), result)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(self.args.existing)))

    def sizes(self) -> dict[str, int]:
        """Each object's size, by its path as the proxy logs it (``/bucket/key``), asked of moto directly."""
        found = {}
        for listing in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in listing.get("Contents", []):
                found[f"/{BUCKET}/{item['Key']}"] = item["Size"]
        return found

    def run(self, label: str, *, fresh_bytes: int, expected_billed: int) -> None:
        """One run of the DAG: list the prefix, parse it all; count what S3 and Doc2X saw."""
        sizes = self.sizes()
        manifest = sum(size for path, size in sizes.items() if path.startswith(f"/{BUCKET}/lake/_manifest/"))
        billed_before = self.server.stats()["billed_total"]
        self.proxy.clear()
        self.runs += 1
        task = run(
            f"incremental-{self.runs}",
            {
                "output_path": LAKE,
                "incremental": True,
                "deferrable": self.args.deferrable,
                "poll_interval": 0.1,
                "timeout": 3600,
            },
            prefix=PREFIX,
            env=self.env,
        ).must_succeed()
        seconds = (task.span("parse")[1] - task.span("list")[0]).total_seconds()
        records = task.xcom()
        billed = self.server.stats()["billed_total"] - billed_before
        requests = self.proxy.requests()
        read: Counter = Counter()
        for request in requests:
            if classify(request) != "GET" or request.status not in (200, 206):
                continue
            size = sizes.get(request.path, 0)
            bounds = request.range_bounds()
            if bounds is None:
                read[request.path] += size
            else:
                first, last = bounds
                read[request.path] += max(0, min(size - 1 if last is None else last, size - 1) - first + 1)
        images = sum(count for path, count in read.items() if path.startswith(f"/{BUCKET}/scans/"))
        manifest_read = sum(
            count for path, count in read.items() if path.startswith(f"/{BUCKET}/lake/_manifest/")
        )
        other = sum(read.values()) - images - manifest_read
        target = fresh_bytes + manifest
        ratio = f"{sum(read.values()) / target:.3f}" if manifest else "-"
        operations = Counter(classify(request) for request in requests)
        self.rows.append(
            (
                label,
                f"{seconds:.1f}",
                mb(sum(read.values())),
                mb(images),
                mb(manifest_read),
                mb(other),
                mb(target) if manifest else "-",
                ratio,
                str(len(requests)),
                f"{billed}/{expected_billed}",
            )
        )
        report(
            label,
            [
                ("images listed", len(records)),
                ("wall seconds", f"{seconds:.1f}"),
                ("bytes read (MB)", mb(sum(read.values()))),
                ("  of images / manifest / other", f"{mb(images)} / {mb(manifest_read)} / {mb(other)}"),
                ("new+changed image bytes + manifest (MB)", mb(target)),
                ("bytes read / that (target <= 1.1)", ratio),
                (
                    "S3 requests",
                    f"{len(requests)} ({', '.join(f'{k} {v}' for k, v in operations.most_common())})",
                ),
                ("images billed / new+changed (target: equal)", f"{billed} / {expected_billed}"),
            ],
        )
        if billed != expected_billed:
            raise SystemExit(f"{label}: billed {billed} images, expected {expected_billed}")


def mb(count: int) -> str:
    return f"{count / 1e6:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--existing", type=int, default=2_000, help="images with results already (default 2000)"
    )
    parser.add_argument("--new", type=int, default=100, help="new images before runs 1 and 3 (default 100)")
    parser.add_argument("--changed", type=int, default=10, help="images rewritten before run 4 (default 10)")
    parser.add_argument("--image-kb", type=int, default=16, help="size of each image in KiB (default 16)")
    parser.add_argument("--processing", type=float, default=0.05, help="the server's seconds per job")
    parser.add_argument(
        "--deferrable",
        action="store_true",
        help="the parse task defers; its trigger waits in line, then it resumes to fetch",
    )
    args = parser.parse_args()
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as missing:
        raise SystemExit(
            f"this bench needs moto's server and s3fs (the test dependency group): {missing}"
        ) from None
    bench = Bench(args)
    try:
        measure(bench, args)
    finally:
        bench.stop()


def measure(bench: Bench, args: argparse.Namespace) -> None:
    """Seed the prefix and the lake, then the four runs; print each, and all of them in a table."""
    print(
        f"# incremental {HOW}, {'deferrable' if args.deferrable else 'not deferrable (the worker waits)'}, "
        f"on moto's S3 behind a counting proxy: {args.existing} earlier results, {args.new} new images "
        f"of {args.image_kb} KiB, {args.changed} changed",
        flush=True,
    )
    started = time.perf_counter()
    bench.seed()
    fresh = [bench.put(args.existing + number)[1] for number in range(args.new)]
    migrated_database()
    print(f"# set up in {time.perf_counter() - started:.1f} s", flush=True)
    bench.run("first run", fresh_bytes=sum(map(len, fresh)), expected_billed=args.new)
    bench.run("re-run, nothing new", fresh_bytes=0, expected_billed=0)
    fresh = [bench.put(args.existing + args.new + number)[1] for number in range(args.new)]
    bench.run(f"re-run, {args.new} new images", fresh_bytes=sum(map(len, fresh)), expected_billed=args.new)
    spread = range(0, args.existing, max(1, args.existing // max(1, args.changed)))
    changed = [bench.put(number, version=1)[1] for number in list(spread)[: args.changed]]
    bench.run(
        f"re-run, {len(changed)} changed in place",
        fresh_bytes=sum(map(len, changed)),
        expected_billed=len(changed),
    )
    header = (
        "run",
        "wall s",
        "read MB",
        "images",
        "manifest",
        "other",
        "target MB",
        "ratio",
        "requests",
        "billed",
    )
    widths = [max(len(row[i]) for row in [header, *bench.rows]) for i in range(len(header))]
    print("\n## all runs")
    for row in [header, *bench.rows]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
