"""
A real S3 API for the tests: moto's server, behind a proxy that logs every request and injects faults.

What it provides:

- :class:`MotoServer`: ``python -m moto.server`` started as its own process on a free loopback port
  (``reset()`` empties it through ``/moto-api/reset``).
- :class:`FaultProxy`: an HTTP/1.1 proxy in front of it, on a free loopback port, in a thread of its
  own. It forwards request and response bytes unchanged (heads, ``Content-Length`` and chunked
  bodies streamed as they come, ``Range``, ``Expect: 100-continue``) and logs every request
  (:class:`S3Request`: method, path, query, ``Range``, status, fault). Rules set by the test inject
  faults into the requests they match (method, path and query patterns, a number of times or
  always): ``slow_down`` (``503 SlowDown`` with S3's XML error body), ``deny`` (``403
  AccessDenied``; :meth:`FaultProxy.deny_delete` matches ``DELETE`` and the batch delete ``POST
  ?delete``), ``reset`` (the connection reset, before the request reaches S3 or after S3 did it),
  ``delay`` (an added pause, then the request goes through: a slow listing), and ``hold`` (a barrier:
  :meth:`FaultProxy.hold` keeps the matching requests waiting until that many wait at once, then
  lets them and every later one through, so that two clients are inside the same step together).
  Nothing in it is S3's own but the error bodies: ``answer`` (:meth:`FaultProxy.answer`,
  :meth:`FaultProxy.malformed`) replaces a chosen request's answer with any status and body, before
  the request reaches the upstream or after the upstream did it, so the same proxy in front of the
  local Doc2X server answers truncated JSON, wrong types or an HTML page to the calls it matches.
  ``forget_idle_after`` (seconds, or None) makes it a middlebox that forgets idle connections (a
  NAT or load balancer past its idle timeout, a server closing one just as a request comes): a
  request on a connection idle that long is read whole, then reset, and never reaches the upstream.
- The fixtures ``s3_server`` (session) and ``s3`` (each test), which a test module imports
  (``s3_server, s3 = tests.helpers.s3.s3_server, tests.helpers.s3.s3``); :func:`s3_env` is the same as a
  context manager. The server and proxy are started once per session (per xdist worker); for each test, no rules, an empty log, a fresh bucket, and the
  environment a user's deployment would have: an ``aws_default`` Airflow connection
  (``AIRFLOW_CONN_AWS_DEFAULT``, ``endpoint_url`` in its extra, dummy keys) for
  ``s3://aws_default@bucket/key``, and boto's own variables (``AWS_ENDPOINT_URL_S3``,
  ``AWS_ACCESS_KEY_ID``, ...) for a plain ``s3://bucket/key``, which Airflow's S3 filesystem
  opens with boto's default credentials, not with ``aws_default``. fsspec's and Airflow's caches of
  filesystems are cleared before and after each test, so no test sees another's listings.

Usage::

    def test_something(s3):
        path = ObjectStoragePath(s3.url("scans/a.png"))       # s3://<bucket>/scans/a.png
        s3.proxy.slow_down("GET", r"/scans/a\\.png$", times=2)  # the next 2 GETs answer 503
        ...
        assert [r.status for r in s3.proxy.requests("GET", r"/scans/a\\.png$")] == [503, 503, 206]

The filesystems' own retries are kept short through the connection and the environment (one
botocore attempt; s3fs still retries ``SlowDown`` and connection errors five times, as a user's
does), so a lasting fault takes a few seconds, not minutes. Set
``airflow_provider_doc2x.storage.objects.STORAGE_WAIT_INITIAL = 0`` in a test to drop the provider's
back-off too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from tests.helpers import free_port

_CHUNK = 64 * 1024
_NO_BODY_STATUSES = {204, 304}
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
)
#: The S3 errors a rule can answer with: status, code, message.
ERRORS = {
    "slow_down": (503, "SlowDown", "Please reduce your request rate."),
    "deny": (403, "AccessDenied", "Access Denied"),
}
_REASONS = {503: "Slow Down", 403: "Forbidden"}
#: Bodies that no JSON API answers, for :meth:`FaultProxy.malformed`: cut off mid-object, a success
#: envelope whose fields have the wrong types, and an HTML page sent with ``200 OK``.
MALFORMED_BODIES = {
    "truncated": b'{"code": "success", "data": {"status": "succ',
    "wrong_types": b'{"code": "success", "data": {"status": 7, "progress": "half", "result": [1, 2]}}',
    "not_json": b"<html><head><title>OK</title></head><body>Loading...</body></html>",
}
_MALFORMED_TYPES = {"not_json": "text/html; charset=utf-8"}


# -- moto's server ---------------------------------------------------------------------------------


class MotoServer:
    """``python -m moto.server`` on a free loopback port, as its own process."""

    def __init__(self, *, timeout: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{self.port}-{uuid.uuid4().hex[:8]}.log"
        self._log_file = self._log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(f"moto's server did not start on {self.url}: {output[-2000:]}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def output(self) -> str:
        """What the server printed (its request log and errors)."""
        self._log_file.flush()
        return self._log.read_text(errors="replace")

    def reset(self) -> None:
        """Forget every bucket and object."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        self._log.unlink(missing_ok=True)


# -- the proxy -------------------------------------------------------------------------------------


@dataclass
class S3Request:
    """One request the proxy saw, and what came of it."""

    method: str
    path: str  # decoded: /bucket/key
    query: str  # raw, as sent
    range: str | None  # the Range header, as sent
    status: int | None = None  # None: the connection was reset, or the request never ended
    fault: str | None = None  # the rule's fault that hit it

    def range_bounds(self) -> tuple[int, int | None] | None:
        """``(first, last)`` byte of a ``bytes=first-last`` Range (last None when open-ended)."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.range or "")
        if not match:
            return None
        return int(match[1]), int(match[2]) if match[2] else None


@dataclass
class Rule:
    """A fault for the requests that match; ``times=None`` means every one of them."""

    fault: str  # slow_down | deny | reset | delay | answer | hold
    method: str | None = None  # None: any
    path: str = ""  # a regex searched in the decoded path
    query: str = ""  # a regex searched in the raw query
    times: int | None = 1
    delay: float = 0.0  # for "delay": seconds before the request goes through
    after_upstream: bool = (
        False  # for "reset" and "answer": the upstream did the request; only its answer is lost
    )
    status: int = 200  # for "answer": the status, body and type answered instead
    body: bytes = b""
    content_type: str = "application/json"
    until: int = 0  # for "hold": requests held at once that open the barrier
    hits: int = 0
    met: bool = False  # for "hold": the barrier opened because ``until`` requests waited at once
    _gate: Any = field(default=None, repr=False)  # for "hold": an asyncio.Event of the proxy's loop

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return bool(re.search(self.path, path)) and bool(re.search(self.query, query))


@dataclass
class _Head:
    raw: bytes
    first_line: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; the last value wins

    @classmethod
    def parse(cls, raw: bytes) -> _Head:
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return cls(raw, lines[0], headers)

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class FaultProxy:
    """An HTTP/1.1 proxy to ``upstream`` that logs each request and injects the faults of its rules."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[S3Request] = []
        #: Seconds after which an idle client connection is forgotten (see the module's doc).
        self.forget_idle_after: float | None = None
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the S3 proxy did not start")

    # rules and log, for the tests

    def add(self, rule: Rule) -> Rule:
        """Inject ``rule``'s fault from now on; returns the rule (its ``hits`` count what it did)."""
        with self._lock:
            self._rules.append(rule)
        return rule

    def slow_down(self, method: str | None, path: str, *, times: int | None = 1, query: str = "") -> Rule:
        """Answer ``503 SlowDown`` to the next ``times`` matching requests (None: all of them)."""
        return self.add(Rule("slow_down", method, path, query, times))

    def reset(
        self, method: str | None, path: str, *, times: int | None = 1, query: str = "", after_upstream=False
    ) -> Rule:
        """Reset the connection of the next ``times`` matching requests instead of answering."""
        return self.add(Rule("reset", method, path, query, times, after_upstream=after_upstream))

    def deny_delete(self, path: str = "", *, times: int | None = None) -> list[Rule]:
        """Answer ``403 AccessDenied`` to deletes: single (``DELETE``) and batch (``POST ?delete``)."""
        return [
            self.add(Rule("deny", "DELETE", path, "", times)),
            self.add(Rule("deny", "POST", path, r"(^|&)delete(=|&|$)", times)),
        ]

    def delay(
        self, method: str | None, path: str, seconds: float, *, times: int | None = None, query: str = ""
    ) -> Rule:
        """Hold the matching requests ``seconds`` before they go through (``query="list-type"``: listings)."""
        return self.add(Rule("delay", method, path, query, times, delay=seconds))

    def hold(
        self, method: str | None, path: str, *, until: int, query: str = "", timeout: float = 60.0
    ) -> Rule:
        """Hold the matching requests until ``until`` of them wait at once, then let all through.

        A barrier between clients that the test cannot reach (other processes): with ``until=2`` on
        a step each client takes once, both are inside that step at the same time. The rule takes
        only the first ``until`` requests that match (later ones go to the other rules). If the
        barrier is not met within ``timeout`` seconds, it opens anyway (so nothing hangs) and the
        rule's ``met`` stays False.
        """
        return self.add(Rule("hold", method, path, query, until, delay=timeout, until=until))

    def answer(
        self,
        method: str | None,
        path: str,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "application/json",
        times: int | None = 1,
        query: str = "",
        after_upstream: bool = False,
    ) -> Rule:
        """Answer the next ``times`` matching requests with ``status`` and ``body`` instead.

        With ``after_upstream`` the upstream does the request (an upload is received and billed, a
        status is read) and only its answer is replaced; otherwise the request never reaches it.
        """
        return self.add(
            Rule(
                "answer",
                method,
                path,
                query,
                times,
                after_upstream=after_upstream,
                status=status,
                body=body,
                content_type=content_type,
            )
        )

    def malformed(
        self,
        method: str | None,
        path: str,
        kind: str = "truncated",
        *,
        times: int | None = 1,
        query: str = "",
        after_upstream: bool = False,
    ) -> Rule:
        """Answer ``200 OK`` with a malformed body (:data:`MALFORMED_BODIES`: ``truncated``, ``wrong_types``, ``not_json``)."""
        return self.answer(
            method,
            path,
            MALFORMED_BODIES[kind],
            content_type=_MALFORMED_TYPES.get(kind, "application/json"),
            times=times,
            query=query,
            after_upstream=after_upstream,
        )

    def clear(self) -> None:
        """No rules, and an empty log."""
        with self._lock:
            self._rules.clear()
            self._log.clear()

    def requests(self, method: str | None = None, path: str = "", query: str = "") -> list[S3Request]:
        """The logged requests (a copy), in the order they came, optionally only the matching ones."""
        with self._lock:
            log = list(self._log)
        return [
            entry
            for entry in log
            if (method is None or entry.method == method.upper())
            and re.search(path, entry.path)
            and re.search(query, entry.query)
        ]

    def stop(self) -> None:
        """Close the listener and every connection, then end the proxy's thread."""

        async def shutdown() -> None:
            self._server.close()
            for _ in range(10):  # a connection accepted meanwhile gets a task of its own: end it too
                tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # serving

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port, limit=1 << 20)
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            # A connection that came in after the last shutdown round: end its task before the loop closes.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _match(self, method: str, path: str, query: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path, query):
                    rule.hits += 1
                    return rule
        return None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                idle_since = time.monotonic()
                raw = await _read_head(reader)
                if raw is None:
                    return
                request = _Head.parse(raw)
                method, target = [*request.first_line.split(" "), "", ""][:2]
                path, _, query = target.partition("?")
                entry = S3Request(method.upper(), unquote(path), query, request.headers.get("range"))
                with self._lock:
                    self._log.append(entry)
                forget = self.forget_idle_after
                if forget is not None and upstream is not None and time.monotonic() - idle_since >= forget:
                    entry.fault = "forgotten"
                    await _pipe_body(reader, None, request, response=False)
                    _reset(writer)
                    return
                rule = self._match(entry.method, entry.path, entry.query)
                if rule is not None:
                    entry.fault = rule.fault
                    if rule.fault == "hold":
                        await self._hold(rule)
                    elif rule.delay:
                        await asyncio.sleep(rule.delay)
                    if rule.fault in ERRORS:
                        if not await self._answer_error(rule.fault, entry, request, reader, writer):
                            return
                        continue
                    if rule.fault == "answer" and not rule.after_upstream:
                        if not await self._answer(rule, entry, request, reader, writer, read_body=True):
                            return
                        continue
                    if rule.fault == "reset" and not rule.after_upstream:
                        _reset(writer)
                        return
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=1 << 20)
                keep = await self._forward(request, entry, rule, reader, writer, *upstream)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except asyncio.CancelledError:  # the proxy stops: the connection ends with it
            return
        finally:
            for stream in (writer, upstream[1] if upstream else None):
                if stream is not None and not stream.is_closing():
                    stream.close()

    async def _hold(self, rule: Rule) -> None:
        """Wait at ``rule``'s barrier until ``rule.until`` requests wait there (or its timeout)."""
        if rule._gate is None:
            rule._gate = asyncio.Event()
        with self._lock:
            if rule.hits >= rule.until and not rule._gate.is_set():  # every match so far waits here
                rule.met = True
        if rule.met:
            rule._gate.set()
        try:
            await asyncio.wait_for(rule._gate.wait(), rule.delay)
        except asyncio.TimeoutError:
            rule._gate.set()  # a client that never comes must not hang the others

    async def _answer_error(self, fault, entry, request, reader, writer) -> bool:
        """Answer S3's error for ``fault``; whether the connection stays open."""
        status, code, message = ERRORS[fault]
        expects = "100-continue" in request.headers.get("expect", "").lower()
        if not expects:  # the body was sent: read it, so that the connection stays usable
            await _pipe_body(reader, None, request, response=False)
        request_id = uuid.uuid4().hex[:16].upper()
        body = _ERROR_BODY.format(code=code, message=message, resource=entry.path, request_id=request_id)
        data = body.encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(data)}\r\n"
            f"x-amz-request-id: {request_id}\r\n"
            f"Connection: {'close' if expects else 'keep-alive'}\r\n\r\n"
        )
        entry.status = status  # logged before the client can see the answer and read the log
        writer.write(head.encode() + (b"" if entry.method == "HEAD" else data))
        await writer.drain()
        return not expects

    async def _answer(self, rule, entry, request, reader, writer, *, read_body: bool) -> bool:
        """Answer ``rule``'s status and body; whether the connection stays open."""
        expects = "100-continue" in request.headers.get("expect", "").lower()
        if read_body and not expects:  # the body was sent: read it, so that the connection stays usable
            await _pipe_body(reader, None, request, response=False)
        closes = expects and read_body
        head = (
            f"HTTP/1.1 {rule.status} {'OK' if rule.status == 200 else 'Error'}\r\n"
            f"Content-Type: {rule.content_type}\r\n"
            f"Content-Length: {len(rule.body)}\r\n"
            f"Connection: {'close' if closes else 'keep-alive'}\r\n\r\n"
        )
        entry.status = rule.status  # logged before the client can see the answer and read the log
        writer.write(head.encode() + (b"" if entry.method == "HEAD" else rule.body))
        await writer.drain()
        return not closes

    async def _forward(self, request, entry, rule, reader, writer, up_reader, up_writer) -> bool:
        """Send one request to S3 and its answer back; whether both connections stay open."""
        up_writer.write(request.raw)
        await up_writer.drain()
        body = asyncio.ensure_future(_pipe_body(reader, up_writer, request, response=False))
        try:
            while True:  # interim answers (100 Continue) go straight back
                raw = await _read_head(up_reader)
                if raw is None:
                    raise ConnectionResetError("S3 closed the connection")
                answer = _Head.parse(raw)
                status = int(answer.first_line.split(" ")[1])
                if status >= 200 or status == 101:
                    break
                writer.write(raw)
                await writer.drain()
            no_body = entry.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
            lost = rule is not None and rule.fault in ("reset", "answer")
            if not lost:
                entry.status = status  # logged before the client can see the answer and read the log
                writer.write(raw)
            until_close = await _pipe_body(
                up_reader, None if lost else writer, answer, response=True, no_body=no_body
            )
            await body
        finally:
            if not body.done():
                body.cancel()
        if lost and rule.fault == "answer":  # the upstream's answer was read and dropped; another goes back
            return await self._answer(rule, entry, request, reader, writer, read_body=False) and not (
                until_close or answer.closes or request.closes
            )
        if lost:
            _reset(writer)
            return False
        await writer.drain()
        return not (until_close or answer.closes or request.closes)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """A message's head (through the blank line), or None at a clean end of the connection."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise
        return None


async def _pipe_body(reader, writer, head: _Head, *, response: bool, no_body: bool = False) -> bool:
    """Copy the body that follows ``head`` (to nowhere if ``writer`` is None); whether it ran to EOF."""

    async def put(data: bytes) -> None:
        if writer is not None and data:
            writer.write(data)
            await writer.drain()

    if no_body:
        return False
    if head.chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            await put(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = await reader.readuntil(b"\r\n")
                    await put(line)
                    if line == b"\r\n":
                        return False
            rest = size + 2  # the chunk and its CRLF
            while rest:
                data = await reader.readexactly(min(rest, _CHUNK))
                rest -= len(data)
                await put(data)
    length = head.length
    if length is not None:
        rest = length
        while rest:
            data = await reader.read(min(rest, _CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", rest)
            rest -= len(data)
            await put(data)
        return False
    if not response:
        return False  # a request without a length has no body
    while data := await reader.read(_CHUNK):  # an answer without a length ends with the connection
        await put(data)
    return True


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), as a dropped connection looks to the client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- the environment of a test ---------------------------------------------------------------------


def s3_client(endpoint: str, **config: Any) -> Any:
    """A boto3 S3 client on ``endpoint`` (moto's server, or a proxy before it) with moto's credentials."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=Config(**config),
    )


@dataclass
class S3:
    """The S3 API of one test: a fresh bucket behind the proxy."""

    server: MotoServer
    proxy: FaultProxy
    bucket: str
    endpoint: str  # the proxy's URL: what a client is given

    def url(self, key: str = "", *, conn_id: str | None = None) -> str:
        """``s3://bucket/key``, or ``s3://conn_id@bucket/key`` through that Airflow connection."""
        user = f"{conn_id}@" if conn_id else ""
        return f"s3://{user}{self.bucket}/{key.lstrip('/')}"

    def client(self) -> Any:
        """A boto3 S3 client on the proxy, for setting up and looking at objects beside the code under test."""
        return s3_client(self.endpoint)

    def direct_client(self) -> Any:
        """A boto3 S3 client on moto itself: its requests are neither logged nor faulted."""
        return s3_client(self.server.url)

    def objects(self, prefix: str = "") -> list[str]:
        """The bucket's keys under ``prefix``, asked of moto directly (not logged, no fault)."""
        client = self.direct_client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


REGION = "us-east-1"
KEY_ID = "testing-key-id"
SECRET = "testing-secret"  # moto accepts any key; a dummy that is no one's credential


def aws_connection_json(endpoint: str) -> str:
    """An ``aws`` Airflow connection to ``endpoint`` as ``AIRFLOW_CONN_*`` takes it (JSON)."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": KEY_ID,
            "password": SECRET,
            "extra": {
                "endpoint_url": endpoint,
                "region_name": REGION,
                # One botocore attempt per call: s3fs retries on its own, and so does the provider.
                "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
            },
        }
    )


def s3_environment(endpoint: str, config_dir: Path) -> dict[str, str]:
    """The variables that point Airflow's ``aws_default`` and boto's default chain at ``endpoint``."""
    return {
        "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_json(endpoint),
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
        "AWS_EC2_METADATA_DISABLED": "true",
        # No profile or file of the machine's user is read.
        "AWS_CONFIG_FILE": str(config_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
    }


#: Variables of the machine that would steer boto elsewhere.
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION")


def forget_filesystems() -> None:
    """Drop the S3 filesystems fsspec and Airflow keep per process (and their listing caches)."""
    try:
        from airflow.sdk.io import store as stores
    except ImportError:  # Airflow 2
        from airflow.io import store as stores
    import s3fs

    for alias in [alias for alias in stores._STORE_CACHE if alias.split("-")[0] in {"s3", "s3a", "s3n"}]:
        stores._STORE_CACHE.pop(alias, None)
    s3fs.S3FileSystem.clear_instance_cache()


def start_s3() -> tuple[MotoServer, FaultProxy]:
    """Moto's server and the proxy in front of it; :func:`pytest.skip` with the reason if it cannot start."""
    for module in ("moto.server", "s3fs", "boto3", "airflow.providers.amazon"):
        pytest.importorskip(module, reason=f"the S3 tests need {module} (the test dependency group)")
    try:
        server = MotoServer()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"moto's S3 server cannot start: {error}")
    return server, FaultProxy(server.port)


@contextlib.contextmanager
def s3_env(server: MotoServer, proxy: FaultProxy, monkeypatch, tmp_path: Path) -> Iterator[S3]:
    """One test's S3: no rules, an empty log, a fresh bucket, the environment, no cached filesystem."""
    server.reset()
    proxy.clear()
    config_dir = tmp_path / "aws-config"
    config_dir.mkdir(exist_ok=True)
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment(proxy.url, config_dir).items():
        monkeypatch.setenv(name, value)
    forget_filesystems()
    s3 = S3(server, proxy, f"doc2x-{uuid.uuid4().hex[:12]}", proxy.url)
    s3.client().create_bucket(Bucket=s3.bucket)
    proxy.clear()  # the bucket's creation is not the test's
    try:
        yield s3
    finally:
        proxy.clear()
        forget_filesystems()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[tuple[MotoServer, FaultProxy]]:
    """Moto's server and the proxy, once per session (per xdist worker)."""
    server, proxy = start_s3()
    yield server, proxy
    proxy.stop()
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path) -> Iterator[S3]:
    """A fresh bucket on the S3 API, and the environment that points ``s3://`` paths at it."""
    with s3_env(*s3_server, monkeypatch, tmp_path) as env:
        yield env


@contextlib.contextmanager
def proxied_doc2x(server: Any, monkeypatch: Any) -> Iterator[FaultProxy]:
    """A fault proxy in front of a local Doc2X server, made ``doc2x_default``'s host: it can garble answers."""
    proxy = FaultProxy(int(server.url.rsplit(":", 1)[1]))
    connection = json.loads(server.connection_json())
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", json.dumps({**connection, "host": proxy.url}))
    try:
        yield proxy
    finally:
        proxy.stop()
