"""
The offline OCR engine: pages per second and peak memory, on the example pages (1000 x 1400).

    python bench/ocr_engine.py                 # every example page, 3 rounds, onnxruntime on all cores
    python bench/ocr_engine.py --threads 1     # one thread: what each of several server processes gets
    python bench/ocr_engine.py --test-pages    # also the tests' pages: a text-dense scanned memo

Needs the ocr extra. Loading the models is timed apart from parsing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _support import report


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far, Linux reports KB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    parser.add_argument(
        "--test-pages",
        action="store_true",
        help="also the tests' pages (more lines a page, and each line is one recognition run)",
    )
    args = parser.parse_args()

    from airflow_provider_doc2x.local.samples import EXAMPLE_PAGES, TEST_PAGES, render

    samples = {**EXAMPLE_PAGES, **(TEST_PAGES if args.test_pages else {})}
    kind = "example and test" if args.test_pages else "example"
    pages = [render(page, fmt="JPEG" if name.endswith(".jpg") else "PNG") for name, page in samples.items()]
    baseline = rss_mb()
    started = time.perf_counter()
    from airflow_provider_doc2x.local.ocr import OcrEngine

    engine = OcrEngine(threads=args.threads or None)
    loaded = time.perf_counter() - started
    engine.parse(pages[0], "warm-up")
    started = time.perf_counter()
    for round_number in range(args.rounds):
        for number, image in enumerate(pages):
            engine.parse(image, f"bench-{round_number}-{number}")
    elapsed = time.perf_counter() - started
    parsed = args.rounds * len(pages)
    print(
        f"# ocr engine: {len(pages)} {kind} pages x {args.rounds} rounds, {os.cpu_count()} cores, threads {args.threads or 'all'}"
    )
    report(
        "figures",
        [
            ("model load (s)", f"{loaded:.2f}"),
            ("pages per second", f"{parsed / elapsed:.2f}"),
            ("seconds per page", f"{elapsed / parsed:.2f}"),
            ("peak memory over baseline (MB)", f"{rss_mb() - baseline:.0f}"),
        ],
    )


if __name__ == "__main__":
    main()
