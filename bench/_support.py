"""What every bench script needs: a private Airflow home, the local Doc2X server, images, a connection."""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRATCH = Path(tempfile.mkdtemp(prefix="doc2x-bench-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ.setdefault("AIRFLOW_HOME", str(SCRATCH / "airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["DOC2X_PACING_DIR"] = str(SCRATCH / "pacing")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

API_KEY = "sk-bench"


class LocalServer:
    """The local Doc2X server in its own process, as a user starts it."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airflow_provider_doc2x.local",
                "--port",
                "0",
                "--api-key",
                API_KEY,
                *args,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in self.process.stdout or []:
            if "listening on " in line:
                self.url = line.rsplit("listening on ", 1)[1].strip()
                break
        else:
            raise RuntimeError("the local Doc2X server did not start")
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client.get("/local/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
        atexit.register(self.stop)

    def configure(self, **knobs) -> None:
        self.client.post("/local/config", json=knobs).raise_for_status()

    def reset(self) -> None:
        self.client.post("/local/reset").raise_for_status()

    def stats(self) -> dict:
        return self.client.get("/local/stats").json()

    def use_as_default_connection(self, **extra) -> None:
        os.environ["AIRFLOW_CONN_DOC2X_DEFAULT"] = json.dumps(
            {"conn_type": "doc2x", "host": self.url, "password": API_KEY, "extra": extra}
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


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
