"""
Incremental ingestion: what a daily run over a prefix that only grows costs, with the manifest.

    python bench/incremental.py                 # 10,000 existing results, 100 new images, 10 changed
    python bench/incremental.py --existing 500 --new 20 --changed 5 --image-kb 8
    python bench/incremental.py --deferrable    # each task's second half on a new operator

A prefix (``memory://bucket/scans/``) holds ``--existing`` images whose results are already under
``output_path`` (``memory://bucket/lake/``, written as an earlier run without the manifest left
them: no manifest, no fingerprints in the sidecars), plus ``--new`` images never parsed. Each run
lists the prefix (:func:`airflow_provider_doc2x.listing.list_images`) and runs the operator over
the whole listing with ``incremental=True``, against the local Doc2X server:

1. the first run: no manifest yet, so every image is read once (today's cost) and the new ones billed;
2. a re-run with nothing new;
3. a re-run after ``--new`` more images arrived;
4. a re-run after ``--changed`` images were rewritten in place (same names, new content).

Storage is ``memory://`` wrapped to count every call (the outermost fsspec call: a listing is one
call, as an object store's paged LIST is one operation) and every byte read, by path. Printed per
run: wall time, bytes read (images, manifest, other), the target (re-runs: bytes read within 1.1x
of the new and changed images' bytes plus the manifest's), storage calls, and images billed at the
server (target: exactly the new and changed images).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import struct
import sys
import time
import zlib
from typing import Any

os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")

from _support import LocalServer, report

PREFIX = "memory://bucket/scans"
LAKE = "memory://bucket/lake"


def counting_filesystem() -> Any:
    """``memory://`` that counts calls and bytes read, registered for ``ObjectStoragePath`` and fsspec."""
    from tests.helpers.storage import CountingFS, use_for_memory

    return use_for_memory(CountingFS)


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


class Bench:
    def __init__(self, args: argparse.Namespace, fs: Any) -> None:
        self.args = args
        self.fs = fs
        self.rng = random.Random(7)
        self.size = args.image_kb * 1024
        self.server = LocalServer(
            "--processing-time", str(args.processing), "--rate-limit", "1000000", "--rate-window", "1"
        )
        self.server.use_as_default_connection(rate_limit_images=1_000_000, rate_limit_window=1)
        self.rows: list[tuple[str, ...]] = []

    def put(self, number: int, version: int = 0) -> tuple[str, bytes]:
        data = page(number, version, self.size, self.rng)
        path = f"/bucket/scans/scan-{number:06d}.png"
        self.fs.pipe_file(path, data)
        return f"{PREFIX}/scan-{number:06d}.png", data

    def seed(self) -> None:
        """Earlier results of the existing images, as a run without the manifest wrote them."""
        import hashlib

        from airflow_provider_doc2x import protocol
        from airflow_provider_doc2x.results import ResultStore

        results = ResultStore(LAKE)
        for number in range(self.args.existing):
            uri, data = self.put(number)
            text = f"# Scan {number}\n\nVersion 0 of scan number {number}."
            result = protocol.Doc2XResult(
                uid=f"seed-{number}", pages=(protocol.Doc2XPage(0, 32, 32, text),), convert_zip=None
            )
            results.write(uri, hashlib.sha256(data).hexdigest(), result)

    def parse(self, images: list[str]) -> list[dict[str, Any]]:
        from airflow.providers.common.compat.sdk import TaskDeferred

        from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

        def operator() -> Doc2XImageParseOperator:
            return Doc2XImageParseOperator(
                task_id="parse",
                image_path=images,
                output_path=LAKE,
                incremental=True,
                deferrable=self.args.deferrable,
                poll_interval=0.1,
                timeout=3600,
            )

        try:
            return operator().execute({})
        except TaskDeferred as deferred:
            event = asyncio.run(first_event(deferred.trigger))
            return getattr(operator(), deferred.method_name)({}, event)  # as in another process

    def manifest_bytes(self) -> int:
        return sum(
            len(handle.getvalue())
            for path, handle in self.fs.store.items()
            if path.startswith("/bucket/lake/_manifest/")
        )

    def run(self, label: str, *, fresh_bytes: int, expected_billed: int) -> None:
        """One run: list the prefix, parse it all; count what storage and Doc2X saw."""
        from airflow_provider_doc2x.listing import list_images

        manifest = self.manifest_bytes()
        billed_before = self.server.stats()["billed_total"]
        self.fs.reset()
        started = time.perf_counter()
        records = self.parse(list_images(PREFIX))
        seconds = time.perf_counter() - started
        billed = self.server.stats()["billed_total"] - billed_before
        read = self.fs.bytes_read
        images = sum(count for path, count in read.items() if path.startswith("/bucket/scans/"))
        manifest_read = sum(
            count for path, count in read.items() if path.startswith("/bucket/lake/_manifest/")
        )
        other = sum(read.values()) - images - manifest_read
        target = fresh_bytes + manifest
        ratio = f"{sum(read.values()) / target:.3f}" if manifest else "-"
        calls = sum(self.fs.calls.values())
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
                str(calls),
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
                    "storage calls",
                    f"{calls} ({', '.join(f'{k} {v}' for k, v in self.fs.calls.most_common())})",
                ),
                ("images billed / new+changed (target: equal)", f"{billed} / {expected_billed}"),
            ],
        )
        if billed != expected_billed:
            raise SystemExit(f"{label}: billed {billed} images, expected {expected_billed}")


async def first_event(trigger: Any) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise RuntimeError("the trigger ended without an event")


def mb(count: int) -> str:
    return f"{count / 1e6:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--existing", type=int, default=10_000, help="images with results already (default 10000)"
    )
    parser.add_argument("--new", type=int, default=100, help="new images before runs 1 and 3 (default 100)")
    parser.add_argument("--changed", type=int, default=10, help="images rewritten before run 4 (default 10)")
    parser.add_argument("--image-kb", type=int, default=16, help="size of each image in KiB (default 16)")
    parser.add_argument("--processing", type=float, default=0.05, help="the server's seconds per job")
    parser.add_argument("--deferrable", action="store_true", help="defer, and resume on a new operator")
    args = parser.parse_args()
    fs = counting_filesystem()
    bench = Bench(args, fs)
    started = time.perf_counter()
    bench.seed()
    fresh = [bench.put(args.existing + number)[1] for number in range(args.new)]
    print(
        f"# incremental: {args.existing} earlier results, {args.new} new images of {args.image_kb} KiB, "
        f"{args.changed} changed; {'deferrable' if args.deferrable else 'the worker waits'}; "
        f"set up in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
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
        "calls",
        "billed",
    )
    widths = [max(len(row[i]) for row in [header, *bench.rows]) for i in range(len(header))]
    print("\n## all runs")
    for row in [header, *bench.rows]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
