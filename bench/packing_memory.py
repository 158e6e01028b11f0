"""
Peak memory of packing a batch of images into PDFs, against the batch's size and one PDF's.

    python bench/packing_memory.py [--images 24] [--pdfs 12]

Measured with tracemalloc around ``pack_images``: PDFs are written to private temporary files one
at a time, so the peak follows one PDF's images (about twice their size), not the batch.
"""

from __future__ import annotations

import argparse
import os
import tracemalloc

from _support import SCRATCH, report


def noise_jpeg(path, side: int, seed: int) -> None:
    """A JPEG of random pixels (hard to compress): its size is mostly its pixels."""
    from PIL import Image

    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, "JPEG", quality=95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--images", type=int, default=24, help="images in the batch (default 24)")
    parser.add_argument("--pdfs", type=int, default=12, help="PDFs to pack them into (default 12)")
    parser.add_argument("--side", type=int, default=600, help="image side in pixels (default 600)")
    args = parser.parse_args()

    from airflow_provider_doc2x.pdf.packing import pack_images

    folder = SCRATCH / "packing-memory"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for number in range(args.images):
        path = folder / f"{number}.jpg"
        noise_jpeg(path, args.side, number)
        files.append(path)
    total = sum(path.stat().st_size for path in files)
    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    result = pack_images(files, pdf_max_bytes=total // args.pdfs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with result:
        pdfs = len(result.pdfs)
        largest = max(pdf.size for pdf in result.pdfs)
    print(f"# packing: {args.images} JPEGs of {args.side}x{args.side} into {pdfs} PDFs")
    report(
        "memory",
        [
            ("batch size (MB)", f"{total / 1e6:.2f}"),
            ("largest PDF (MB)", f"{largest / 1e6:.2f}"),
            ("peak over baseline (MB)", f"{(peak - baseline) / 1e6:.2f}"),
            ("peak / batch size", f"{(peak - baseline) / total:.2f}"),
            ("peak / largest PDF", f"{(peak - baseline) / largest:.2f}"),
        ],
    )


if __name__ == "__main__":
    main()
