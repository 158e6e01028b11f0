"""
Peak memory over baseline while submitting one 7 MB image (target: at most twice the file size).

    python bench/upload.py

Measured with tracemalloc around ``Doc2XHook.submit_image(path)``: the file is read once and
its bytes are the request body (no copy into a multipart form, no base64).
"""

from __future__ import annotations

import os
import tracemalloc

from _support import SCRATCH, LocalServer, make_images, report


def noise_png(path, target_bytes: int) -> None:
    """A PNG of random pixels (incompressible) just under ``target_bytes``."""
    from PIL import Image

    side = int((target_bytes / 3) ** 0.5) - 8
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(
        path, format="PNG", compress_level=0
    )


def main() -> None:
    server = LocalServer("--processing-time", "0.1")
    server.use_as_default_connection()
    image = SCRATCH / "large.png"
    noise_png(image, 7 * 1000 * 1000)
    size = image.stat().st_size

    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook

    hook = Doc2XHook()
    hook.submit_image(make_images(1, prefix="warm-up")[0])  # warm up: connection, settings, imports
    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    uid = hook.submit_image(image)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"# upload: one {size / 1e6:.2f} MB PNG, submitted as uid {uid}")
    report(
        "memory",
        [
            ("file size (MB)", f"{size / 1e6:.2f}"),
            ("peak over baseline (MB)", f"{(peak - baseline) / 1e6:.2f}"),
            ("peak / file size", f"{(peak - baseline) / size:.2f}"),
            ("billed at the server", server.stats()["billed_total"]),
        ],
    )


if __name__ == "__main__":
    main()
