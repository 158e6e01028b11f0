"""What every bench script needs: a private Airflow home, the local Doc2X server, images, a connection."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

SCRATCH = Path(tempfile.mkdtemp(prefix="doc2x-bench-"))
if os.environ.get("DOC2X_BENCH_KEEP"):  # keep the scratch folder (Airflow home, logs) to look into
    print(f"# scratch folder, kept: {SCRATCH}")
else:
    atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ.setdefault("AIRFLOW_HOME", str(SCRATCH / "airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["DOC2X_PACING_DIR"] = str(SCRATCH / "pacing")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_provider_doc2x.local.process import LocalServerProcess  # noqa: E402

API_KEY = "sk-bench"


class LocalServer(LocalServerProcess):
    """The local server in its own process, its connection made the default for the bench's hooks."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args, api_key=API_KEY)
        atexit.register(self.stop)

    def use_as_default_connection(self, **extra) -> None:
        os.environ["AIRFLOW_CONN_DOC2X_DEFAULT"] = self.connection_json(**extra)

    def stop(self) -> None:
        if self.process.poll() is None:
            super().stop()


def make_images(count: int, folder: Path | None = None, prefix: str = "page") -> list[str]:
    """``count`` small, distinct PNG pages (each carries its own text, so each bills separately)."""
    from PIL import Image, PngImagePlugin

    folder = folder or SCRATCH / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        info = PngImagePlugin.PngInfo()
        info.add_text("doc2x", f"# {prefix.title()} {number}\n\nBench page number {number}.")
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (number % 256, 255, 255)).save(buffer, format="PNG", pnginfo=info)
        path = folder / f"{prefix}-{number:04d}.png"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def report(title: str, rows: list[tuple[str, object]]) -> None:
    print(f"\n## {title}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")


def sustained_rate(stats: dict, limit: int) -> float:
    """
    Uploads per second at the server once the key's window is in use: from the limit-th billed
    upload to the last. The first ``limit`` uploads may go at once (the window starts empty); after
    that the window's rule sets the pace, so the rate is measured there, free of the first burst's
    length.
    """
    times = stats["billed_seconds"]
    if len(times) <= limit or times[-1] <= times[limit - 1]:
        return 0.0
    return (len(times) - limit) / (times[-1] - times[limit - 1])


def figures(server: LocalServer, count: int, seconds: float, parsed: int, limit: int, window: float):
    """The rows of a throughput run, from the server's own count of what it billed and refused."""
    stats = server.stats()
    limit_rate = limit / window
    return [
        ("images", count),
        ("sustained uploads/s / limit", f"{sustained_rate(stats, limit) / limit_rate:.3f}"),
        ("end-to-end seconds", f"{seconds:.1f}"),
        ("end-to-end images/s / limit", f"{count / seconds / limit_rate:.3f}"),
        ("429 answers", stats["rate_limited"]),
        ("not parsed (named in a task's error)", count - parsed),
        ("max billings of one image", stats["max_billed_per_image"]),
    ]


class CountingRelay:
    """
    A TCP relay on loopback in front of ``upstream`` (``http://host:port``) that counts the bytes
    each way: what a task sent to the server and received, request heads included.

    The relay forwards bytes unchanged, so the ``Host`` a client sends names the relay, and the
    local server's presigned PUT urls (built from it) lead through the relay too.
    """

    def __init__(self, upstream: str) -> None:
        import asyncio
        import threading

        host, port = upstream.split("//", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.sent = 0
        self.received = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
            ready.set()

        threading.Thread(target=self.loop.run_forever, name="counting-relay", daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        if not ready.wait(10):
            raise RuntimeError("the counting relay did not start")

    def reset(self) -> None:
        self.sent = self.received = 0

    async def _client(self, reader, writer) -> None:
        import asyncio

        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return

        async def pipe(source, sink, upstream: bool) -> None:
            try:
                while data := await source.read(65536):
                    if upstream:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


class FirstBilling:
    """
    When the local server billed its first upload, as a UTC time, and from it when it billed its
    last: ``/local/stats`` gives each billing in seconds after the first, not the time of day.

    A thread polls ``/local/stats`` every ``interval`` seconds from now (after ``server.reset()``)
    until an upload is billed, then stops: :attr:`at` is when the poll that first saw a billing was
    sent, so it is late by at most one interval and one request. The stats are tiny until then.
    """

    def __init__(self, server: LocalServer, interval: float = 0.02) -> None:
        import threading

        self.server = server
        self.interval = interval
        self.at = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="first-billing", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from datetime import datetime, timezone

        import httpx

        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            while not self._stop.is_set():
                sent = datetime.now(timezone.utc)
                try:
                    billed = client.get("/local/stats").json()["billed_total"]
                except httpx.TransportError:
                    billed = 0
                if billed:
                    self.at = sent
                    return
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def last(self, stats: dict | None = None):
        """When the server billed its last upload (UTC), or None if it billed none."""
        from datetime import timedelta

        self.stop()
        times = (stats or self.server.stats())["billed_seconds"]
        if self.at is None or not times:
            return None
        return self.at + timedelta(seconds=times[-1])
