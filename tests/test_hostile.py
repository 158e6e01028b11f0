"""
A hostile answer, a hostile neighbour or a hostile path never leaks the key, hangs, or loses a result.

The misbehaving server here is this module's own: a raw asyncio HTTP server on loopback that answers
whatever a test asks of it (the key echoed back, one byte a second, a gzip bomb, a 2 GiB body,
malformed JSON of every shape, hostile ``convert_zip`` payloads, a uid with a newline). Every
numbered point of the hardening work has a test here:

1. the key in server text: exceptions, ``test_connection``, trigger kwargs and events, task logs;
2. a hostile neighbour's pacing folder (through the hook; the window's own tests are in test_pacing);
3. an overall deadline per request, and the trigger's deadline while a request drips;
4. a cap on the answer's size, after decompression;
5. malformed shapes become typed errors (and a property test throws arbitrary JSON at the readers);
6. a hostile ``convert_zip`` keeps the Markdown;
7. ``image_path`` fetches no URL, unless the operator names its scheme in ``allow_schemes``;
8. an input error quotes no bytes of the file;
9. a uid with a newline forges no log line;
10. the sensor fails the same way, poking or deferred;
and the connection test's answers (no scheme, unreachable, internal words, empty key).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import http.server
import io
import json
import logging
import multiprocessing
import os
import stat
import threading
import time
import zipfile
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException, TaskDeferred
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import make_event
from airflow_provider_doc2x.exceptions import (
    Doc2XError,
    Doc2XInputError,
    Doc2XJobNotFoundError,
    Doc2XPermanentError,
    Doc2XProtocolError,
    Doc2XStorageError,
    Doc2XSubmitUncertainError,
    is_permanent,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.sensors.doc2x import Doc2XImageParseSensor
from airflow_provider_doc2x.storage import objects as storage
from airflow_provider_doc2x.storage.objects import storage_path
from airflow_provider_doc2x.storage.results import ResultStore
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger
from tests.helpers import REPO, airflow_cli, first_event, parse_operator, run_deferred, wait_until
from tests.helpers.storage import use_for_memory

SECRET = "sk-hostile-echo-5f3a9c0d1e2b"


# -- the misbehaving server ------------------------------------------------------------------------


@dataclass
class Request:
    """What the server received."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


Reply = Callable[[asyncio.StreamWriter], Awaitable[None]]


def answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    """A whole answer at once."""

    async def write(writer: asyncio.StreamWriter) -> None:
        head = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"}
        writer.write(_head(status, {**head, **(headers or {})}) + body)
        await writer.drain()

    return write


def envelope(data: Any = None, *, code: str = "success", msg: str | None = None, status: int = 200) -> Reply:
    """Doc2X's JSON envelope."""
    payload: dict[str, Any] = {"code": code}
    if data is not None:
        payload["data"] = data
    if msg is not None:
        payload["msg"] = msg
    return answer(status, json.dumps(payload).encode())


def drip(seconds_per_byte: float = 0.5) -> Reply:
    """Headers, then a body one byte at a time, forever: per-read timeouts never fire."""

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, {"Content-Type": "application/json", "Content-Length": "100000"}))
        await writer.drain()
        while True:
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(seconds_per_byte)

    return write


def endless(chunk: bytes, headers: dict[str, str]) -> Reply:
    """The same chunk again and again, for as long as the client reads."""

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, {"Content-Type": "application/json", **headers}))
        while True:
            writer.write(chunk)
            await writer.drain()

    return write


def silence() -> Reply:
    """Accept the request and never answer."""

    async def write(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    return write


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class HostileServer:
    """A loopback HTTP server whose every answer is what ``handler`` makes of the request."""

    handler: Callable[[Request], Reply] = field(default=lambda request: envelope(code="internal_error"))
    requests: list[Request] = field(default_factory=list)

    def start(self) -> HostileServer:
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()

        async def serve() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        assert ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            path, _, query = target.partition("?")
            request = Request(method, path, query, headers, body)
            self.requests.append(request)
            await self.handler(request)(writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
def hostile(monkeypatch, tmp_path):
    """The hostile server as ``doc2x_default``, with SECRET as the key; quick retries."""
    server = HostileServer().start()
    monkeypatch.setenv("DOC2X_PACING_DIR", str(tmp_path / "pacing"))
    connect(monkeypatch, server.url)
    yield server
    server.stop()


def connect(monkeypatch, host: str, key: str = SECRET, **extra: Any) -> None:
    extra = {"retry_wait": 0.01, "retry_wait_max": 0.02, "max_retries": 1, **extra}
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT",
        json.dumps({"conn_type": "doc2x", "host": host, "password": key, "extra": extra}),
    )


def echo(request: Request) -> str:
    """What a proxy or WAF that echoes the request's headers writes."""
    return f"denied request with Authorization: {request.headers.get('authorization')} and key {SECRET}"


def logged(caplog, capfd) -> str:
    """What was logged: the records, and the captured streams (Airflow 3 logs through structlog to them)."""
    return "\n".join([record.getMessage() for record in caplog.records] + list(capfd.readouterr()))


def assert_logs_would_show(caplog, capfd, own_logger: Any, text: str) -> None:
    """Positive control: ``text`` logged through ``own_logger`` and a package module's logger is read back.

    ``own_logger`` is the hook's or the trigger's ``log`` (structlog on Airflow 3, writing to the
    streams); the module loggers are the standard library's (records). A check that a text is absent
    from :func:`logged` means something only if both ways in are seen.
    """
    own_logger.info("control through its own logger: %s", text)
    logging.getLogger("airflow_provider_doc2x.transport").info("control through a module logger: %s", text)
    seen = logged(caplog, capfd)
    assert f"control through its own logger: {text}" in seen
    assert f"control through a module logger: {text}" in seen


# -- 1. the key never leaks ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 401, 500, 502])
def test_a_server_that_echoes_the_key_puts_it_in_no_exception(hostile, status):
    hostile.handler = lambda request: envelope(code="parse_error", msg=echo(request), status=status)
    with pytest.raises(Doc2XError) as caught:
        Doc2XHook().get_job_status("some-uid")
    texts = [str(caught.value), repr(caught.value), caught.value.message, repr(caught.value.__cause__)]
    assert not [text for text in texts if SECRET in text]
    hostile.handler = lambda request: answer(status, echo(request).encode(), {"Content-Type": "text/html"})
    with pytest.raises(Doc2XError) as caught:
        Doc2XHook().get_job_status("some-uid")
    assert SECRET not in str(caught.value)
    if status != 401:  # the body is quoted, redacted
        assert "Bearer ***" in str(caught.value)


def test_the_connection_test_repeats_no_key(hostile):
    hostile.handler = lambda request: envelope(code="internal_error", msg=echo(request), status=503)
    ok, message = Doc2XHook().test_connection()
    assert not ok
    assert SECRET not in message


def test_trigger_kwargs_and_events_carry_no_server_prose(hostile, caplog, capfd):
    """The server's words go to the triggerer's log only, redacted; kwargs and events hold fixed texts."""
    caplog.set_level(logging.INFO)
    hostile.handler = lambda request: envelope(
        {"status": "failed", "detail": echo(request)} if "uid=a" in request.query else None,
        code="success" if "uid=a" in request.query else "parse_error",
        msg=echo(request),
    )
    trigger = make_trigger(["a", "b"])
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "failed"
    carried = json.dumps([trigger.serialize()[1], event])
    assert SECRET not in carried and "denied" not in carried  # fixed texts and codes only
    assert {job["code"] for job in event["jobs"]} == {"parse_error"}
    log = logged(caplog, capfd)
    # Each failure was logged with the server's prose, redacted (this capture holds the trigger's lines) ...
    for uid in ("a", "b"):
        assert [line for line in log.splitlines() if f"{uid}.png failed" in line and "denied request" in line]
    assert SECRET not in log  # ... and the key is not in it
    assert_logs_would_show(caplog, capfd, trigger.log, SECRET)


def test_a_resumed_try_whose_jobs_all_failed_registers_the_key_with_the_masker(hostile):
    from airflow.providers.common.compat.sdk import redact

    key = "sk-registered-on-resume-7c1d"
    connect(hostile_monkeypatch := pytest.MonkeyPatch(), hostile.url, key=key)
    try:
        event = make_event(
            "failed", [{"uid": "u", "source": "a.png", "status": "failed", "code": "parse_error"}], ""
        )
        with pytest.raises(Doc2XError):
            parse_operator(["a.png"]).execute_complete({}, event)
        assert key not in str(redact(f"a log line that quotes {key}"))
    finally:
        hostile_monkeypatch.undo()


def test_task_logs_hold_no_key_when_every_job_failed(hostile, airflow_db, make_image):
    """End to end (``airflow dags test``): the server accepts uploads, then fails every job, echoing the key."""

    def handler(request: Request) -> Reply:
        if request.method == "POST":
            return envelope({"uid": f"uid-{len(hostile.requests)}"})
        return envelope(code="parse_error", msg=echo(request))

    hostile.handler = handler
    image = make_image(title="Doomed")
    result = airflow_cli(
        "dags",
        "test",
        "example_doc2x_parse_image",
        "-c",
        json.dumps({"image": str(image), "markdown_dir": str(image.parent / "md")}),
        env={"AIRFLOW_CONN_DOC2X_DEFAULT": os.environ["AIRFLOW_CONN_DOC2X_DEFAULT"]},
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "parse_error" in output  # the failure is named ...
    assert SECRET not in output  # ... and the key is not in any log line


# -- 2. a hostile neighbour's pacing folder ----------------------------------------------------------


def test_a_symlinked_window_file_is_not_followed_by_an_upload(hostile, make_image, tmp_path, monkeypatch):
    from airflow_provider_doc2x.pacing import key_digest, reset_limiters

    folder = tmp_path / "neighbour-pacing"
    folder.mkdir(mode=0o700)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (folder / f"{key_digest(hostile.url, SECRET)}.json").symlink_to(target)
    monkeypatch.setenv("DOC2X_PACING_DIR", str(folder))
    reset_limiters()
    hostile.handler = lambda request: envelope({"uid": "fine-uid"})
    assert Doc2XHook().submit_image(make_image()) == "fine-uid"  # the upload goes on, paced in memory
    assert target.read_text() == "keep me"
    reset_limiters()


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a folder owned by another user")
def test_a_pacing_folder_of_another_user_is_not_used(hostile, make_image, tmp_path, monkeypatch):
    from airflow_provider_doc2x.pacing import reset_limiters

    folder = tmp_path / "theirs"
    folder.mkdir()
    folder.chmod(0o777)
    os.chown(folder, 65534, 65534)
    monkeypatch.setenv("DOC2X_PACING_DIR", str(folder))
    reset_limiters()
    hostile.handler = lambda request: envelope({"uid": "fine-uid"})
    assert Doc2XHook().submit_image(make_image()) == "fine-uid"
    assert list(folder.iterdir()) == []
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777  # not ours to change
    reset_limiters()


# -- 3. deadlines --------------------------------------------------------------------------------


def test_a_dripping_answer_is_cut_off_at_the_overall_deadline(hostile, monkeypatch):
    connect(monkeypatch, hostile.url, timeout=1.0, max_retries=0)
    hostile.handler = lambda request: drip()
    with pytest.raises(Doc2XError, match=r"no complete answer within 1s"):
        Doc2XHook().get_job_status("dripping-uid")


def test_a_dripping_upload_answer_is_uncertain_not_resent(hostile, monkeypatch, make_image):
    connect(monkeypatch, hostile.url, timeout=1.0, max_retries=3)
    hostile.handler = lambda request: drip()
    with pytest.raises(Doc2XSubmitUncertainError):
        Doc2XHook().submit_image(make_image())
    assert len(hostile.requests) == 1


def test_the_triggers_deadline_holds_while_a_request_drips(hostile, monkeypatch):
    connect(monkeypatch, hostile.url, timeout=120.0)  # each request alone would wait two minutes
    hostile.handler = lambda request: drip()
    trigger = make_trigger(["slow"], timeout=2.0, poll_interval=0.1)

    async def bounded() -> dict:
        return await asyncio.wait_for(first_event(trigger), timeout=60)

    event = asyncio.run(bounded())
    assert event["status"] == "timeout"
    assert event["jobs"][0]["status"] == "processing"


# -- 4. a cap on the answer's size ------------------------------------------------------------------


def gzip_bomb() -> Reply:
    """An endless gzip stream of zeros: about 1 KB on the wire for each MiB it inflates to."""

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}))
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        zeros = b"\0" * (1 << 20)
        while True:
            writer.write(compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH))
            await writer.drain()

    return write


def test_a_gzip_bomb_is_refused_at_the_cap(hostile, monkeypatch):
    connect(monkeypatch, hostile.url, max_answer_bytes=4 << 20, max_retries=0)
    hostile.handler = lambda request: gzip_bomb()
    with pytest.raises(Doc2XProtocolError, match="over the cap of 4194304 bytes"):
        Doc2XHook().get_job_status("bomb-uid")


@pytest.mark.parametrize("declared", [True, False])
def test_a_huge_body_is_refused_at_the_cap(hostile, monkeypatch, declared):
    connect(monkeypatch, hostile.url, max_answer_bytes=1 << 20, max_retries=3)
    headers = {"Content-Length": str(2 << 30)} if declared else {}
    hostile.handler = lambda request: endless(b"0" * 65536, headers)
    with pytest.raises(Doc2XProtocolError, match="over the cap"):
        Doc2XHook().get_job_status("huge-uid")
    assert len(hostile.requests) == 1  # refused, not retried


def test_an_encoding_that_was_not_asked_for_is_refused(hostile):
    hostile.handler = lambda request: answer(200, b"\x1b\x00\x00", {"Content-Encoding": "br"})
    with pytest.raises(Doc2XProtocolError, match="not asked for"):
        Doc2XHook().get_job_status("br-uid")


# -- 5. malformed shapes -------------------------------------------------------------------------

MALFORMED = {
    "page not an object": {"status": "success", "result": {"pages": ["abc"]}},
    "page_idx not a number": {"status": "success", "result": {"pages": [{"page_idx": "x", "md": ""}]}},
    "width infinite": b'{"code": "success", "data": {"status": "success", "result": {"pages": [{"page_width": 1e999}]}}}',
    "md a list": {"status": "success", "result": {"pages": [{"md": ["#"]}]}},
    "pages a dict": {"status": "success", "result": {"pages": {"0": {}}}},
    "status a number": {"status": 7},
    "status with a newline": {"status": "processing\nFORGED"},
    "uid with a newline": {"uid": "abc\nFORGED", "status": "success", "result": {"pages": []}},
    "code a list": b'{"code": ["success"], "data": {}}',
    "data a list": b'{"code": "success", "data": [1]}',
    "nested deep": b'{"code": "success", "data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "not UTF-8": b'{"code": "success", "data": {"status": "\xff\xfe"}}',
}


def body_of(case: str) -> bytes:
    shape = MALFORMED[case]
    return shape if isinstance(shape, bytes) else json.dumps({"code": "success", "data": shape}).encode()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_status_is_a_typed_error(hostile, case):
    body = body_of(case)
    hostile.handler = lambda request: answer(200, body)
    with pytest.raises(Doc2XProtocolError):
        Doc2XHook().get_job_status("a-uid")


def test_progress_nan_and_unknown_statuses_are_read_not_raised(hostile):
    hostile.handler = lambda request: answer(
        200, b'{"code": "success", "data": {"status": "queued", "progress": NaN}}'
    )
    status = Doc2XHook().get_job_status("a-uid")
    assert (status.status, status.progress, status.is_terminal) == ("queued", None, False)


def test_the_trigger_survives_every_malformed_answer(hostile):
    """Each shape is asked about again next round; past the bound, the job fails alone with its uid."""
    bodies = iter([body_of(case) for case in sorted(MALFORMED)] * 3)
    hostile.handler = lambda request: answer(200, next(bodies))
    event = asyncio.run(first_event(make_trigger(["x"], max_consecutive_errors=len(MALFORMED) - 1)))
    # One round per shape: a trigger that gave up (or failed the job) at an earlier answer asked less.
    assert len(hostile.requests) == len(MALFORMED)
    assert event["status"] == "failed"
    (job,) = event["jobs"]
    assert (job["uid"], job["status"], job["code"]) == ("x", "failed", "protocol_error")
    assert f"malformed {len(MALFORMED)} times in a row" in job["message"]


def test_an_unknown_status_is_named_at_the_deadline(hostile):
    hostile.handler = lambda request: envelope({"status": "queued"})
    event = asyncio.run(first_event(make_trigger(["q"], timeout=0.5)))
    assert event["status"] == "timeout"
    with pytest.raises(
        Doc2XError, match=r"still 'queued' at the deadline \(a status this provider does not know"
    ):
        parse_operator(["q.png"]).execute_complete({}, event)


def test_a_failed_status_with_detail_is_understood(hostile):
    hostile.handler = lambda request: envelope({"status": "failed", "detail": "parse_timeout"})
    event = asyncio.run(first_event(make_trigger(["t"])))
    assert (event["status"], event["jobs"][0]["status"]) == ("failed", "failed")


# -- 6. a hostile convert_zip keeps the Markdown ---------------------------------------------------


def zip_of(entries: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return base64.b64encode(buffer.getvalue()).decode()


HOSTILE_PAYLOADS = {
    "scheme memory": zip_of({"memory://x": b"x", "images/fig.jpg": b"ok"}),
    "scheme s3": zip_of({"s3:/bucket/x": b"x", "images/fig.jpg": b"ok"}),
    "file where a folder goes": zip_of({"images": b"x", "images/fig.jpg": b"ok"}),
    "same name twice": zip_of({"images/fig.jpg": b"ok", "images//fig.jpg": b"again"}),
    "300-character name": zip_of({"images/" + "n" * 300 + ".jpg": b"x", "images/fig.jpg": b"ok"}),
    "not a string": {"images/fig.jpg": "a dict"},
    "a number": 12345,
}


#: The one warning each hostile payload is worth.
HOSTILE_WARNINGS = {
    "scheme memory": "refused unsafe entry 'memory://x'",
    "scheme s3": "refused unsafe entry 's3:/bucket/x'",
    "file where a folder goes": "refused entry 'images/fig.jpg', which clashes with another",
    "same name twice": "refused entry 'images/fig.jpg', which clashes with another",
    "300-character name": "refused unsafe entry 'images/nnnnnnnnnn",
    "not a string": "is not valid base64; kept raw",
    "a number": "is not valid base64; kept raw",
}


def memory_objects(fs: Any) -> dict[str, bytes | None]:
    """Everything in the memory filesystem's store: each file's bytes, and each folder (None)."""
    return {**{path: None for path in fs.pseudo_dirs}, **{path: f.getvalue() for path, f in fs.store.items()}}


def local_files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file() or path.is_symlink()}


@pytest.mark.parametrize("output", ["local", "memory"])
@pytest.mark.parametrize("case", sorted(HOSTILE_PAYLOADS))
def test_a_hostile_convert_zip_keeps_the_markdown_and_writes_nothing_outside(tmp_path, case, output, caplog):
    """Nothing lands outside the result's folder, in the output's storage, memory:// or the disk."""
    caplog.set_level(logging.WARNING)
    memory = use_for_memory(MemoryFileSystem)  # memory:// as Airflow sees it, with its shared store
    memory_before = memory_objects(memory)
    disk_before = local_files(tmp_path)
    payload = HOSTILE_PAYLOADS[case]
    text = protocol._convert_zip_text(payload)  # what the protocol reader hands on
    result = protocol.Doc2XResult(
        "uid-1", (protocol.Doc2XPage(0, 10, 10, '# Kept\n\n<img src="fig.jpg"/>'),), text
    )
    out = str(tmp_path / "out") if output == "local" else f"memory://hostile-zip/{tmp_path.name}/out"
    record = ResultStore(out).write("page.png", "d" * 64, result)
    markdown = storage_path(record["markdown_path"])
    assert markdown.read_text().startswith("# Kept")
    folder = markdown.parent
    # On the disk: the result's files only, in its folder; nothing at all for a memory:// output.
    on_disk = Path(str(folder).removeprefix("file://")) if output == "local" else None
    written = local_files(tmp_path) - disk_before
    assert {path for path in written if on_disk is None or on_disk not in path.parents} == set()
    # In memory://'s store: the result's folder, what it holds and the folders above it; nothing at
    # all for a local output (a ``memory://x`` entry joined to a local folder would land here).
    inside = memory._strip_protocol(str(folder)) if output == "memory" else None
    after = memory_objects(memory)
    changed = {
        path for path, data in after.items() if path not in memory_before or memory_before[path] != data
    }

    def in_the_folder(path: str) -> bool:
        return inside is not None and (
            path == inside
            or path.startswith(inside + "/")
            or (after[path] is None and inside.startswith(path.rstrip("/") + "/"))
        )

    assert {path for path in changed if not in_the_folder(path)} == set()
    # Positive control: the scans see the result itself where it was written.
    if output == "memory":
        assert memory._strip_protocol(str(markdown)) in changed
    else:
        assert Path(str(markdown).removeprefix("file://")) in written
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len([warning for warning in warnings if HOSTILE_WARNINGS[case] in warning]) == 1  # logged once
    assert len(warnings) == len(set(warnings))  # and nothing twice


def test_a_hostile_convert_zip_from_the_server_does_not_fail_the_task(hostile, make_image, tmp_path):
    payload = HOSTILE_PAYLOADS["scheme memory"]

    def handler(request: Request) -> Reply:
        if request.method == "POST":
            return envelope({"uid": "zip-uid"})
        pages = [
            {
                "page_idx": 0,
                "page_width": 10,
                "page_height": 10,
                "md": '# From The Server\n\n<img src="fig.jpg"/>',
            }
        ]
        return envelope({"status": "success", "result": {"pages": pages}, "convert_zip": payload})

    hostile.handler = handler
    (record,) = run_deferred(
        parse_operator([make_image()], deferrable=True, output_path=str(tmp_path / "lake")), {}
    )
    markdown = Path(record["markdown_path"].removeprefix("file://")).read_text()
    assert markdown.startswith("# From The Server")
    assert record["figure_paths"][0].endswith("images/fig.jpg")


# -- 7 and 8. inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https", "ftp"])
def test_image_path_fetches_no_url(hostile, scheme):
    address = f"{scheme}://127.0.0.1:{hostile.port}/x.png"
    with pytest.raises(Doc2XInputError, match=f"uses the scheme '{scheme}'") as caught:
        parse_operator([address]).execute({})
    assert "allow_schemes" in str(caught.value)
    assert hostile.requests == []


class FileServer(http.server.ThreadingHTTPServer):
    """Loopback HTTP serving fixed files (with byte ranges, as fsspec's HTTP reader asks); records each request."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _FileHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _FileHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        self.server.requests.append((self.command, self.path))
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        if data == b"503":
            self.send_error(503)  # the server is overloaded: it says nothing about the file
            return
        wanted = self.headers.get("Range", "").removeprefix("bytes=")
        if wanted:
            first, _, last = wanted.partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[start : end + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def file_server():
    server = FileServer({})
    yield server
    server.shutdown()
    server.server_close()


def test_allow_schemes_reads_an_image_through_the_scheme_it_names(doc2x, make_image, file_server):
    """``allow_schemes=["http"]`` makes an ``http://`` image readable: fetched, uploaded and parsed."""
    file_server.files["scan.png"] = make_image(title="Fetched Over HTTP").read_bytes()
    url = file_server.url("scan.png")
    (record,) = parse_operator([url], allow_schemes=["http"]).execute({})
    assert record["source"] == url
    assert record["markdown"].startswith("# Fetched Over HTTP")
    assert ("GET", "/scan.png") in file_server.requests
    assert doc2x.stats()["billed_total"] == 1


def test_without_allow_schemes_the_same_url_is_refused_unread(doc2x, make_image, file_server):
    file_server.files["scan.png"] = make_image(title="Fetched Over HTTP").read_bytes()
    url = file_server.url("scan.png")
    with pytest.raises(Doc2XInputError, match="uses the scheme 'http'"):
        parse_operator([url]).execute({})
    with pytest.raises(Doc2XInputError, match="uses the scheme 'http'"):
        parse_operator([url], allow_schemes=["https"]).execute({})  # another scheme named
    assert file_server.requests == []
    assert doc2x.stats()["billed_total"] == 0


def test_an_allowed_url_whose_server_fails_is_retryable_and_a_missing_one_an_input_error(
    doc2x, file_server, monkeypatch
):
    """fsspec reads every HTTP failure as "not found": a 503 must not become a permanent bad input."""
    monkeypatch.setattr(storage, "STORAGE_WAIT_INITIAL", 0)
    file_server.files["busy.png"] = b"503"
    with pytest.raises(Doc2XStorageError, match=r"busy\.png") as caught:
        parse_operator([file_server.url("busy.png")], allow_schemes=["http"]).execute({})
    assert not is_permanent(caught.value)  # Airflow's retries try again
    with pytest.raises(Doc2XInputError, match=r"missing\.png"):  # the control: a real 404 is an answer
        parse_operator([file_server.url("missing.png")], allow_schemes=["http"]).execute({})
    assert doc2x.stats()["billed_total"] == 0


@pytest.mark.parametrize("scheme", ["foo", "zip", "ftp"])
def test_an_allowed_scheme_no_filesystem_can_read_is_named_not_raised_raw(doc2x, scheme):
    with pytest.raises(Doc2XInputError, match=f"uses the scheme '{scheme}', which allow_schemes names"):
        parse_operator([f"{scheme}://127.0.0.1:9/x.png"], allow_schemes=[scheme]).execute({})
    assert doc2x.stats()["billed_total"] == 0


def test_an_input_error_names_the_type_never_the_bytes(hostile, tmp_path):
    secret_file = tmp_path / "shadow.png"
    secret_file.write_text("root:$6$s3cr3tHash:19000:0:99999:7:::\n")
    pdf = tmp_path / "paper.jpg"
    pdf.write_bytes(b"%PDF-1.7 very private")
    with pytest.raises(Doc2XInputError) as caught:
        parse_operator([secret_file, pdf]).execute({})
    message = str(caught.value)
    # Known by its content, not its name: the ".jpg" is read as a PDF, and refused as one cut short.
    assert "looks like text" in message and "PDF document" in message and "truncated" in message
    assert "s3cr3t" not in message and "root:" not in message and "private" not in message
    assert hostile.requests == []


#: Root's rights to read and search any file whatever its mode (``linux/capability.h``).
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_root_file_access() -> None:
    """Take from this process root's right to read any file: a file's mode binds it as it binds a user."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def as_a_plain_user(call: Callable[[], Any]) -> tuple[str, str]:
    """Run ``call`` where a file's mode is obeyed; return its outcome as (exception type name, text).

    As root (CI), in a forked child that keeps root's uid (the interpreter's files in root's home stay
    readable to it) but not root's right to read any file; otherwise in this process.
    """

    def outcome() -> tuple[str, str]:
        try:
            call()
        except Exception as error:
            return type(error).__name__, str(error)
        return "returned", ""

    if os.geteuid() != 0:
        return outcome()
    parent_end, child_end = multiprocessing.Pipe(duplex=False)

    def child() -> None:
        try:
            drop_root_file_access()
        except OSError as error:
            child_end.send(("OSError", f"root's file access could not be dropped: {error}"))
            return
        child_end.send(outcome())

    process = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    process.start()
    try:
        assert parent_end.poll(60), f"the child answered nothing (exit code {process.exitcode})"
        kind, text = parent_end.recv()
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return kind, text


def test_an_unreadable_file_is_an_input_error(hostile, make_image, monkeypatch):
    """A real read refused with PermissionError fails the image as a bad input, named, nothing sent."""
    monkeypatch.setattr(storage, "STORAGE_WAIT_INITIAL", 0)  # a storage failure would be retried at once
    readable = make_image("readable.png")
    locked = make_image("locked.png")
    locked.chmod(0)  # only root's right to read any file reads it
    kind, message = as_a_plain_user(lambda: parse_operator([locked, readable]).execute({}))
    if os.geteuid() == 0:
        assert locked.read_bytes()  # root reads it: only that right was missing
    assert kind == "Doc2XInputError", message
    assert "1 of 2 files cannot be sent to Doc2X; nothing was submitted" in message
    assert f"Image {locked} cannot be read (PermissionError: Permission denied)" in message
    assert str(readable) not in message  # the readable image, read by the same user, passed
    assert hostile.requests == []


# -- 9. a uid with a newline ----------------------------------------------------------------------


def echoed_key(request: Request) -> str:
    """The key, as a proxy that echoes the request's ``Authorization`` header would hand it back."""
    return request.headers["authorization"].removeprefix("Bearer ")


def echoed_header(request: Request) -> str:
    """The whole ``Authorization`` header, echoed."""
    return request.headers["authorization"]


#: A uid (or how the server makes it from the request), and what the error says of it.
BAD_UIDS: dict[str, tuple[Any, str]] = {
    "a newline": ("abc\nFORGED LOG LINE", "printable characters without spaces, got 'abc\\nFORGED LOG LINE'"),
    "empty": ("", "accepted the image but answered no uid"),
    "too long": ("x" * 500, "printable characters without spaces, got 'xxxxxxxxxx"),
    "a tab": ("tab\there", "printable characters without spaces, got 'tab\\there'"),
    "a number": (42, "printable characters without spaces, got int"),
    "the key echoed": (echoed_key, "answered a uid shaped like an API key; it is not used"),
    "the header echoed": (echoed_header, "printable characters without spaces, got 'Bearer ***'"),
}


@pytest.mark.parametrize("case", list(BAD_UIDS))
def test_a_bad_uid_from_the_server_is_refused(hostile, make_image, case, caplog, capfd):
    """Refused as uncertain (Doc2X may have billed it); no key and no forged line in the error or the log."""
    caplog.set_level(logging.INFO)
    make_uid, reason = BAD_UIDS[case]
    sent: list[Any] = []

    def handler(request: Request) -> Reply:
        sent.append(make_uid(request) if callable(make_uid) else make_uid)
        return envelope({"uid": sent[-1]})

    hostile.handler = handler
    hook = Doc2XHook()
    with pytest.raises(Doc2XSubmitUncertainError) as caught:  # accepted (maybe billed), but unusable
        hook.submit_image(make_image())
    error = caught.value
    assert reason in str(error)  # the uid is named, escaped and redacted, or why it is not
    assert len(hostile.requests) == 1  # not sent again
    (uid,) = sent
    keys = [SECRET]  # the connection's key ...
    if callable(make_uid):
        assert SECRET in uid  # the server did echo it
        keys.append(uid)  # ... and the uid text that echoes it
    texts = {
        "str": str(error),
        "repr": repr(error),
        "message": error.message,
        "cause": repr(error.__cause__),
        "log": logged(caplog, capfd),
    }
    assert not [(where, key) for where, text in texts.items() for key in keys if key in text]
    assert not [where for where, text in texts.items() if "\nFORGED" in text]  # no line starts with it
    assert_logs_would_show(caplog, capfd, hook.log, f"{SECRET} {uid}")


# -- 10. the sensor ----------------------------------------------------------------------------


def test_the_sensor_fails_an_unknown_uid_the_same_way_poking_or_deferred(hostile):
    hostile.handler = lambda request: envelope(code="parse_status_not_found", msg="no such task")
    with pytest.raises(Doc2XJobNotFoundError):
        Doc2XImageParseSensor(task_id="poke", uid="gone").poke({})
    event = asyncio.run(first_event(make_trigger(["gone"])))
    with pytest.raises(AirflowFailException) as caught:  # no Airflow retry either way
        Doc2XImageParseSensor(task_id="defer", uid="gone", deferrable=True).execute_complete({}, event)
    assert isinstance(caught.value, Doc2XPermanentError)
    assert "parse_status_not_found" in str(caught.value)


def test_the_deferred_sensor_defers_then_fails_permanently(hostile):
    answers = iter([envelope({"status": "processing"})] + [envelope(code="parse_status_not_found")] * 10)
    hostile.handler = lambda request: next(answers)
    with pytest.raises(TaskDeferred) as deferred:
        Doc2XImageParseSensor(task_id="defer", uid="soon-gone", deferrable=True, poke_interval=0.05).execute(
            {}
        )
    event = asyncio.run(first_event(deferred.value.trigger))
    with pytest.raises(Doc2XPermanentError):
        Doc2XImageParseSensor(task_id="defer", uid="soon-gone", deferrable=True).execute_complete({}, event)


# -- the connection test -------------------------------------------------------------------------


def test_a_host_without_a_scheme_gets_a_hint_not_an_ssl_error(hostile, monkeypatch):
    connect(monkeypatch, f"127.0.0.1:{hostile.port}")
    hostile.handler = lambda request: envelope(code="parse_status_not_found")
    ok, message = Doc2XHook().test_connection()
    assert not ok
    assert "write http:// before the host" in message


def test_a_silent_host_is_answered_within_one_deadline(hostile, monkeypatch):
    connect(monkeypatch, hostile.url, timeout=2.0, max_retries=5)
    hostile.handler = lambda request: silence()
    ok, message = Doc2XHook().test_connection()
    assert not ok
    assert "no complete answer within 2s" in message
    assert len(hostile.requests) == 1  # one try, not the connection's five retries


def test_connection_test_messages_use_no_internal_words(hostile, monkeypatch):
    messages = []
    for handler in (
        lambda request: envelope(code="unauthorized", status=401),
        lambda request: envelope(code="internal_error", status=500),
        lambda request: answer(404, b"<html>not here</html>", {"Content-Type": "text/html"}),
    ):
        hostile.handler = handler
        messages.append(Doc2XHook().test_connection()[1])
    connect(monkeypatch, "http://127.0.0.1:9")
    messages.append(Doc2XHook().test_connection()[1])
    assert not [message for message in messages if "airflow-connection-test" in message or "uid=" in message]


def test_an_empty_key_is_named_as_such(hostile, monkeypatch):
    connect(monkeypatch, hostile.url, key="   ")
    ok, message = Doc2XHook().test_connection()
    assert not ok
    assert "has no API key" in message
    assert hostile.requests == []


# -- helpers ---------------------------------------------------------------------------------------


def make_trigger(
    uids, *, timeout: float = 30, poll_interval: float = 0.05, **kwargs
) -> Doc2XImageParseTrigger:
    return Doc2XImageParseTrigger(
        doc2x_conn_id="doc2x_default",
        jobs=[{"uid": uid, "source": f"{uid}.png", "sha256": None, "status": "processing"} for uid in uids],
        poll_interval=poll_interval,
        deadline=time.time() + timeout,
        **kwargs,
    )


_ = (REPO, wait_until)
