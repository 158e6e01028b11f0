"""The local Doc2X server in a child process: for tests of DAGs that use Doc2X, benchmarks and scripts.

    with LocalServerProcess(api_key="sk-test") as server:
        os.environ["AIRFLOW_CONN_DOC2X_DEFAULT"] = server.connection_json()
        ...                                   # run the DAG; then server.stats()["billed_total"]

The server runs exactly as ``python -m airflow_provider_doc2x.local`` starts it, on a free port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx


class LocalServerProcess:
    """Start, steer (``configure``, ``reset``) and read (``stats``) a local Doc2X server process.

    Args:
        args: more command-line options, e.g. ``"--engine", "ocr"`` (see ``doc2x-local-server --help``).
        api_key: the only key the server accepts; by default it accepts any, and
            :meth:`connection_json` uses ``sk-local``.
        echo_key: quote the ``Authorization`` header in every error answer (``--echo-key``; also
            settable at run time as the ``echo_key`` knob).
        startup_timeout: seconds to wait for the server to answer.

    Raises:
        RuntimeError: the server did not start, or did not answer in time.
    """

    def __init__(
        self, *args: str, api_key: str | None = None, echo_key: bool = False, startup_timeout: float = 60.0
    ) -> None:
        """Start the server and wait until it answers."""
        self.api_key = api_key or "sk-local"
        command = [sys.executable, "-m", "airflow_provider_doc2x.local", "--port", "0", *args]
        if api_key:
            command += ["--api-key", api_key]
        if echo_key:
            command.append("--echo-key")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.url = self._read_url()
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self._wait_until_healthy(startup_timeout)

    def _read_url(self) -> str:
        seen = []
        for line in self.process.stdout or []:  # Airflow may log a line or two before the server's own
            seen.append(line)
            if "listening on " in line:
                return line.rsplit("listening on ", 1)[1].strip()
            if len(seen) > 50:
                break
        self.process.kill()
        raise RuntimeError(f"The local Doc2X server did not start: {''.join(seen)!r}")

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.get("/local/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"The local Doc2X server at {self.url} did not answer within {timeout}s")
            time.sleep(0.05)

    def configure(self, **knobs: Any) -> None:
        """Change knobs of the running server (the fields of ``ServerConfig``), e.g. ``latency=0.5``."""
        self.client.post("/local/config", json=knobs).raise_for_status()

    def reset(self) -> None:
        """Return to the knobs the server started with; forget jobs, billing and counters."""
        self.client.post("/local/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        """Read the server's counters: ``billed_total``, ``billed`` per image hash, ``keyless_routes``, ..."""
        return self.client.get("/local/stats").json()

    def connection_json(self, api_key: str | None = None, **extra: Any) -> str:
        """Describe a ``doc2x`` connection to this server, for ``AIRFLOW_CONN_...`` variables."""
        return json.dumps(
            {"conn_type": "doc2x", "host": self.url, "password": api_key or self.api_key, "extra": extra}
        )

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> LocalServerProcess:
        """Return the running server."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server."""
        self.stop()
